"""StreamEval: the generator, the scoring, the engine backends (tiny random Llama) and the command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from streaming_core.cli import main
from streaming_core.config import CacheConfig
from streaming_core.evaluation.stream_backends import EngineStream, RecomputeStream, Renderer
from streaming_core.evaluation.streameval import (
    PREAMBLE,
    StreamFull,
    answer_of,
    make_records,
    make_turns,
    run_stream,
    summary,
    user_text,
)
from streaming_core.evaluation.streameval_cli import sampling
from streaming_core.models import build_model

from .cli_fixtures import make_model_dir
from .helpers import tiny_llama

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RECORD = re.compile(r"line (\S+): REGISTER_CONTENT is <(\d+)>")


def test_records_are_seeded_distinct_and_free_of_digits_in_names():
    records = make_records(300, seed=1)
    assert records == make_records(300, seed=1) and records != make_records(300, seed=2)
    assert len({r.name for r in records}) == 300
    assert all(not re.search(r"\d", r.name) and 10000 <= r.value <= 99999 for r in records)
    assert RECORD.fullmatch(records[0].line.strip()).groups() == (records[0].name, str(records[0].value))


def test_turns_ask_for_the_line_lag_back_after_every_batch():
    records = make_records(45)
    turns = make_turns(records, lag=20, every=10)
    assert [t.lines_seen for t in turns] == [20, 30, 40]
    assert [t.target for t in turns] == [0, 10, 20]
    assert [r for t in turns for r in t.lines] == records[:40]  # every line sent once, in order
    assert all(t.record == records[t.target] for t in turns)
    assert [t.target for t in make_turns(records, lag=1, every=10)] == [9, 19, 29, 39]
    with pytest.raises(ValueError, match="lines back"):
        make_turns(records[:5], lag=20)
    with pytest.raises(ValueError, match=">= 1"):
        make_turns(records, lag=0)


def test_user_text_and_answers():
    turn = make_turns(make_records(20), lag=20, every=10)[0]
    raw = user_text(turn, "raw", first=True)
    assert raw.startswith(PREAMBLE) and raw.endswith(f"line {turn.record.name}: REGISTER_CONTENT is <")
    assert user_text(turn, "raw", first=False).startswith("\n")
    assert turn.record.name in user_text(turn, "chat", first=False)
    with pytest.raises(ValueError, match="unknown format"):
        user_text(turn, "xml", first=True)
    assert answer_of("51234>") == 51234
    assert answer_of("The value is 7 or 8") == 7
    assert answer_of("no idea") is None


class RecentLines:
    """A reader that remembers only the last `keep` characters of the stream, and answers from them."""

    def __init__(self, keep: int, limit: int | None = None) -> None:
        self.keep, self.limit, self.text, self.tokens = keep, limit, "", 0

    def ask(self, text: str) -> str:
        if self.limit is not None and len(self.text) + len(text) > self.limit:
            raise StreamFull
        self.text += text
        self.tokens = len(self.text)
        name = re.findall(r"in line (\S+)\?", text)[-1]
        seen = dict(RECORD.findall(self.text[-self.keep :]))
        return seen.get(name, "?")


def test_scoring_follows_what_the_reader_still_holds():
    turns = make_turns(make_records(200), lag=20, every=10)
    lines = sum(len(r.line) for r in make_records(200)[:30])
    good = run_stream(RecentLines(keep=lines), turns, "raw")
    assert len(good) == len(turns) and all(r.correct for r in good)
    forgetful = run_stream(RecentLines(keep=lines // 3), turns, "raw")  # 20 lines back is gone
    assert not any(r.correct for r in forgetful)
    short = run_stream(RecentLines(keep=10**9, limit=4000), turns, "raw")
    assert 0 < len(short) < len(turns)  # a full backend ends its mode early
    s = summary(good, group=5)
    assert s["accuracy"] == 1.0 and s["queries"] == len(turns) and s["lines"] == 200
    assert [p["lines"] for p in s["curve"]] == [60, 110, 160, 200]  # the last query of each group of 5
    assert s["curve"][-1]["tokens"] == good[-1].tokens
    mixed = [*good[:3], *forgetful[3:4]]
    assert summary(mixed, group=2)["curve"][1]["accuracy"] == 0.5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with a BPE tokenizer trained on StreamEval text."""
    from transformers import AutoTokenizer

    text = "".join(user_text(t, "raw", i == 0) for i, t in enumerate(make_turns(make_records(400), 20, 10)))
    directory = make_model_dir(tmp_path_factory.mktemp("streameval"), text, vocab_size=256)
    hf = tiny_llama(seed=3, vocab_size=256)
    return build_model(hf, torch.float32, "cpu"), AutoTokenizer.from_pretrained(directory), directory


def stream(tiny, cache: CacheConfig, kind=EngineStream, limit: int | None = None) -> EngineStream:
    model, tok, _ = tiny
    return kind(model, tok, {2}, cache, sampling("raw"), "raw", limit)


def test_engine_modes_agree_while_the_stream_fits(tiny):
    turns = make_turns(make_records(30), lag=20, every=5)
    big = {
        "sink": stream(tiny, CacheConfig(4, 1000)),
        "window": stream(tiny, CacheConfig(0, 1004)),
        "dense": stream(tiny, CacheConfig(0, 1004), limit=1004),
        "recompute": stream(tiny, CacheConfig(0, 1004), RecomputeStream),
    }
    replies = {m: [b.ask(user_text(t, "raw", i == 0)) for i, t in enumerate(turns)] for m, b in big.items()}
    assert big["sink"].tokens < 1000  # nothing was evicted: every mode reads the same stream
    assert replies["sink"] == replies["window"] == replies["dense"] == replies["recompute"]
    assert len({b.tokens for b in big.values()}) == 1
    small = {"sink": stream(tiny, CacheConfig(4, 60)), "window": stream(tiny, CacheConfig(0, 64))}
    for backend in small.values():
        run_stream(backend, turns, "raw")
        stats = backend.engine.stats("streameval")
        assert stats is not None and stats.tokens_seen == backend.tokens and stats.evicted > 0
        assert stats.cache_tokens == 64


def test_dense_stops_at_its_limit(tiny):
    turns = make_turns(make_records(100), lag=20, every=10)
    dense = stream(tiny, CacheConfig(0, 1024), limit=600)
    results = run_stream(dense, turns, "raw")
    assert 0 < len(results) < len(turns) and dense.tokens <= 600


def test_chat_deltas_add_up_to_the_rendered_conversation():
    from transformers import AutoTokenizer

    from streaming_core.loader import cached_gguf_dir, default_gguf_path

    tok = AutoTokenizer.from_pretrained(cached_gguf_dir(default_gguf_path()))
    render = Renderer(tok, "chat")
    pieces = [render.delta("first lines"), "reply one"]
    render.replied("reply one")
    pieces.append(render.delta("more lines"))
    messages = [
        {"role": "user", "content": "first lines"},
        {"role": "assistant", "content": "reply one"},
        {"role": "user", "content": "more lines"},
    ]
    assert "".join(pieces) == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert Renderer(tok, "raw").delta("as is") == "as is"


def test_eval_streameval_command(tiny, tmp_path, capsys):
    _, _, directory = tiny
    plot = tmp_path / "streameval.png"
    args = ["eval", "streameval", "--modes", "sink,window,dense,recompute", "--lines", "50"]
    args += ["--sinks", "4", "--window", "124", "--recompute-lines", "30", "--group", "2", "--no-progress"]
    assert main([*args, "--model", str(directory), "--json", "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(out) == ["sink", "window", "dense", "recompute"]
    for mode, s in out.items():
        assert 0.0 <= s["accuracy"] <= 1.0 and s["curve"], mode
    assert out["sink"]["queries"] == 4 and out["recompute"]["queries"] == 2
    assert out["sink"]["tokens"] > 128  # the stream outgrew the cache
    assert Path(plot).read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="unknown mode"):
        main(["eval", "streameval", "--modes", "bogus", "--model", str(directory), "--no-progress"])
