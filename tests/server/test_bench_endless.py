"""`bench endless` and `eval streameval --base-url`: long single-session streams through real HTTP, on a
tiny random model behind the real app (uvicorn, embedded Redis, the openai SDK as the client)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.cli import main
from server.client.bench_endless import counter_checks, degenerate, p99, spans
from server.client.bench_multiturn import user_messages

from .conftest_http import LiveServer, make_settings
from .tiny import tiny_engine

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Iterator[LiveServer]:
    server = LiveServer(
        make_settings(tmp_path_factory.mktemp("endless")), tiny_engine(tokenizer, num_slots=2)
    )
    yield server
    server.stop()


def last_json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_interleaved_turns_take_the_books_in_turn(tmp_path: Path) -> None:
    """Turn i reads book i mod 3, each from where its last passage stopped: every span mixes the books alike
    (the endless benchmark compares its first and last spans); without interleaving the books follow
    each other as one text."""
    books = []
    for name in ("a", "b", "c"):
        books.append(tmp_path / f"{name}.txt")
        books[-1].write_text(" ".join(f"{name}{i}" for i in range(50)))
    turns = user_messages(6, 2, tuple(books), ("Q?",), interleave=True)
    assert [t.split()[0][0] for t in turns] == ["a", "b", "c", "a", "b", "c"]
    assert turns[0].startswith("a0 a1\n") and turns[3].startswith("a2 a3\n")  # 1000 % 50 == 0: from word 0
    plain = user_messages(3, 2, tuple(books), ("Q?",))
    assert [t.split()[0] for t in plain] == ["c0", "c2", "c4"]  # one 150-word text, from word 1000 % 150


def test_degenerate_replies() -> None:
    assert degenerate("", []) and degenerate("  \n", ["  \n"])
    assert degenerate("the the the", ["the", " the", " the"]) is False  # distinct token strings
    assert degenerate("!!!!", ["!", "!", "!", "!"])
    assert not degenerate("Elizabeth smiled.", ["Elizabeth", " smiled", "."]) and not degenerate("x", ["x"])


def turn(prompt: int, cached: int, completion: int, ttft: float = 0.1) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "completion_tokens": completion,
        "ttft_s": ttft,
        "itl_s": [0.01, 0.02],
        "degenerate": False,
    }


def test_counter_checks_catch_a_session_that_disagrees_with_its_turns() -> None:
    turns = [turn(100, 0, 5), turn(150, 104, 5), turn(210, 154, 5)]
    info = {
        "turns": 3,
        "tokens_seen": 214,
        "cache_tokens": 256,
        "sink_tokens": 4,
        "window": 252,
        "rebuilds": 0,
    }
    assert all(counter_checks(turns, info).values())
    assert not counter_checks(turns, {**info, "turns": 2})["turns"]
    assert not counter_checks(turns, {**info, "tokens_seen": 300})["tokens_seen_follows_last_turn"]
    resent = [turn(100, 0, 5), turn(250, 0, 5), turn(210, 154, 5)]  # turn 2 was not served from the session
    checks = counter_checks(resent, info)
    assert not checks["every_turn_cached"] and not checks["cached_follows_previous_turn"]
    assert not counter_checks(turns, {**info, "cache_tokens": 200})["cache_full"]


def test_spans_and_percentiles() -> None:
    turns = [turn(100 * i, 0, 4, ttft=0.1 * i) for i in range(1, 21)]
    rows = spans(turns, [(0, 100.0), (10, 110.0), (20, 120.0)], size=10)
    assert [r["turns"] for r in rows] == ["1-10", "11-20"]
    assert [r["rss_mb"] for r in rows] == [110.0, 120.0]
    assert rows[1]["stream_tokens"] == 2004
    assert rows[0]["ttft_p99_ms"] == pytest.approx(p99([0.1 * i for i in range(1, 11)]) * 1000)
    assert 0.9 < p99([float(i) for i in range(1, 11)]) / 10 <= 1.0


def test_bench_endless_against_a_running_server(
    live: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "endless.png"
    args = ["bench", "endless", "--base-url", live.url, "--turns", "24", "--span", "8", "--words", "30"]
    assert main([*args, "--max-tokens", "4", "--rss-every", "4", "--json", "--plot", str(plot)]) == 0
    result = last_json(capsys)
    assert all(result["counters"].values()), result["counters"]
    assert result["turns"] == 24 and result["session"]["turns"] == 24
    assert result["stream_tokens"] > 1000 and result["session"]["evicted"] > 0  # far past the 256-token cache
    assert [r["turns"] for r in result["spans"]] == ["1-8", "9-16", "17-24"]
    assert result["ttft_p99_last_over_first"] > 0 and 0 <= result["degenerate_share"] <= 1
    assert plot.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("fmt", ["raw", "chat"])
def test_streameval_through_the_api_is_one_session(
    live: LiveServer, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "streameval", "--base-url", live.url, "--lines", "60", "--format", fmt, "--no-progress"]
    assert main([*args, "--json"]) == 0
    out = last_json(capsys)["http"]
    assert out["queries"] == 5 and 0.0 <= out["accuracy"] <= 1.0
    sessions = httpx.get(f"{live.url}/v1/sessions").json()["data"]
    mine = [s for s in sessions if s["id"].startswith("streameval-") and s["tokens_seen"] == out["tokens"]]
    assert len(mine) == 1 and mine[0]["turns"] == 5 and mine[0]["evicted"] > 0, sessions
