"""Real `streamllm serve` processes: a SIGKILL'd server's sessions go on after a restart, so do those of a
SIGKILL'd engine process (engine_process on), and the client commands (chat, bench multiturn, bench serve) work against a live server."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import threading
import time
import uuid
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.cli import main
from server.client.chat import Chat

from .conftest_http import sse_events
from .processes import start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[str]:
    proc, url = start_server(tmp_path_factory.mktemp("live"), redis_url)
    yield url
    proc.terminate()
    proc.wait(60)


def turn(url: str, session: str, text: str) -> dict:
    body = {
        "model": httpx.get(f"{url}/v1/models").json()["data"][0]["id"],
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 12,
        "temperature": 0,
        "session_id": session,
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def stream_lines(url: str, session: str, max_tokens: int, started: threading.Event, out: list[str]) -> None:
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "Count to a thousand."}],
    }
    body |= {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "session_id": session}
    url = f"{url}/v1/chat/completions"
    # a SIGKILLed server cuts the body short: what was read is in `out`
    with (
        contextlib.suppress(httpx.RemoteProtocolError),
        httpx.stream("POST", url, json=body | {"stream": True}, timeout=120) as r,
    ):
        for line in r.iter_lines():
            out.append(line)
            if line.startswith("data:") and len(sse_events(out)) >= 2:
                started.set()


def two_turns_then_a_long_stream(url: str, session: str) -> tuple[dict, threading.Thread, list[str]]:
    """Two committed turns, then a third streaming (4000 tokens) once its first events are in: the session
    record before the third, the streaming thread, and the SSE lines it reads."""
    turn(url, session, "Tell me about the moon.")
    turn(url, session, "And about the sun?")
    before = httpx.get(f"{url}/v1/sessions/{session}").json()
    started, lines = threading.Event(), []
    stream = threading.Thread(target=stream_lines, args=(url, session, 4000, started, lines), daemon=True)
    stream.start()
    assert started.wait(60)
    return before, stream, lines


def test_sigkilled_server_sessions_continue_after_restart(tmp_path, redis_url):
    session = f"survivor-{uuid.uuid4().hex[:6]}"
    proc, url = start_server(tmp_path, redis_url)
    try:
        before, stream, _lines = two_turns_then_a_long_stream(url, session)
    finally:
        proc.send_signal(signal.SIGKILL)  # in the middle of a third turn's stream
        proc.wait(30)
    stream.join(30)
    assert before["turns"] == 2
    proc, url = start_server(tmp_path, redis_url)
    try:
        after_restart = httpx.get(f"{url}/v1/sessions/{session}").json()
        assert after_restart["turns"] == 2 and after_restart["tokens_seen"] == before["tokens_seen"]
        assert after_restart["resident"] is False
        reply = turn(url, session, "Which one is bigger?")  # at once: the killed stream left it not busy
        assert reply["session_id"] == session
        assert reply["usage"]["prompt_tokens"] > before["tokens_seen"]  # the history is still counted
        now = httpx.get(f"{url}/v1/sessions/{session}").json()
        assert now["turns"] == 3 and now["tokens_seen"] > before["tokens_seen"] and now["resident"] is True
    finally:
        proc.terminate()
        proc.wait(60)


def engine_child(pid: int) -> int:
    """The engine process a server with engine_process on started (not multiprocessing's resource tracker)."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and "spawn_main" in cmdline:
                return int(entry.name)
    raise AssertionError(f"process {pid} has no engine process")


def test_killed_engine_process_is_replaced_and_its_sessions_go_on(tmp_path, redis_url):
    """With the engine in a process of its own, SIGKILL that process mid-stream: the stream ends with an
    error event (engine_restarting) and [DONE], the server stays up, says 503 until a new engine process
    is loaded, and the session goes on from its committed record."""
    session = f"isolated-{uuid.uuid4().hex[:6]}"
    proc, url = start_server(tmp_path, redis_url, STREAMLLM_SERVER__ENGINE_PROCESS="true")
    try:
        before, stream, lines = two_turns_then_a_long_stream(url, session)
        os.kill(engine_child(proc.pid), signal.SIGKILL)
        stream.join(60)
        events = sse_events(lines)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_restarting"
        statuses = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            r = httpx.get(f"{url}/health", timeout=10)
            statuses.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.json()["error"]["code"] == "engine_restarting"
            time.sleep(0.2)
        assert statuses[-1] == 200 and 503 in statuses
        assert proc.poll() is None  # the server itself never went down
        after = httpx.get(f"{url}/v1/sessions/{session}").json()
        assert after["turns"] == 2 and after["tokens_seen"] == before["tokens_seen"]
        assert after["resident"] is False  # its KV died with the engine process
        reply = turn(url, session, "Which one is bigger?")
        assert reply["usage"]["prompt_tokens"] > before["tokens_seen"]  # rebuilt from the record
        now = httpx.get(f"{url}/v1/sessions/{session}").json()
        assert now["turns"] == 3 and now["resident"] is True
    finally:
        proc.terminate()
        proc.wait(60)
    log = next(tmp_path.glob(f"serve-{url.rsplit(':', 1)[1]}.log")).read_text()
    assert "the engine process exited" in log and "restarting it" in log


def test_sigterm_finishes_or_ends_streams_commits_and_exits(tmp_path, redis_url):
    """SIGTERM with two streams in flight: the one that can finish within the grace period finishes and is
    committed, the other ends with an error event; the process exits on its own soon after the grace."""
    grace = 3.0
    short, long = f"short-{uuid.uuid4().hex[:6]}", f"long-{uuid.uuid4().hex[:6]}"
    proc, url = start_server(tmp_path, redis_url, STREAMLLM_SERVER__SHUTDOWN_GRACE_SECONDS=str(grace))
    try:
        turn(url, short, "Hello!")
        turn(url, long, "Hello!")
        lines: dict[str, list[str]] = {short: [], long: []}
        started = {short: threading.Event(), long: threading.Event()}
        streams = [
            threading.Thread(target=stream_lines, args=(url, sid, n, started[sid], lines[sid]))
            for sid, n in ((short, 16), (long, 4000))
        ]
        for t in streams:
            t.start()
        assert all(e.wait(60) for e in started.values())
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in streams:
            t.join(grace + 30)
        # uvicorn re-raises the signal it shut down for once it is done, as supervisors expect
        assert proc.wait(grace + 30) == -signal.SIGTERM
        exited = time.monotonic() - sent
        print(f"\nSIGTERM with 2 streams in flight, grace {grace}s: exited after {exited:.1f}s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert exited < grace + 15, f"exited {exited:.1f}s after SIGTERM"
    log = next(tmp_path.glob(f"serve-{url.rsplit(':', 1)[1]}.log")).read_text()
    assert "stopped" in log and "Finished server process" in log  # a shutdown, not a death by signal
    done, cut = sse_events(lines[short]), sse_events(lines[long])
    assert done[-1] == "[DONE]" and done[-2]["choices"][0]["finish_reason"] == "length"
    assert cut[-1] == "[DONE]" and cut[-2]["error"]["code"] == "shutting_down"

    proc, url = start_server(tmp_path, redis_url)
    try:
        assert (
            httpx.get(f"{url}/v1/sessions/{short}").json()["turns"] == 2
        )  # the finished stream was committed
        assert httpx.get(f"{url}/v1/sessions/{long}").json()["turns"] == 1  # the cut one was not
        for sid in (short, long):
            turn(url, sid, "Go on.")
            assert httpx.get(f"{url}/v1/sessions/{sid}").json()["turns"] in (2, 3)
    finally:
        proc.terminate()
        proc.wait(60)


def test_chat_client_streams_and_handles_commands(live):
    out = io.StringIO()
    args = Namespace(
        base_url=live, api_key="none", session=None, model=None, system=None, max_tokens=12, temperature=0.0
    )
    chat = Chat(args, out)
    first = chat.session
    reply = chat.send("Say hello.")
    assert reply and reply in out.getvalue()
    assert chat.handle("/stats")
    assert "turns: 1" in out.getvalue()
    assert chat.handle("/reset") and chat.session != first
    assert not chat.handle("/quit")


def test_bench_multiturn_and_serve_against_a_live_server(live, capsys, tmp_path):
    plot = tmp_path / "multiturn.png"
    assert (
        main(
            [
                "bench",
                "multiturn",
                "--base-url",
                live,
                "--turns",
                "3",
                "--max-tokens",
                "6",
                "--json",
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    session, stateless = result["session"]["prefill_tokens"], result["stateless"]["prefill_tokens"]
    assert len(session) == len(stateless) == 3
    prompts = result["stateless"]["prompt_tokens"]
    assert prompts[2] > prompts[1] > prompts[0]  # the resent history grows
    assert session[2] < prompts[2] // 2  # the session prefills only the new turn
    assert 0 < stateless[2] <= prompts[2]  # the stateless resend: all but what prefix reuse copies
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        main(["bench", "serve", "--base-url", live, "--concurrency", "1,2", "--max-tokens", "8", "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"1", "2"} and all(r["tok_per_s"] > 0 for r in result.values())


def test_bench_http_overhead_alternates_the_engine_and_both_server_modes(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMLLM_ENGINE__CACHE__NUM_SLOTS", "2")
    plot = tmp_path / "http.png"
    argv = ["bench", "http-overhead", "--rounds", "2", "--tokens", "12", "--json", "--plot", str(plot)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"engine", "thread", "process"} <= set(result) and result["tokens"] == 12
    assert result["engine"]["share_of_engine"] == 1.0
    for mode in ("engine", "thread", "process"):
        rounds = result[mode]["rounds"]
        assert len(rounds) == 2 and all(0 < ms < 1000 for ms in rounds)
        assert result[mode]["ms_p50"] == pytest.approx(sorted(rounds)[0] / 2 + sorted(rounds)[1] / 2)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
