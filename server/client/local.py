"""Start a local `streamllm serve` in a subprocess when a client command is given no --base-url."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from streaming_core.loader import default_data_dir

from ..redis_embedded import free_port


def log_path(port: int, log_dir: Path | None = None) -> Path:
    """Where a local server on `port` logs: `log_dir`, else the data dir's logs/ (never the working dir)."""
    return (log_dir if log_dir is not None else default_data_dir() / "logs") / f"serve-{port}.log"


def start_server(
    log_dir: Path | None = None,
    config: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 180.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `streamllm serve` on a free loopback port, logging to `log_path`; returns it once /health is 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if config:
        cmd += ["--config", config]
    log = log_path(port, log_dir)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout, log)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def local_server(
    base_url: str | None, config: str | None = None, env: dict[str, str] | None = None, timeout: float = 180.0
) -> Iterator[str]:
    """Yield `base_url` as is, or start a server on a free port, wait for /health, and stop it afterwards."""
    with local_server_proc(base_url, config, env, timeout) as (url, _):
        yield url


@contextlib.contextmanager
def local_server_proc(
    base_url: str | None, config: str | None = None, env: dict[str, str] | None = None, timeout: float = 180.0
) -> Iterator[tuple[str, subprocess.Popen[bytes] | None]]:
    """As local_server, with the server's process (None for `base_url`)."""
    if base_url:
        yield base_url.rstrip("/"), None
        return
    proc, url = start_server(None, config, env, timeout)
    try:
        yield url, proc
    finally:
        stop(proc)


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process now (Linux /proc), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the server at {url} was not ready after {timeout:.0f} s; see {log}")
