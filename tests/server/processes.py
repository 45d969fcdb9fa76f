"""Real `streamllm serve` processes for the tests: started on a free port, sharing a test Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from server.client.local import free_port, wait_ready


def start_server(tmp: Path, redis_url: str, **env_vars: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "STREAMLLM_ENGINE__CACHE__NUM_SLOTS": "4", **env_vars}
    log = tmp / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "streaming_core.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, 180, log)
    return proc, url
