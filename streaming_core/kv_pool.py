"""The sink+window KV pool: one preallocated tensor pair for every slot, written by index.

Layout: keys and values are [layers, slots, kv_heads, capacity, head_dim]; `pos` [slots, capacity]
holds the stream index of each entry (-1 when empty). Entry j < S is sink token j; entries S.. form
the window ring (see positions.py). Keys are stored already rotated by their stream index.
Nothing here is allocated per step: eviction is the ring overwriting its oldest entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import CacheConfig


@dataclass(frozen=True)
class KVShape:
    """Per-model dimensions of one KV entry."""

    layers: int
    kv_heads: int
    head_dim: int


@dataclass
class SlotSnapshot:
    """A slot's KV copied to host memory (kv_tiers.py), restorable into any free slot."""

    k: torch.Tensor  # [layers, kv_heads, capacity, head_dim]
    v: torch.Tensor  # [layers, kv_heads, capacity, head_dim]
    pos: torch.Tensor  # [capacity]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes


class KVPool:
    """Owns the device tensors; slot allocation bookkeeping lives with the sessions, not here."""

    def __init__(
        self,
        cache: CacheConfig,
        shape: KVShape,
        dtype: torch.dtype,
        device: torch.device,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.cache = cache
        self.shape = shape
        self.dtype = dtype
        """The activations' dtype: what attention computes in."""
        self.kv_dtype = kv_dtype or dtype
        """What keys and values are stored in (bf16 halves the bytes every decode row reads)."""
        self.device = device
        dims = (shape.layers, cache.num_slots, shape.kv_heads, cache.capacity, shape.head_dim)
        self.k = torch.zeros(dims, dtype=self.kv_dtype, device=device)  # [L, slots, kvh, cap, hd]
        self.v = torch.zeros(dims, dtype=self.kv_dtype, device=device)  # [L, slots, kvh, cap, hd]
        self.layer_k, self.layer_v = list(self.k.unbind(0)), list(self.v.unbind(0))
        """Per layer, views [slots, kvh, cap, hd] made once: a decode step indexes them 4x per layer."""
        self.layer_k_rows = [k.view(-1, shape.head_dim) for k in self.layer_k]
        self.layer_v_rows = [v.view(-1, shape.head_dim) for v in self.layer_v]
        """Per layer, the same memory as rows [slots * kvh * cap, hd] (where decode writes its new keys)."""
        self.pos = torch.full((cache.num_slots, cache.capacity), -1, dtype=torch.long, device=device)
        self.extent = [0] * cache.num_slots
        """Per slot, on the host: entries [0, extent) may be filled, the rest are empty. A slot fills from
        entry 0 (stream token t < capacity sits at entry t), so attention reads only this prefix."""

    @property
    def bytes_per_slot(self) -> int:
        """capacity x layers x 2 x kv_heads x head_dim x dtype size."""
        s = self.shape
        return self.cache.capacity * s.layers * 2 * s.kv_heads * s.head_dim * self.k.element_size()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes

    def clear(self, slot: int) -> None:
        """Forget a slot's tokens; the tensors stay allocated."""
        self.pos[slot] = -1
        self.extent[slot] = 0

    def share(self, source: int, slot: int, n: int) -> None:
        """Make `slot` hold `source`'s first n entries and nothing else (stream tokens 0..n-1 at entries 0..n-1)."""
        if source != slot:
            self.k[:, slot, :, :n].copy_(self.k[:, source, :, :n])
            self.v[:, slot, :, :n].copy_(self.v[:, source, :, :n])
            self.pos[slot, :n].copy_(self.pos[source, :n])
        self.pos[slot, n:] = -1
        self.extent[slot] = n

    def restore(self, slot: int, snap: SlotSnapshot) -> None:
        """Write a snapshot into a (possibly different) slot: keys do not depend on the slot index."""
        self.k[:, slot].copy_(snap.k, non_blocking=True)
        self.v[:, slot].copy_(snap.v, non_blocking=True)
        self.pos[slot].copy_(snap.pos)
        filled = torch.nonzero(snap.pos >= 0)
        self.extent[slot] = int(filled.max()) + 1 if filled.numel() else 0

    def note_written(self, slot: int, last_stream_index: int) -> None:
        """Grow the slot's extent for tokens written up to this stream index (host ints, no device sync)."""
        reach = min(last_stream_index + 1, self.cache.capacity)
        self.extent[slot] = max(self.extent[slot], reach)

    def write_positions(self, slots: torch.Tensor, entries: torch.Tensor, stream_idx: torch.Tensor) -> None:
        """Record which stream token each written entry now holds."""
        self.pos.index_put_((slots, entries), stream_idx)
