"""Runs one frozen `BatchPlan` on the device: the only place where the model and the pool meet."""

from __future__ import annotations

import torch

from .attention import StepContext
from .batch import BatchPlan, SeqChunk, StepOutput
from .kv_pool import KVPool
from .kv_tiers import KVTiers
from .models import DecoderModel


class ModelRunner:
    def __init__(self, model: DecoderModel, pool: KVPool, tiers: KVTiers | None = None) -> None:
        self.model, self.pool = model, pool
        self.device = pool.device
        self.tiers = tiers if tiers is not None else KVTiers(pool)
        """Offloaded sessions' KV: host memory, then disk, under the cache config's budgets."""

    @torch.inference_mode()
    def run(self, plan: BatchPlan) -> StepOutput:
        """Decode rows (one token) go first, sorted by slot so that they attend over a pool view."""
        self._move_kv(plan)
        if not plan.chunks:
            return StepOutput(logits={})
        order = sorted(
            range(len(plan.chunks)), key=lambda i: (len(plan.chunks[i].tokens) > 1, plan.chunks[i].slot)
        )
        chunks = [plan.chunks[i] for i in order]
        decode = [c for c in chunks if len(c.tokens) == 1]
        prefill = [c for c in chunks if len(c.tokens) > 1]
        ids = torch.tensor([t for c in chunks for t in c.tokens], dtype=torch.long, device=self.device)  # [N]
        ctx = StepContext(self.pool, self.model.spec, decode, prefill, self.model.fused)
        hidden = self.model(ids, ctx)  # [N, D]
        ctx.finish(prefill)
        rows, spans = self._logit_rows(chunks)
        logits: dict[int, torch.Tensor] = {}
        if rows:
            all_logits = self.model.logits(hidden[torch.tensor(rows, device=self.device)])  # [M, V]
            for j, (a, b) in spans.items():
                logits[order[j]] = all_logits[a:b]
        return StepOutput(logits=logits)

    def _move_kv(self, plan: BatchPlan) -> None:
        """Offloads are copied by the tiers' worker while this step runs: their slots are not in the plan."""
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
