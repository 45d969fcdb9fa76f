"""Runs one frozen `BatchPlan` on the device: the only place where the model and the pool meet."""

from __future__ import annotations

import torch

from .attention import StepContext, fill_bucket, fused_decode_possible
from .batch import BatchPlan, SeqChunk, StepOutput
from .kv_pool import KVPool
from .kv_tiers import KVTiers
from .models import DecoderModel

ROW_SCORES_MAX = 1 << 16
"""Largest prompt chunk run as decode rows, in rows x entries each scores: past it the prefill's batched
matmuls win (measured on the 2-core CPU: docs/perf-notes.md)."""


def _one_row_each(c: SeqChunk) -> list[SeqChunk]:
    """A chunk as one-token chunks; with logits 'last' only its last token's are kept, with 'all' each's."""
    last = len(c.tokens) - 1
    keep = lambda j: "last" if c.logits == "all" or (j == last and c.logits == "last") else "none"  # noqa: E731
    return [SeqChunk(c.slot, c.start + j, (tok,), keep(j), c.sinks) for j, tok in enumerate(c.tokens)]


class ModelRunner:
    def __init__(self, model: DecoderModel, pool: KVPool, tiers: KVTiers | None = None) -> None:
        self.model, self.pool = model, pool
        self.device = pool.device
        self.tiers = tiers if tiers is not None else KVTiers(pool)
        """Offloaded sessions' KV: host memory, then disk, under the cache config's budgets."""
        self.rows_fused = model.fused is not None and fused_decode_possible(pool, model.spec)
        """Steps here can run on the fused kernels, so prompt chunks may join them as rows (`_all_rowable`)."""

    @torch.inference_mode()
    def run(self, plan: BatchPlan) -> StepOutput:
        """Decode rows (one token) go first, sorted by slot so that they attend over a pool view; on the fused
        CPU kernels a short prompt chunk that evicts nothing joins them, one row per token (`_rowable`)."""
        self._move_kv(plan)
        if not plan.chunks:
            return StepOutput(logits={})
        rows: list[tuple[int, SeqChunk]] = []  # (chunk index, one token of it)
        chunks: list[tuple[int, SeqChunk]] = []
        as_rows = self._all_rowable(plan.chunks)
        for i, c in enumerate(plan.chunks):
            if len(c.tokens) == 1:
                rows.append((i, c))
            elif as_rows:
                rows.extend((i, r) for r in _one_row_each(c))
            else:
                chunks.append((i, c))
        rows.sort(key=lambda e: e[1].slot)  # stable: a chunk's rows stay in stream order
        chunks.sort(key=lambda e: e[1].slot)
        order = rows + chunks
        decode, prefill = [c for _, c in rows], [c for _, c in chunks]
        ids = torch.tensor(
            [t for _, c in order for t in c.tokens], dtype=torch.long, device=self.device
        )  # [N]
        ctx = StepContext(self.pool, self.model.spec, decode, prefill, self.model.fused)
        hidden = self.model(ids, ctx)  # [N, D]
        ctx.finish(prefill)
        picked, spans = self._logit_rows([c for _, c in order])
        if not picked:
            return StepOutput(logits={})
        all_logits = self.model.logits(hidden[torch.tensor(picked, device=self.device)])  # [M, V]
        parts: dict[int, list[torch.Tensor]] = {}
        for j, (a, b) in spans.items():  # spans follow `order`, so a chunk's rows arrive in stream order
            parts.setdefault(order[j][0], []).append(all_logits[a:b])
        return StepOutput(logits={i: p[0] if len(p) == 1 else torch.cat(p) for i, p in parts.items()})

    def _all_rowable(self, chunks: tuple[SeqChunk, ...]) -> bool:
        """Whether every prompt chunk of the step runs as decode rows, on the fused kernels (all or none: a
        step with one prefill runs eagerly, where rows would gather their slot's KV each). A chunk can when
        it evicts nothing, so that writing every row's key before any row attends hides no entry an earlier
        row still sees (later rows' keys are masked by stream index), and when scoring row by row (rows x
        the slot's filled prefix) stays cheaper than the prefill's batched matmuls and its eager ops."""
        if not self.rows_fused:
            return False
        cap = self.pool.cache.capacity
        for c in chunks:
            n, end = len(c.tokens), c.start + len(c.tokens)
            if n > 1 and (end > cap or n * fill_bucket(end, cap) > ROW_SCORES_MAX):
                return False
        return True

    def _move_kv(self, plan: BatchPlan) -> None:
        """Offloads are copied by the tiers' worker while this step runs: their slots are not in the plan.
        Shares go first: their sources are never free slots, so nothing below writes one."""
        for source, slot, n in plan.share:
            self.pool.share(source, slot, n)
        for sid, slot in plan.offload:
            self.tiers.offload(sid, slot)
        for sid, slot in plan.restore:
            self.pool.restore(slot, self.tiers.take(sid))
        for slot in plan.clear:
            self.pool.clear(slot)
        for sid in plan.drop:
            self.tiers.discard(sid)

    def forget(self, slot: int, entries: torch.Tensor) -> None:
        """Mark slot entries empty: their tokens no longer count as consumed."""
        self.pool.pos[slot, entries.to(self.device)] = -1

    @staticmethod
    def _logit_rows(chunks: list[SeqChunk]) -> tuple[list[int], dict[int, tuple[int, int]]]:
        """Hidden rows that need logits, and for each chunk its span in the gathered rows."""
        rows: list[int] = []
        spans: dict[int, tuple[int, int]] = {}
        row = 0
        for j, c in enumerate(chunks):
            n = len(c.tokens)
            if c.logits == "all":
                spans[j] = (len(rows), len(rows) + n)
                rows.extend(range(row, row + n))
            elif c.logits == "last":
                spans[j] = (len(rows), len(rows) + 1)
                rows.append(row + n - 1)
            row += n
        return rows, spans
