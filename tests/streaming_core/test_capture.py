"""The decode step is capturable: torch.compile(fullgraph=True) traces it with no graph break, for each
bucketed batch size, and the compiled step equals the eager one (what CUDA graphs need on a GPU).

`aot_eager` runs dynamo and AOT autograd (functionalising the in-place KV writes) without generating
C++, so the check stays fast on CI's CPU; the inductor backend compiles the same graph.
"""

from __future__ import annotations

import pytest
import torch

from streaming_core.attention import StepContext
from streaming_core.batch import SeqChunk
from streaming_core.config import CacheConfig
from streaming_core.kv_pool import KVPool
from streaming_core.models import build_model

from .helpers import tiny_llama

CACHE = CacheConfig(sink_tokens=4, window=28, num_slots=4)


def _pool(model) -> KVPool:
    return KVPool(CACHE, model.kv_shape, torch.float32, torch.device("cpu"))


def _decode(model, pool: KVPool, fn, batch: int, start: int) -> torch.Tensor:
    chunks = [SeqChunk(i, start, (7 + 3 * i + start,)) for i in range(batch)]
    ids = torch.tensor([c.tokens[0] for c in chunks])  # [B]
    with torch.no_grad():
        return fn(ids, StepContext(pool, model.spec, chunks, []))  # [B, V]


@pytest.mark.parametrize("weights", ["dense", "int8"])
def test_decode_step_compiles_fullgraph_and_equals_eager(weights):
    model = build_model(tiny_llama(), torch.float32, "cpu")
    model.prepare(weights)

    def step(ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return model.project(model.forward(ids, ctx))

    for batch in (1, 4):
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        eager_pool, compiled_pool = _pool(model), _pool(model)
        # 12 steps cross two fill buckets (16, 32 entries) and evict past the 32-entry capacity at the end
        for start in range(0, 40, 3):
            want = _decode(model, eager_pool, step, batch, start)
            got = _decode(model, compiled_pool, compiled, batch, start)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(compiled_pool.k, eager_pool.k)
        torch.testing.assert_close(compiled_pool.pos, eager_pool.pos)


def test_same_bucket_does_not_recompile():
    """Positions and slots are tensors, not constants: steps within one bucket reuse the graph."""
    model = build_model(tiny_llama(), torch.float32, "cpu")
    model.prepare("dense")
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda ids, ctx: model.project(model.forward(ids, ctx)), fullgraph=True, backend="aot_eager"
    )
    pool = _pool(model)
    _decode(model, pool, compiled, 2, 0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for start in range(1, 12):  # extents 2..12 all fall in the 16-entry bucket
            _decode(model, pool, compiled, 2, start)
