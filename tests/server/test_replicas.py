"""Two `streamllm serve` replicas on one Redis: failover by SIGKILL, claims across replicas, return of the
killed replica. Sessions migrate to whichever replica gets their turn, rebuilt from Redis."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid

import httpx
import pytest

from server.redis_embedded import free_port
from tests.deploy.test_services import NGINX, local_nginx_conf, needs_nginx, wait_listening

from .conftest_http import sse_events
from .processes import start_server

pytestmark = pytest.mark.slow
# 5 s: a replica whose event loop a neighbour's start-up starves for 2 s (2 cores) must not lose its claims
LEASE = {"STREAMLLM_SERVER__REPLICA_LEASE_SECONDS": "5"}


def chat(url: str, session: str, text: str, **extra) -> httpx.Response:
    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": text}]}
    body |= {"max_tokens": 8, "temperature": 0, "session_id": session, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def info(url: str, session: str) -> dict:
    r = httpx.get(f"{url}/v1/sessions/{session}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def moves(url: str, kind: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("streamllm:session_moves_total{") and f'kind="{kind}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no session_moves metric")


def test_failover_claims_and_return(tmp_path, redis_url):
    sid = f"replicated-{uuid.uuid4().hex[:6]}"
    a, url_a = start_server(tmp_path, redis_url, STREAMLLM_REPLICA_ID="replica-a", **LEASE)
    b, url_b = start_server(tmp_path, redis_url, STREAMLLM_REPLICA_ID="replica-b", **LEASE)
    try:
        for text in ("Name a planet.", "Name another one."):
            assert chat(url_a, sid, text).status_code == 200
        on_a = info(url_a, sid)
        assert on_a["turns"] == 2 and on_a["replica"] == "replica-a" and on_a["resident"]

        a.send_signal(signal.SIGKILL)
        a.wait(30)
        time.sleep(6)  # the killed replica's lease expires
        r = chat(url_b, sid, "Which is bigger?")
        assert r.status_code == 200 and r.json()["session_id"] == sid
        on_b = info(url_b, sid)
        assert on_b["turns"] == 3 and on_b["replica"] == "replica-b" and on_b["resident"]
        assert on_b["tokens_seen"] > on_a["tokens_seen"]
        assert on_b["created_at"] == on_a["created_at"]
        assert moves(url_b, "takeover") == 1

        # one turn at a time per session, across replicas: B streams, A refuses
        a, url_a = start_server(tmp_path, redis_url, STREAMLLM_REPLICA_ID="replica-a", **LEASE)
        body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Count."}]}
        body |= {"session_id": sid, "stream": True, "max_tokens": 400, "ignore_eos": True}
        with httpx.stream("POST", f"{url_b}/v1/chat/completions", json=body, timeout=120) as stream:
            # Keep the line iterator: a discarded one is finalized at once, which closes the response, and B
            # rightly aborts the turn of a client that went away and frees the session (what this test once
            # took for a double claim: A was then free to serve it).
            lines = stream.iter_lines()
            next(lines)
            busy = chat(url_a, sid, "Hello?")
            assert busy.status_code == 409, busy.text
            assert busy.json()["error"]["code"] == "session_busy"
        # the interrupted turn was never committed: the session is as after turn 3
        deadline = time.monotonic() + 10
        while (r := chat(url_a, sid, "And the smallest?")).status_code == 409 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 200, r.text
        back = info(url_a, sid)
        assert back["turns"] == 4 and back["replica"] == "replica-a"
        assert moves(url_a, "migration") == 1  # B is alive: a migration, not a takeover

        # B's copy is stale now: its next turn rebuilds from Redis instead of using it
        assert chat(url_b, sid, "Thanks.").status_code == 200
        assert info(url_b, sid)["turns"] == 5
        # both serve new conversations
        for url in (url_a, url_b):
            fresh = f"fresh-{uuid.uuid4().hex[:6]}"
            assert chat(url, fresh, "Hi!").status_code == 200
            assert info(url, fresh)["turns"] == 1
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)


def test_a_paused_replica_whose_claim_expired_cannot_commit_its_late_turn(tmp_path, redis_url):
    """Replica A is SIGSTOPped mid-stream past its lease; B takes the session and commits a turn; A, resumed,
    finishes its reply but its commit is refused (fencing): A's client gets an error event, no turn is
    lost or written twice."""
    sid = f"fenced-{uuid.uuid4().hex[:6]}"
    a, url_a = start_server(tmp_path, redis_url, STREAMLLM_REPLICA_ID="pause-a", **LEASE)
    b, url_b = start_server(tmp_path, redis_url, STREAMLLM_REPLICA_ID="pause-b", **LEASE)
    try:
        assert chat(url_a, sid, "Name a planet.").status_code == 200
        body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Count."}]}
        body |= {"session_id": sid, "stream": True, "max_tokens": 40, "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", f"{url_a}/v1/chat/completions", json=body, timeout=120) as stream:
            lines = stream.iter_lines()
            next(lines)
            a.send_signal(signal.SIGSTOP)
            try:
                time.sleep(6)  # past A's 5 s lease: its claim expires
                r = chat(url_b, sid, "Name another one.")
                assert r.status_code == 200, r.text
            finally:
                a.send_signal(signal.SIGCONT)
            events = sse_events(list(lines))
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "session_claim_lost", events[-3:]
        record = info(url_b, sid)
        assert record["turns"] == 2 and record["replica"] == "pause-b"  # A's late turn did not land
        assert chat(url_a, sid, "Which is bigger?").status_code == 200  # A carries on from B's commit
        assert info(url_a, sid)["turns"] == 3
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
                proc.wait(60)


@needs_nginx
def test_nginx_keeps_each_session_on_one_real_replica(tmp_path, redis_url):
    """docker/nginx.conf in front of two real replicas: every turn of a session (named by the
    X-Session-ID header) lands on the replica that holds its KV, so no turn ever needs a rebuild."""
    a, url_a = start_server(tmp_path, redis_url, STREAMLLM_REPLICA_ID="nginx-a")
    b, url_b = start_server(tmp_path, redis_url, STREAMLLM_REPLICA_ID="nginx-b")
    port = free_port()
    backends = [int(url.rsplit(":", 1)[1]) for url in (url_a, url_b)]
    conf = local_nginx_conf(tmp_path, port, backends)
    args = [str(NGINX), "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")]
    nginx = subprocess.Popen([*args, "-g", "daemon off; pid nginx.pid;"], stdout=subprocess.DEVNULL)
    proxy = f"http://127.0.0.1:{port}"
    try:
        wait_listening(port, nginx)
        holders = set()
        for n in range(6):
            sid = f"sticky-{n}-{uuid.uuid4().hex[:6]}"
            for text in ("Hi!", "Tell me more.", "Thanks."):
                body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": text}]}
                body |= {"max_tokens": 4, "temperature": 0}
                r = httpx.post(
                    f"{proxy}/v1/chat/completions", json=body, headers={"X-Session-ID": sid}, timeout=120
                )
                assert r.status_code == 200, r.text
            record = info(proxy, sid)
            assert record["turns"] == 3 and record["rebuilds"] == 0
            holders.add(record["replica"])
        assert holders <= {"nginx-a", "nginx-b"}
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(10)
        for proc in (a, b):
            proc.terminate()
            proc.wait(60)
