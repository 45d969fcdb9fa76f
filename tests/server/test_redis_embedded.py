"""The embedded Redis: persists, keeps its port across restarts, and is adopted or restarted cleanly by the
next server on the same data dir after a SIGKILL (of the server, or of Redis itself)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import redis

from server.redis_embedded import DB_FILE, EmbeddedRedis, free_port

CHILD = """
import sys, time, redis
from server.redis_embedded import EmbeddedRedis
url = EmbeddedRedis(sys.argv[1]).start()
redis.Redis.from_url(url).set("k", "kept")
print(url, flush=True)
time.sleep(600)
"""


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def test_start_write_stop_restart_keeps_data_and_port(tmp_path):
    port = free_port()
    first = EmbeddedRedis(tmp_path, port=port, appendfsync="always")
    assert first.start() == f"redis://127.0.0.1:{port}/0"
    redis.Redis.from_url(first.url).set("k", "v")
    assert first.client is not None and first.client.config_get("appendonly")["appendonly"] == "yes"
    pid = first.pid
    assert pid
    first.stop()
    assert gone(pid)
    with EmbeddedRedis(tmp_path, port=port) as second:
        assert second.pid != pid and second.port == port
        assert redis.Redis.from_url(second.url).get("k") == b"v"


def test_a_sigkilled_server_leaves_a_redis_the_next_one_adopts(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    assert child.stdout is not None
    url = child.stdout.readline().strip()
    child.send_signal(signal.SIGKILL)
    child.wait()
    server = EmbeddedRedis(tmp_path)
    try:
        assert server.start() == url  # adopted: the same Redis, on its port
        assert redis.Redis.from_url(url).get("k") == b"kept"
    finally:
        pid = server.pid
        server.stop()
    assert pid and gone(pid)


def test_a_sigkilled_redis_is_restarted_from_its_append_only_file_on_its_port(tmp_path):
    first = EmbeddedRedis(tmp_path, port=free_port(), appendfsync="always")
    redis.Redis.from_url(first.start()).set("k", "survives")
    assert first.pid
    os.kill(first.pid, signal.SIGKILL)
    assert gone(first.pid)
    with EmbeddedRedis(tmp_path, port=first.port or 0) as second:
        assert second.pid != first.pid and second.url == first.url
        assert redis.Redis.from_url(second.url).get("k") == b"survives"


def test_a_stale_registry_naming_a_foreign_process_is_left_alone(tmp_path):
    (tmp_path / "redis").mkdir()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        pidfile = tmp_path / "redis.pid"
        pidfile.write_text(str(sleeper.pid))
        registry = {"pidfile": str(pidfile), "unixsocket": str(tmp_path / "none.sock")}
        registry |= {"dbdir": str(tmp_path / "redis"), "dbfilename": DB_FILE}
        (tmp_path / "redis" / f"{DB_FILE}.settings").write_text(json.dumps(registry))
        with EmbeddedRedis(tmp_path) as server:
            assert server.pid != sleeper.pid and redis.Redis.from_url(server.url).ping()
        time.sleep(0.05)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
