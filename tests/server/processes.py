"""Real `streamllm serve` processes for the tests: started on a free port, sharing a test Redis."""

from __future__ import annotations

import subprocess
from pathlib import Path

from server.client.local import start_server as start


def start_server(tmp: Path, redis_url: str, **env_vars: str) -> tuple[subprocess.Popen[bytes], str]:
    env = {"REDIS_URL": redis_url, "STREAMLLM_ENGINE__CACHE__NUM_SLOTS": "4", **env_vars}
    return start(tmp, env=env)
