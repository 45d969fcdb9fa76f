"""`streamllm bench soak`: its bookkeeping on its own, and a 60 s soak with every fault on real processes
(the real default model, two replicas on one real Redis)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from server.cli import main
from server.client.soak.checks import rss_growth, unexpected_4xx
from server.client.soak.clients import Attempt, error_body_ok
from server.client.soak.cluster import SoakRedis
from server.client.soak.command import parse_faults
from server.client.soak.faults import Outage, schedule

from .conftest_http import LiveServer, make_settings
from .tiny import tiny_engine

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_outage_covers_requests_that_overlap_it_or_its_allowance() -> None:
    o = Outage("redis-freeze", start=10.0, end=14.0, allowance=5.0)
    assert o.covers(9.0, 10.5) and o.covers(12.0, 12.1) and o.covers(18.9, 30.0)
    assert not o.covers(0.0, 9.9) and not o.covers(19.1, 20.0)


def test_a_request_in_a_freeze_must_be_answered_within_the_bound() -> None:
    o = Outage("redis-freeze", start=10.0, end=18.0, allowance=5.0)
    assert o.holds(10.5, 14.6) and o.holds(12.0, 30.0)
    assert not o.holds(10.5, 12.2)  # a quick 503
    assert not o.holds(11.0, 14.9)  # within the bound
    assert not o.holds(15.0, 19.5)  # started too late to be answered within the freeze
    assert not o.holds(9.0, 19.0)  # started before it (already past Redis, say)
    assert not Outage("redis-restart", 10.0, 18.0, 5.0).holds(10.5, 16.0)


def test_schedule_spreads_faults_over_the_first_70_percent() -> None:
    plan = schedule({"redis", "kill-replica", "disconnect"}, 60.0)
    assert [kind for _, kind in plan] == ["redis-freeze", "kill-replica", "redis-restart"]
    times = [t for t, _ in plan]
    assert times == sorted(times) and times[0] > 0 and times[-1] <= 42.0
    assert schedule({"disconnect", "delete"}, 60.0) == []
    assert len(schedule({"redis"}, 180.0)) == 6


def test_parse_faults_refuses_unknown_names() -> None:
    assert parse_faults("redis, delete") == {"redis", "delete"}
    with pytest.raises(ValueError, match="unknown faults"):
        parse_faults("redis,meteor")


def test_failure_classes() -> None:
    def attempt(outcome: str, kind: str = "full-stream") -> Attempt:
        return Attempt(0, "s", kind, 0, 0.0, 1.0, outcome)

    failures = ["500", "503", "error-event:generation_failed", "broken-stream", "connect-error", "timeout"]
    assert all(attempt(o).server_failure for o in failures)
    assert not any(attempt(o).server_failure for o in ("200", "409", "429", "404", "disconnect"))
    assert unexpected_4xx(attempt("404")) and unexpected_4xx(attempt("400"))
    assert not unexpected_4xx(attempt("404", "delete")) and not unexpected_4xx(attempt("409"))
    assert error_body_ok({"error": {"message": "m", "type": "t", "param": None, "code": None}})
    assert not error_body_ok({"detail": "Not Found"}) and not error_body_ok({"error": "boom"})


def test_rss_growth_sees_a_leak_not_a_warm_up_or_a_step() -> None:
    def samples(values: list[float], pid: int = 1) -> list[dict]:
        return [{"t": float(t), "replica": "r", "pid": pid, "rss_mb": v} for t, v in enumerate(values)]

    warm_then_step = samples([1000.0] * 5 + [2000.0] * 20 + [2500.0] * 20 + [2500.0] * 20)
    assert rss_growth(warm_then_step, warmup=5)["r/1"]["growth_mb"] == 0
    leak = samples([2000.0 + 10 * t for t in range(60)])
    assert rss_growth(leak, warmup=5)["r/1"]["growth_mb"] > 100
    assert rss_growth(samples([2000.0] * 10, pid=2), warmup=5) == {}  # too short-lived to judge


def test_soak_redis_freezes_and_restarts_on_its_port_losing_nothing(tmp_path: Path) -> None:
    r = SoakRedis(tmp_path)
    url = r.start()
    client = redis.Redis.from_url(url, socket_timeout=0.5)
    try:
        client.set("k", "acknowledged")
        r.freeze()
        with pytest.raises(redis.TimeoutError):
            client.get("k")
        r.thaw()
        client = redis.Redis.from_url(url, socket_timeout=0.5)
        assert client.get("k") == b"acknowledged"
        old = r.pid
        r.kill()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        r.restart()
        assert r.url == url and r.pid != old
        assert client.get("k") == b"acknowledged"  # appendfsync always: a SIGKILL loses no acked write
    finally:
        client.close()
        r.stop()


def test_base_url_refuses_server_side_faults(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "soak", "--base-url", "http://127.0.0.1:9", "--faults", "redis"]
    assert main(args) == 2
    assert "need the local servers" in capsys.readouterr().out


def test_soak_against_a_running_server_on_a_tiny_model(tmp_path: Path, tokenizer: Any) -> None:
    """--base-url, client-side faults only: the whole soak (clients, accounting, probes, report) end to end."""
    live = LiveServer(make_settings(tmp_path / "server"), tiny_engine(tokenizer, num_slots=4))
    try:
        out = tmp_path / "soak"
        args = ["bench", "soak", "--base-url", live.url, "--duration", "8", "--streams", "6"]
        code = main([*args, "--faults", "disconnect,delete", "--settle", "1", "--out", str(out)])
    finally:
        live.stop()
    result = json.loads(out.with_suffix(".json").read_text())
    failed = [i for i in result["invariants"] if not i["ok"]]
    assert code == 0 and not failed, failed
    s = result["summary"]
    assert s["turns_acked"] >= 12 and s["disconnects"] > 0 and s["deletes"] > 0, s
    assert result["outages"] == [] and result["sessions"], result
    assert {a["kind"] for a in result["attempts"]} >= {"probe", "get", "disconnect", "delete"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_with_every_fault(tmp_path: Path) -> None:
    """60 s of 16 conversations on two replicas with Redis freezes and restarts, a replica SIGKILLed and
    restarted, client disconnects and deletes: no unexpected 5xx, no lost turn, no stuck session."""
    out = tmp_path / "soak"
    args = ["bench", "soak", "--duration", "60", "--streams", "16", "--request-timeout", "60"]
    args += [
        "--faults",
        "redis,disconnect,delete,kill-replica",
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path),
    ]
    code = main(args)
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    inv = {i["invariant"].split(" (")[0]: i for i in result["invariants"]}
    kinds = sorted(o["kind"].split(":")[0] for o in result["outages"])
    assert kinds == ["kill-replica", "redis-freeze", "redis-restart"], result["outages"]
    s = result["summary"]
    assert s["turns_acked"] >= 30 and s["disconnects"] > 0 and s["deletes"] > 0, s  # the soak did work
    failed = "; ".join(f"{i['invariant']}: {i['value']}" for i in result["invariants"] if not i["ok"])
    assert inv["unexpected server failures"]["value"] == 0, failed
    assert inv["lost turns"]["value"] == 0, failed
    assert inv["stuck sessions"]["value"] == 0, failed
    # A request arriving well into a freeze is refused (503) within FREEZE_ANSWER_S, not held until the
    # thaw: every Redis command has one deadline in all (server/redis_client.py).
    assert inv["requests held through a Redis freeze"]["value"] == 0, failed
    assert not failed, failed
    assert code == 0
