"""The embedded Redis: starts, persists, and is reused or restarted cleanly by the next server on the same
data dir after a SIGKILL (of the server, or of Redis itself)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import redis

from server.redis_embedded import EmbeddedRedis, _alive

CHILD = """
import sys, time, redis
from server.redis_embedded import EmbeddedRedis
url = EmbeddedRedis(sys.argv[1]).start()
redis.Redis.from_url(url).set("k", "kept")
print(url, flush=True)
time.sleep(600)
"""


def test_start_write_stop_restart_keeps_data(tmp_path):
    first = EmbeddedRedis(tmp_path, appendfsync="always")
    redis.Redis.from_url(first.start()).set("k", "v")
    assert (tmp_path / "redis" / "redis.conf").read_text().count("appendonly yes") == 1
    pid = first.pid
    first.stop()
    assert not _alive(pid) and not (tmp_path / "redis" / "endpoint.json").exists()
    with EmbeddedRedis(tmp_path) as second:
        assert not second.adopted and redis.Redis.from_url(second.url).get("k") == b"v"


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
        assert server.start() == url and server.adopted and server.responsible
        assert redis.Redis.from_url(url).get("k") == b"kept"
        assert json.loads((tmp_path / "redis" / "endpoint.json").read_text())["owner"] == os.getpid()
    finally:
        pid = server.pid
        server.stop()
    assert pid is not None and not _alive(pid)


def test_a_dead_redis_is_restarted_from_its_append_only_file(tmp_path):
    first = EmbeddedRedis(tmp_path, appendfsync="always")
    redis.Redis.from_url(first.start()).set("k", "survives")
    assert first.process is not None
    first.process.kill()
    first.process.wait()
    with EmbeddedRedis(tmp_path) as second:
        assert not second.adopted and second.pid != first.pid
        assert redis.Redis.from_url(second.url).get("k") == b"survives"


def test_a_stale_endpoint_naming_a_foreign_process_is_left_alone(tmp_path):
    (tmp_path / "redis").mkdir()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        endpoint = {"port": 1, "pid": sleeper.pid, "owner": sleeper.pid}
        (tmp_path / "redis" / "endpoint.json").write_text(json.dumps(endpoint))
        with EmbeddedRedis(tmp_path) as server:
            assert server.pid != sleeper.pid and redis.Redis.from_url(server.url).ping()
        time.sleep(0.05)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
