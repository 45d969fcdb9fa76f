"""docker/entrypoint.sh and docker/healthcheck.py, run for real on this machine."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .docker_files import ROOT

ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"


def test_entrypoint_parses() -> None:
    result = subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_entrypoint_shellcheck() -> None:
    result = subprocess.run(["shellcheck", str(ENTRYPOINT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout


@pytest.fixture
def fake_streamllm(tmp_path: Path) -> Path:
    """A `streamllm` on PATH that prints the arguments it was given."""
    script = tmp_path / "streamllm"
    script.write_text('#!/usr/bin/env bash\necho "streamllm $*"\n')
    script.chmod(0o755)
    return tmp_path


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {}, "streamllm serve --host 0.0.0.0 --port 8000"),
        (["serve"], {"STREAMLLM_PORT": "9000"}, "streamllm serve --host 0.0.0.0 --port 9000"),
        (
            ["serve", "--config", "/app/configs/gpu.yaml"],
            {},
            "streamllm serve --host 0.0.0.0 --port 8000 --config /app/configs/gpu.yaml",
        ),
        (["--log-level", "debug"], {}, "streamllm serve --host 0.0.0.0 --port 8000 --log-level debug"),
        (["echo", "other", "command"], {}, "other command"),
    ],
)
def test_entrypoint_dispatch(
    fake_streamllm: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    environ = {"PATH": f"{fake_streamllm}:/usr/bin:/bin", **env}
    result = subprocess.run(
        [str(ENTRYPOINT), *args], env=environ, capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.strip() == expected


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 200 if self.path == "/health" and self.server.status == 200 else 503  # type: ignore[attr-defined]
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    server.status = 200  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def probe(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), str(port)], capture_output=True, text=True, timeout=30
    )


def test_healthcheck_follows_the_health_status(health_server: ThreadingHTTPServer) -> None:
    port = health_server.server_address[1]
    assert probe(port).returncode == 0
    health_server.status = 503  # type: ignore[attr-defined]
    result = probe(port)
    assert result.returncode == 1
    assert "503" in result.stderr


def test_healthcheck_fails_when_nothing_listens(health_server: ThreadingHTTPServer) -> None:
    port = health_server.server_address[1]
    health_server.shutdown()
    health_server.server_close()
    result = probe(port)
    assert result.returncode == 1
    assert "refused" in result.stderr.lower()
