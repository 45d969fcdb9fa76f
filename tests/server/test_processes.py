"""Real `streamllm serve` processes: a SIGKILL'd server's sessions go on after a restart, and the client
commands (chat, bench multiturn, bench serve) work against a live server."""

from __future__ import annotations

import io
import json
import signal
import uuid
from argparse import Namespace
from collections.abc import Iterator

import httpx
import pytest

from server.cli import main
from server.client.chat import Chat

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


def test_sigkilled_server_sessions_continue_after_restart(tmp_path, redis_url):
    session = f"survivor-{uuid.uuid4().hex[:6]}"
    proc, url = start_server(tmp_path, redis_url)
    try:
        turn(url, session, "Tell me about the moon.")
        turn(url, session, "And about the sun?")
        before = httpx.get(f"{url}/v1/sessions/{session}").json()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert before["turns"] == 2
    proc, url = start_server(tmp_path, redis_url)
    try:
        after_restart = httpx.get(f"{url}/v1/sessions/{session}").json()
        assert after_restart["turns"] == 2 and after_restart["tokens_seen"] == before["tokens_seen"]
        assert after_restart["resident"] is False
        reply = turn(url, session, "Which one is bigger?")
        assert reply["session_id"] == session
        assert reply["usage"]["prompt_tokens"] > before["tokens_seen"]  # the history is still counted
        now = httpx.get(f"{url}/v1/sessions/{session}").json()
        assert now["turns"] == 3 and now["tokens_seen"] > before["tokens_seen"] and now["resident"] is True
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
    assert session[2] < stateless[2]  # the session prefills only the new turn
    assert stateless[2] > stateless[1] > stateless[0]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        main(["bench", "serve", "--base-url", live, "--concurrency", "1,2", "--max-tokens", "8", "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"1", "2"} and all(r["tok_per_s"] > 0 for r in result.values())
