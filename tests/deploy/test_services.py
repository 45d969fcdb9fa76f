"""docker/nginx.conf and docker/redis.conf, run for real on loopback ports: nginx routes by session id,
fails over and streams unbuffered; Redis persists through a crash with our configuration."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from server.redis_embedded import free_port

from .docker_files import ROOT

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def local_nginx_conf(tmp: Path, listen: int, backends: list[int]) -> Path:
    """docker/nginx.conf with the replicas and the listen port on loopback, and its temp files in `tmp`."""
    text = (ROOT / "docker" / "nginx.conf").read_text()
    servers = iter(backends)
    text, n = re.subn(r"server\s+streamllm-\w+:8000", lambda _: f"server 127.0.0.1:{next(servers)}", text)
    assert n == len(backends)
    text = text.replace("listen 8000;", f"listen 127.0.0.1:{listen};")
    temps = "".join(
        f"    {k}_temp_path {tmp}/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {\n", "http {\n" + temps, 1)
    path = tmp / "nginx.conf"
    path.write_text(text)
    return path


@needs_nginx
def test_nginx_config_parses(tmp_path: Path) -> None:
    conf = local_nginx_conf(tmp_path, free_port(), [free_port(), free_port()])
    result = subprocess.run(
        [str(NGINX), "-t", "-p", str(tmp_path), "-c", str(conf), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


class Replica(BaseHTTPRequestHandler):
    """Answers with its replica name; /stream sends server-sent events in lockstep with the client."""

    protocol_version = "HTTP/1.1"
    server: ReplicaServer

    def reply(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.path == "/stream":
            self.stream()
            return
        body = json.dumps({"replica": self.server.name}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = reply

    def stream(self) -> None:
        """Headers, then each event only once the client has received what came before (lockstep)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for event in self.server.events:
            if not self.server.received.acquire(timeout=10):
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: object) -> None:
        pass


class ReplicaServer(ThreadingHTTPServer):
    """A stand-in replica on a free loopback port; `kill` drops it the way a dead container does."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), Replica)
        self.name = name
        self.events = [b"data: %d\n\n" % i for i in range(3)]
        self.received = threading.Semaphore(0)
        """Released by the client for each event it may be sent next."""
        self.connections: list[socket.socket] = []
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers and body leave at once
        self.connections.append(request)
        super().process_request(request, client_address)

    def kill(self) -> None:
        """Stop listening and reset every open connection, nginx's idle keep-alive ones included."""
        self.shutdown()
        self.server_close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class Proxy:
    def __init__(self, port: int) -> None:
        self.port = port

    def request(self, path: str = "/v1/chat/completions", headers: dict[str, str] | None = None) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", path, body=b"{}", headers=headers or {})
            response = conn.getresponse()
            assert response.status == 200, response.read()
            return str(json.loads(response.read())["replica"])
        finally:
            conn.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Proxy, dict[str, ReplicaServer]]]:
    """nginx with docker/nginx.conf in front of two stand-in replicas."""
    assert NGINX is not None
    replicas = {name: ReplicaServer(name) for name in ("a", "b")}
    port = free_port()
    conf = local_nginx_conf(tmp_path, port, [r.port for r in replicas.values()])
    log = tmp_path / "error.log"
    nginx = subprocess.Popen(
        [
            str(NGINX),
            "-p",
            str(tmp_path),
            "-c",
            str(conf),
            "-e",
            str(log),
            "-g",
            "daemon off; pid nginx.pid;",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, nginx)
        yield Proxy(port), replicas
    finally:
        nginx.send_signal(signal.SIGQUIT)
        try:
            nginx.wait(10)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait()
        for r in replicas.values():
            r.kill()


@needs_nginx
def test_a_session_sticks_to_one_replica(stack: tuple[Proxy, dict[str, ReplicaServer]]) -> None:
    proxy, _ = stack
    owners = {}
    for _ in range(16):
        sid = uuid.uuid4().hex
        seen = {proxy.request(headers={"X-Session-ID": sid}) for _ in range(3)}
        assert len(seen) == 1, "one session's turns went to different replicas"
        owners[sid] = seen.pop()
        # The same key in the sessions path or a cookie lands on the same replica.
        assert proxy.request(f"/v1/sessions/{sid}") == owners[sid]
        assert proxy.request(headers={"Cookie": f"session_id={sid}"}) == owners[sid]
    assert set(owners.values()) == {"a", "b"}, "sessions must spread over the replicas"


@needs_nginx
def test_requests_without_a_session_spread(stack: tuple[Proxy, dict[str, ReplicaServer]]) -> None:
    proxy, _ = stack
    assert {proxy.request() for _ in range(32)} == {"a", "b"}


@needs_nginx
def test_a_dead_replica_s_sessions_move(stack: tuple[Proxy, dict[str, ReplicaServer]]) -> None:
    proxy, replicas = stack
    sids = [uuid.uuid4().hex for _ in range(16)]
    owners = {sid: proxy.request(headers={"X-Session-ID": sid}) for sid in sids}
    replicas["a"].kill()
    time.sleep(0.2)  # nginx drops its keep-alive connections to "a" once it sees them reset
    for sid in sids:
        assert proxy.request(headers={"X-Session-ID": sid}) == "b"
    assert "a" in owners.values()


@needs_nginx
def test_events_pass_through_unbuffered(stack: tuple[Proxy, dict[str, ReplicaServer]]) -> None:
    """The replica sends its second event only after the client got the first: a buffering proxy hangs."""
    proxy, replicas = stack
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    try:
        conn.request("GET", "/stream", headers={"X-Session-ID": "s"})
        response = conn.getresponse()
        assert response.getheader("Content-Type") == "text/event-stream"
        upstream = response.getheader("X-Upstream")
        owner = next(r for r in replicas.values() if upstream == f"127.0.0.1:{r.port}")
        for event in owner.events:
            owner.received.release()
            assert response.read1(1024) == event
        assert response.read() == b""
    finally:
        conn.close()


# -- Redis ------------------------------------------------------------------------------------------


def redis_server(binary: str, data: Path, port: int) -> subprocess.Popen[bytes]:
    """redis-server with docker/redis.conf; only the port, address and data dir differ from compose.

    `dir` is replaced in a copy rather than overridden on the command line: Redis changes into the
    file's /data before it reads the command line."""
    text, n = re.subn(r"^dir /data$", f"dir {data}", (ROOT / "docker" / "redis.conf").read_text(), flags=re.M)
    assert n == 1
    conf = data.parent / "redis.conf"
    conf.write_text(text)
    args = ["--port", str(port), "--bind", "127.0.0.1"]
    return subprocess.Popen([binary, str(conf), *args], stdout=subprocess.DEVNULL)


def aof_holds(data: Path, needle: bytes) -> bool:
    """Redis 6 writes appendonly.aof, Redis 7 files under appendonlydir/."""
    return any(needle in p.read_bytes() for p in data.rglob("appendonly*") if p.is_file())


def test_redis_conf_persists_through_a_crash(tmp_path: Path) -> None:
    redis = pytest.importorskip("redis")
    from server.redis_embedded import find_redis_server

    try:
        binary = find_redis_server()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    port, data = free_port(), tmp_path / "data"
    data.mkdir()
    proc = redis_server(binary, data, port)
    try:
        wait_listening(port, proc)
        client = redis.Redis(port=port, decode_responses=True)
        for key, value in {
            "appendonly": "yes",
            "appendfsync": "everysec",
            "maxmemory-policy": "noeviction",
        }.items():
            assert client.config_get(key) == {key: value}
        client.set("session:s", "turn 1")
        deadline = time.monotonic() + 5  # appendfsync everysec: on disk within about a second
        while not aof_holds(data, b"session:s") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.kill()  # a crash: no shutdown save
        proc.wait()
    assert not (data / "dump.rdb").exists(), "the key must come back from the AOF, not a snapshot"
    proc = redis_server(binary, data, port)
    try:
        wait_listening(port, proc)
        client = redis.Redis(port=port, decode_responses=True)
        deadline = time.monotonic() + 10
        while client.info("persistence")["loading"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("session:s") == "turn 1"
    finally:
        proc.terminate()
        proc.wait(10)
