"""The `streamllm` command in-process, on a tiny random Llama with a tiny trained tokenizer."""

from __future__ import annotations

import csv
import json

import pytest

from streaming_core import cli
from streaming_core.cli import main

from .cli_fixtures import make_model_dir, make_text

MODES = ["dense", "window", "sink", "recompute"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    text = make_text()
    (root / "text.txt").write_text(text)
    return root, make_model_dir(root, text)


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def eval_ppl(env, max_tokens: int, *extra: str) -> int:
    root, model = env
    args = ["eval", "ppl", "--text", str(root / "text.txt"), "--modes", ",".join(MODES)]
    args += ["--sinks", "4", "--window", "28", "--max-tokens", str(max_tokens), "--model", str(model)]
    return main([*args, "--json", "--no-progress", *extra])


def test_eval_ppl_outputs(env, capsys, tmp_path):
    plot, table = tmp_path / "ppl.png", tmp_path / "nll.csv"
    assert eval_ppl(env, 150, "--plot", str(plot), "--csv", str(table)) == 0
    result = last_json(capsys)
    assert list(result) == MODES
    for r in result.values():
        assert (
            set(r) == {"ppl", "nll", "tokens", "seconds", "tokens_per_s"}
            and r["tokens"] == 149
            and r["ppl"] > 1
        )
    assert plot.read_bytes()[:8] == PNG_MAGIC
    rows = list(csv.reader(table.open()))
    assert rows[0] == ["position", *MODES] and len(rows) == 150
    # past capacity (32 tokens), dropping the sinks changes the scores
    assert result["window"]["ppl"] != pytest.approx(result["sink"]["ppl"], rel=1e-4)


def test_within_capacity_every_mode_is_dense(env, capsys):
    """While the text fits in sinks + window nothing is evicted: every mode scores like dense. Sink scores
    use a separate matmul for the sink keys, and token-by-token decode runs the fused CPU kernels (their
    own summation order), hence float rounding, not bit equality. Dense weights: a quantized precision's
    kernels differ per row bucket (int8 activations at one row, bf16 at many), and the modes score in
    different buckets."""
    assert eval_ppl(env, 30, "--weights", "dense") == 0
    result = last_json(capsys)
    dense = result["dense"]["ppl"]
    assert result["window"]["ppl"] == pytest.approx(dense, rel=1e-6)
    assert result["sink"]["ppl"] == pytest.approx(dense, rel=1e-6)
    assert result["recompute"]["ppl"] == pytest.approx(dense, rel=1e-6)


def test_eval_ppl_refuses_cache_beyond_context(env):
    with pytest.raises(ValueError, match="context"):
        eval_ppl(env, 150, "--window", "2000")


def test_bench_latency(env, capsys, tmp_path):
    _, model = env
    plot = tmp_path / "latency.png"
    args = ["bench", "latency", "--cache-sizes", "16,32", "--tokens", "3", "--recompute-tokens", "2"]
    assert main([*args, "--model", str(model), "--json", "--plot", str(plot)]) == 0
    result = last_json(capsys)
    keys = {"streaming_ms", "recompute_ms", "speedup", "streaming_mem_mb", "recompute_mem_mb"}
    assert list(result) == ["16", "32"]
    for r in result.values():
        assert set(r) == keys and r["streaming_ms"] > 0 and r["recompute_ms"] > 0
        assert r["speedup"] == pytest.approx(r["recompute_ms"] / r["streaming_ms"])
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "eval" in out and "bench" in out


def test_broken_command_module_is_left_out(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, "streaming_core.no_such_command"])
    parser = cli.build_parser()
    assert "no_such_command" in capsys.readouterr().err
    assert parser.parse_args(["bench", "latency"]).cache_sizes == "256,512,1024"


def test_top_level_command_has_core_and_server_commands(capsys):
    from server.cli import build_parser

    parser = build_parser()
    assert "unavailable" not in capsys.readouterr().err
    assert parser.parse_args(["bench", "latency"]).func is not None
    assert parser.parse_args(["serve", "--port", "0"]).command == "serve"
    for bench in ("serve", "multiturn", "soak", "decode", "memory"):
        assert callable(parser.parse_args(["bench", bench]).func)
