"""Operations over real HTTP: health, metrics, client disconnect, graceful shutdown and restart."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from streaming_core.loader import LoadedModel

from .conftest_http import KEY_A, MODEL, LiveServer, api_server, make_engine, make_settings, sse_events

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {KEY_A}"}
STORY = [{"role": "user", "content": "Tell me a very long story about a lighthouse."}]


@pytest.fixture(scope="module")
def live(pytestconfig: pytest.Config, default_model: LoadedModel) -> LiveServer:
    return api_server(pytestconfig, default_model)


def long_stream(sid: str | None, max_tokens: int = 400) -> dict:
    body = {"model": MODEL, "messages": STORY, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    return body | ({"session_id": sid} if sid else {})


def test_health_needs_no_key(live: LiveServer) -> None:
    r = httpx.get(f"{live.url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": MODEL}


def test_metrics(live: LiveServer) -> None:
    body = {"model": MODEL, "messages": STORY, "max_tokens": 4, "temperature": 0}
    assert (
        httpx.post(f"{live.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60).status_code == 200
    )
    r = httpx.get(f"{live.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    label = f'{{model_name="{MODEL}"}}'
    assert samples[f"streamllm:time_to_first_token_seconds_count{label}"] >= 1
    assert samples[f"streamllm:inter_token_latency_seconds_count{label}"] >= 3
    assert samples[f"streamllm:e2e_request_latency_seconds_count{label}"] >= 1
    assert samples[f"streamllm:prompt_tokens_total{label}"] > 10
    assert samples[f"streamllm:generation_tokens_total{label}"] >= 4
    assert samples[f'streamllm:request_success_total{{finished_reason="length",model_name="{MODEL}"}}'] >= 1
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_slot_usage_perc", "num_sessions"):
        assert f"streamllm:{gauge}{label}" in samples
    assert f"streamllm:kv_offloads_total{label}" in samples
    assert f"streamllm:session_rebuilds_total{label}" in samples


def test_disconnect_aborts_within_a_step(live: LiveServer) -> None:
    """Closing the connection mid-stream ends generation at once: the slot is freed, no step runs after."""
    sid = f"gone-{uuid.uuid4().hex[:8]}"
    engine = live.engine
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=long_stream(sid), headers=AUTH) as r:
        lines = r.iter_lines()  # held: a dropped line iterator would close the connection right away
        seen = 0
        for line in lines:
            seen += line.startswith("data:")
            if seen == 4:
                break
        stats = engine.stats(sid)
        assert stats is not None and stats.busy
        closed_at = engine.steps
    deadline = time.monotonic() + 5
    while (s := engine.stats(sid)) is not None and s.busy:
        assert time.monotonic() < deadline, "generation still running after the client left"
        time.sleep(0.005)
    after = engine.steps
    assert after - closed_at <= 5  # one step per token; detection takes a few ms, 400 tokens take seconds
    time.sleep(0.3)
    assert engine.steps == after, "the engine kept stepping for a gone client"
    assert not engine.scheduler.running and not engine.scheduler.waiting
    again = {"model": MODEL, "messages": STORY, "max_tokens": 2, "session_id": sid}
    assert (
        httpx.post(f"{live.url}/v1/chat/completions", json=again, headers=AUTH, timeout=60).status_code == 200
    )


def test_graceful_shutdown_and_restart(tmp_path: Path, default_model: LoadedModel) -> None:
    """Shutdown ends an in-flight stream with an error event, keeps committed turns, stops engine and Redis;
    a restarted server on the same data dir still has the session and rebuilds it."""
    settings = make_settings(tmp_path, shutdown_grace_seconds=0.5)
    first = LiveServer(settings, make_engine(default_model, num_slots=2))
    kept = {"model": MODEL, "messages": STORY, "max_tokens": 3, "temperature": 0, "session_id": "kept"}
    assert httpx.post(f"{first.url}/v1/chat/completions", json=kept, timeout=60).status_code == 200
    stopper = threading.Thread(target=first.stop)
    with httpx.stream("POST", f"{first.url}/v1/chat/completions", json=long_stream("cut"), timeout=60) as r:
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith("data:") and len(sse_events(lines)) == 3:
                stopper.start()
    stopper.join(60)
    events = sse_events(lines)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "shutting_down"
    assert first.lifecycle.state == "stopped" and not first.thread.is_alive()
    assert not first.engine.running  # the engine loop was stopped

    second = LiveServer(make_settings(tmp_path), make_engine(default_model, num_slots=2))
    try:
        info = httpx.get(f"{second.url}/v1/sessions/kept").json()
        assert info["turns"] == 1 and info["resident"] is False
        assert httpx.get(f"{second.url}/v1/sessions/cut").status_code == 404
        follow_up = [{"role": "user", "content": "Shorter, please."}]
        more = kept | {"messages": follow_up, "session_mode": "delta"}
        r2 = httpx.post(f"{second.url}/v1/chat/completions", json=more, timeout=60)
        assert r2.status_code == 200, r2.text
        assert httpx.get(f"{second.url}/v1/sessions/kept").json()["rebuilds"] == 1
    finally:
        second.stop()


def test_default_yaml_is_the_built_in_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.settings import Settings

    path = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
    assert Settings(config=path).model_dump(exclude={"config"}) == Settings().model_dump(exclude={"config"})
    monkeypatch.setenv("STREAMLLM_ENGINE__CACHE__WINDOW", "2044")
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/0")
    monkeypatch.setenv("STREAMLLM_API_KEYS", "a, b")
    s = Settings(config=path)
    assert s.engine.cache.window == 2044 and s.engine.cache.sink_tokens == 4
    assert s.redis_url == "redis://example:6379/0" and s.api_keys == ["a", "b"]


def test_settings_reject_unknown_and_invalid(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from server.settings import Settings

    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"engine": {"cache": {"windw": 10}}}))
    with pytest.raises(ValidationError, match="windw"):
        Settings(config=bad)
    bad.write_text(json.dumps({"engine": {"cache": {"window": 0}}}))
    with pytest.raises(ValidationError, match="window must be >= 1"):
        Settings(config=bad)
    keys = tmp_path / "keys"
    keys.write_text("# ops\nk1\n\nk2\n")
    assert Settings(api_keys=["k0"], api_key_file=keys).api_key_list() == ["k0", "k1", "k2"]


def test_serve_command_is_registered() -> None:
    from server.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "0", "--host", "0.0.0.0"])
    assert args.command == "serve" and args.port == 0 and callable(args.func)


def _tier_samples(url: str) -> dict[tuple[str, str], float]:
    """(metric, tier or kind) -> value for the KV tier families."""
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("streamllm:kv_tier"):
            series, value = line.rsplit(" ", 1)
            name, labels = series.split("{", 1)
            parts = dict(p.split("=", 1) for p in labels.rstrip("}").split(","))
            key = parts.get("tier", parts.get("kind", "")).strip('"')
            out[name, key] = float(value)
    return out


def test_kv_tier_metrics(live: LiveServer) -> None:
    sid = f"tiers-{uuid.uuid4().hex[:8]}"
    body = {"model": MODEL, "messages": STORY, "max_tokens": 4, "temperature": 0, "session_id": sid}
    url = f"{live.url}/v1/chat/completions"
    assert httpx.post(url, json=body, headers=AUTH, timeout=60).status_code == 200
    before = _tier_samples(live.url)
    assert before["streamllm:kv_tier_sessions", "slot"] >= 1
    assert before["streamllm:kv_tier_bytes", "slot"] >= before["streamllm:kv_tier_sessions", "slot"] * 1e6
    for name in ("kv_tier_demotions_total", "kv_tier_promotions_total"):
        assert ("streamllm:" + name, "host") in before and ("streamllm:" + name, "disk") in before
    assert ("streamllm:kv_tier_disk_errors_total", "write") in before
    live.engine.offload(sid)
    moved = _tier_samples(live.url)
    assert (
        moved["streamllm:kv_tier_demotions_total", "host"]
        == before["streamllm:kv_tier_demotions_total", "host"] + 1
    )
    assert moved["streamllm:kv_tier_sessions", "host"] >= 1 and moved["streamllm:kv_tier_bytes", "host"] > 1e6
    follow = body | {"messages": [{"role": "user", "content": "Go on."}], "session_mode": "delta"}
    assert httpx.post(url, json=follow, headers=AUTH, timeout=60).status_code == 200
    after = _tier_samples(live.url)
    assert (
        after["streamllm:kv_tier_promotions_total", "host"]
        == moved["streamllm:kv_tier_promotions_total", "host"] + 1
    )
