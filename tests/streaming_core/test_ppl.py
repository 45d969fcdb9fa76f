"""Streaming perplexity: cache shapes per mode, chunked vs token by token, recompute vs transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from streaming_core.evaluation.ppl import encode_prefix, evaluate, mode_cache

from .helpers import tiny_llama, wrap

S, W = 4, 28
CAP = S + W


@pytest.fixture(scope="module")
def hf():
    return tiny_llama(seed=7)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 128, (3 * CAP + 5,), generator=torch.Generator().manual_seed(8)).tolist()


def test_mode_caches():
    assert mode_cache("dense", S, W, 500, 1024).capacity >= 500
    window = mode_cache("window", S, W, 500, 1024)
    assert (window.sink_tokens, window.window) == (0, CAP)
    sink = mode_cache("sink", S, W, 500, 1024)
    assert (sink.sink_tokens, sink.window) == (S, W)
    assert mode_cache("recompute", S, W, 500, 1024) == window
    with pytest.raises(ValueError, match="context"):
        mode_cache("dense", S, W, 2000, 1024)
    with pytest.raises(ValueError, match="context"):
        mode_cache("sink", 4, 2000, 100, 1024)
    with pytest.raises(ValueError, match="unknown mode"):
        mode_cache("bogus", S, W, 10, None)


@pytest.mark.parametrize("chunk", [7, 40])
def test_chunked_equals_token_by_token(hf, tokens, chunk):
    """Chunks straddle the sink boundary and exceed the window: every query still sees its own window."""
    modes = ["dense", "window", "sink"]
    one = evaluate(wrap(hf), tokens, modes, S, W, chunk=1, progress=False)
    many = evaluate(wrap(hf), tokens, modes, S, W, chunk=chunk, progress=False)
    for m in modes:
        torch.testing.assert_close(many[m].nll, one[m].nll, atol=1e-5, rtol=1e-5)


def test_recompute_matches_transformers_windows(hf, tokens):
    got = evaluate(wrap(hf), tokens, ["recompute"], S, W, progress=False)["recompute"].nll
    assert got.shape == (len(tokens) - 1,)
    for j in (1, 5, CAP, CAP + 1, len(tokens) - 1):
        context = torch.tensor([tokens[max(0, j - CAP) : j]])
        with torch.no_grad():
            logits = hf(context).logits[0, -1]
        expected = F.cross_entropy(logits[None], torch.tensor([tokens[j]])).double()
        torch.testing.assert_close(got[j - 1], expected, atol=1e-4, rtol=1e-4)


def test_recompute_chunk_is_an_approximation(hf, tokens):
    exact = evaluate(wrap(hf), tokens, ["recompute"], S, W, chunk=1, progress=False)["recompute"]
    approx = evaluate(wrap(hf), tokens, ["recompute"], S, W, chunk=8, progress=False)["recompute"]
    torch.testing.assert_close(approx.nll[: CAP - 8], exact.nll[: CAP - 8], atol=1e-4, rtol=1e-4)
    assert (approx.nll - exact.nll).abs().max() > 1e-3


def test_encode_prefix():
    class Chars:
        def __call__(self, text):
            return {"input_ids": [ord(c) for c in text]}

    text = "abc " * 5000
    assert encode_prefix(Chars(), text, 10) == [ord(c) for c in text[:10]]
    assert len(encode_prefix(Chars(), "short", 100)) == 5
