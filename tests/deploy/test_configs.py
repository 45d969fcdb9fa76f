"""Every file in configs/ loads through Settings; broken copies are refused with a clear message; the
example model configs stay within their models' context and their GPU; a cache wider than the loaded
model's context stops the server at start."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from pydantic import ValidationError

from server.settings import Settings
from streaming_core.loader import build_engine
from tests.streaming_core.helpers import tiny_falcon, tiny_llama, tiny_mpt, tiny_neox

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

MODEL_CONTEXT = {
    "default.yaml": 8192,  # SmolLM2-135M-Instruct, max_position_embeddings
    "gpu.yaml": 8192,
    "llama2-7b-chat.yaml": 4096,
    "mistral-7b-instruct.yaml": 4096,  # 32768 positions, but v0.1's sliding window is 4096
    "pythia-6.9b.yaml": 2048,
    "falcon-7b-instruct.yaml": 2048,
    "mpt-7b-chat.yaml": 2048,  # max_seq_len
}
"""The pre-training context of the model each config serves, from the released checkpoints."""


@functools.cache
def load_sizing() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kv_sizing", ROOT / "scripts" / "kv_sizing.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kv_sizing"] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment overrides config files: none of the developer's settings may leak in."""
    for name in list(os.environ):
        if (name.startswith("STREAMLLM_") and name != "STREAMLLM_DATA_DIR") or name == "REDIS_URL":
            monkeypatch.delenv(name)


def test_configs_dir_has_every_example() -> None:
    assert {p.name for p in CONFIGS} == set(MODEL_CONTEXT)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_through_settings(path: Path) -> None:
    settings = Settings(config=path)
    raw = yaml.safe_load(path.read_text())
    cache = raw["engine"]["cache"]
    # The file's values arrive, not the defaults.
    assert settings.engine.model == raw["engine"]["model"]
    assert settings.engine.cache.window == cache["window"]
    assert settings.engine.cache.num_slots == cache["num_slots"]
    assert settings.engine.cache.capacity <= MODEL_CONTEXT[path.name]


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name != "default.yaml"], ids=lambda p: p.name)
def test_every_key_has_a_comment(path: Path) -> None:
    for line in path.read_text().splitlines():
        if re.match(r"\s*[a-z_]+:\s*\S", line):
            assert "#" in line, f"{path.name}: undocumented setting: {line.strip()}"


def test_default_yaml_equals_the_built_in_defaults() -> None:
    """configs/default.yaml maps one to one onto the settings: it must state exactly the defaults."""
    assert Settings(config=ROOT / "configs" / "default.yaml").model_dump(exclude={"config"}) == (
        Settings().model_dump(exclude={"config"})
    )


def test_gpu_config_is_cuda_bf16() -> None:
    engine = Settings(config=ROOT / "configs" / "gpu.yaml").engine
    assert (engine.device, engine.dtype) == ("cuda", "bfloat16")
    assert engine.cache.window == 2044
    assert engine.cache.num_slots > Settings().engine.cache.num_slots


@pytest.mark.parametrize("name", [n for n in MODEL_CONTEXT if n not in ("default.yaml", "gpu.yaml")])
def test_model_examples_name_a_local_directory(name: str) -> None:
    text = (ROOT / "configs" / name).read_text()
    model = Settings(config=ROOT / "configs" / name).engine.model
    assert model.startswith("/models/")
    assert "must be present locally" in text
    assert Settings(config=ROOT / "configs" / name).engine.cache.sink_tokens == 4


def broken(tmp_path: Path, edit: dict[str, object]) -> Path:
    """A copy of gpu.yaml with `edit` applied ('a.b.c' keys; None deletes)."""
    data = yaml.safe_load((ROOT / "configs" / "gpu.yaml").read_text())
    for dotted, value in edit.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"engine.cache.windw": 2044, "engine.cache.window": None}, "unknown CacheConfig fields: windw"),
        ({"engine.modle": "default"}, "unknown EngineConfig fields: modle"),
        ({"prot": 8000}, "prot"),
        ({"server.max_tokns_cap": 10}, "max_tokns_cap"),
        ({"engine.cache.window": -4}, "window must be >= 1, got -4"),
        ({"engine.cache.sink_tokens": -1}, "sink_tokens must be >= 0, got -1"),
        ({"engine.cache.num_slots": 0}, "num_slots must be >= 1, got 0"),
        ({"engine.dtype": "bf16"}, "dtype must be auto, float32, bfloat16 or float16"),
        ({"port": 70000}, "port"),
    ],
)
def test_broken_config_is_refused(tmp_path: Path, edit: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        Settings(config=broken(tmp_path, edit))


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config file not found"):
        Settings(config=tmp_path / "nope.yaml")


def test_sizing_table_matches_configs_and_gpu() -> None:
    sizing = load_sizing()
    rows = sizing.rows()
    assert {r.config for r in rows} == set(MODEL_CONTEXT) - {"default.yaml"}
    for r in rows:
        assert r.capacity <= MODEL_CONTEXT[r.config], r.config
        assert 0 < r.num_slots <= r.fit, f"{r.config}: {r.num_slots} slots exceed the {r.fit} that fit"
    llama = next(r for r in rows if r.config == "llama2-7b-chat.yaml")
    assert llama.per_session == 2048 * 32 * 2 * 32 * 128 * 2 == 1 << 30  # 1 GiB per 2048-token session
    falcon = next(r for r in rows if r.config == "falcon-7b-instruct.yaml")
    assert falcon.per_session * 64 == llama.per_session  # multi-query: 1 KV head of 64 vs 32 of 128


def test_deploy_doc_carries_the_current_table() -> None:
    sizing = load_sizing()
    table = sizing.markdown(sizing.rows())
    assert table in (ROOT / "docs" / "deploy.md").read_text(), "regenerate: python scripts/kv_sizing.py"


FAMILIES = {"llama": tiny_llama, "neox": tiny_neox, "falcon": tiny_falcon}


@pytest.mark.parametrize("family", ["llama", "neox", "falcon", "mpt"])
def test_cache_beyond_the_model_context_is_refused_at_start(tmp_path: Path, family: str) -> None:
    """The server builds its engine from the loaded config; a window the model never saw must stop it."""
    hf = tiny_mpt(max_seq_len=64) if family == "mpt" else FAMILIES[family](max_position_embeddings=64)
    hf.save_pretrained(tmp_path / "model")

    def settings(window: int) -> Settings:
        path = tmp_path / f"w{window}.yaml"
        cache = {"sink_tokens": 4, "window": window, "num_slots": 1}
        engine = {"model": str(tmp_path / "model"), "device": "cpu", "dtype": "float32", "cache": cache}
        path.write_text(yaml.safe_dump({"engine": engine}))
        return Settings(config=path)

    refused = settings(100)
    with pytest.raises(ValueError) as e:
        build_engine(refused.engine, refused.data_dir)
    assert str(e.value) == (
        "cache capacity 104 (sink_tokens 4 + window 100) exceeds the model's pre-training context of 64 tokens"
    )
    fits = settings(60)
    assert build_engine(fits.engine, fits.data_dir).config.cache.capacity == 64
