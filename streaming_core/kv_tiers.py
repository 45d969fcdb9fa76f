"""Bounded tiers below the device pool: offloaded sessions' KV in host memory, then on disk, then nowhere.

An idle session's slot is copied to host memory; when the host tier is over its byte budget its least
recently offloaded entries are written to disk, and when the disk tier is over budget (or a write fails)
the oldest are dropped: the engine forgets those sessions and their next turn rebuilds them from sinks and
tail. A session's next turn takes its KV straight back to a slot, from whichever tier holds it.

Thread model: the engine thread calls `offload`, `claim`, `take`, `discard`; one worker thread does the
slot copies and the disk writes, so the running batch never waits on them. A slot handed to `offload` is
read by the worker until `finished_slots()` returns it: the scheduler must not reuse it before. Budgets
are strict: room is made in the host tier before a slot is copied into it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .kv_disk import CorruptEntry, read_entry, write_entry
from .kv_pool import KVPool, SlotSnapshot

log = logging.getLogger(__name__)


@dataclass
class TierCounts:
    """Sessions and bytes per tier now, and what moved between tiers so far (monotonic counters)."""

    host_sessions: int = 0
    host_bytes: int = 0
    disk_sessions: int = 0
    disk_bytes: int = 0
    demotions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("host", "disk", "none"), 0))
    """Entries moved down, by the tier they went to ('none': dropped, rebuilt on the next turn)."""
    promotions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("host", "disk"), 0))
    """Entries taken back to a slot, by the tier they came from."""
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("write", "read"), 0))
    """Disk writes that failed (full, unwritable) and reads that failed validation: both dropped."""
    slot_sessions: int = 0
    slot_bytes: int = 0
    """Filled in by the engine, which knows which sessions hold a slot."""


class KVTiers:
    def __init__(self, pool: KVPool, disk_dir: Path | None = None) -> None:
        cache = pool.cache
        self.pool = pool
        self.host_budget, self.disk_budget = cache.host_budget_bytes, cache.disk_budget_bytes
        self.disk_dir = disk_dir if disk_dir is not None and self.disk_budget > 0 else None
        self.geometry = {
            "layers": pool.shape.layers,
            "kv_heads": pool.shape.kv_heads,
            "head_dim": pool.shape.head_dim,
            "capacity": cache.capacity,
            "dtype": str(pool.dtype),
        }
        self._pin = pool.device.type == "cuda"
        self._stream = torch.cuda.Stream(pool.device) if self._pin else None
        self._host: OrderedDict[str, SlotSnapshot] = OrderedDict()  # least recently offloaded first
        self._moving: dict[str, SlotSnapshot] = {}  # popped from host, being written to disk
        self._disk: OrderedDict[str, int] = OrderedDict()  # file sizes, least recently offloaded first
        self._staged: dict[str, SlotSnapshot] = {}  # claimed for this step's restores
        self._pending: dict[str, Future[None]] = {}
        self._cancelled: set[str] = set()
        self._slots_done: list[int] = []
        self._dropped: list[str] = []
        self.counts = TierCounts()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamllm-kv-tiers")
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            self._wipe()  # no session outlives its engine: what an earlier process left here is garbage

    @property
    def entry_bytes(self) -> int:
        return self.pool.bytes_per_slot + self.pool.pos[0].nbytes

    # -- engine thread -----------------------------------------------------------------------------
    def offload(self, session_id: str, slot: int) -> None:
        """Copy a slot down on the worker; the slot comes back through `finished_slots()`."""
        ready = None
        if self._stream is not None:  # the copy must see every write already queued on the compute stream
            ready = torch.cuda.Event()
            ready.record()
        with self._lock:  # registered before the worker can finish and unregister it
            self._pending[session_id] = self._worker.submit(self._offload, session_id, slot, ready)

    def claim(self, session_id: str) -> bool:
        """Ready a session's KV for `take` in this step (waits for its copy, reads its file); False: gone."""
        job = self._pending.get(session_id)
        if job is not None:
            job.result()
        with self._lock:
            snap = self._host.pop(session_id, None) or self._moving.pop(session_id, None)
            size = self._disk.pop(session_id, None) if snap is None else None
            if snap is not None:
                self.counts.promotions["host"] += 1
        if snap is None and size is not None:
            snap = self._read(session_id)
        if snap is None:
            return False
        self._staged[session_id] = snap
        return True

    def take(self, session_id: str) -> SlotSnapshot:
        """The snapshot `claim` readied (the runner restores it into a slot)."""
        return self._staged.pop(session_id)

    def discard(self, session_id: str) -> None:
        """Forget a session's copy in every tier (closed, or its turn rebuilt it)."""
        with self._lock:
            if session_id in self._pending:
                self._cancelled.add(session_id)
            self._host.pop(session_id, None)
            self._moving.pop(session_id, None)
            on_disk = self._disk.pop(session_id, None) is not None
        self._staged.pop(session_id, None)
        if on_disk:
            self._path(session_id).unlink(missing_ok=True)

    def where(self, session_id: str) -> str | None:
        """'host' or 'disk' while a copy is held (an unfinished copy counts as host); None otherwise."""
        with self._lock:
            if session_id in self._disk:
                return "disk"
            held = session_id in self._host or session_id in self._moving or session_id in self._staged
            return "host" if held or session_id in self._pending else None

    def finished_slots(self) -> list[int]:
        """Slots whose copy is done since the last call: free for reuse."""
        with self._lock:
            slots, self._slots_done = self._slots_done, []
        return slots

    def dropped(self) -> list[str]:
        """Sessions dropped from the last tier since the last call: the engine forgets them."""
        with self._lock:
            ids, self._dropped = self._dropped, []
        return ids

    def wait(self, timeout: float) -> None:
        """Block until the worker finishes a copy (or timeout): for a step with nothing to run but a slot draining."""
        with self._done:
            if not self._slots_done and self._pending:
                self._done.wait(timeout)

    def flush(self) -> None:
        """Wait for every pending copy and write."""
        for job in list(self._pending.values()):
            job.result()

    def snapshot_counts(self) -> TierCounts:
        with self._lock:
            c = self.counts
            return TierCounts(
                len(self._host) + len(self._moving),
                self._host_bytes(),
                len(self._disk),
                sum(self._disk.values()),
                dict(c.demotions),
                dict(c.promotions),
                dict(c.errors),
            )

    def close(self) -> None:
        """Stop the worker and delete the disk tier's files (the engine holds no session any more)."""
        self._worker.shutdown(wait=True)
        self._wipe()

    # -- worker thread -----------------------------------------------------------------------------
    def _offload(self, session_id: str, slot: int, ready: Any) -> None:
        try:
            fits = self.entry_bytes <= self.host_budget
            if fits:
                self._make_room(self.entry_bytes)
            snap = self._copy(slot, ready) if fits or self.disk_dir is not None else None
            with self._lock:
                cancelled = session_id in self._cancelled
                if snap is not None and fits and not cancelled:
                    self._host[session_id] = snap
                    self.counts.demotions["host"] += 1
            if snap is not None and not fits and not cancelled:
                self._to_disk(session_id, snap, direct=True)
            elif snap is None:
                self._drop(session_id)
        except Exception:  # a failed copy must still hand the slot back; the session is rebuilt
            log.exception("offload of session %s failed", session_id)
            self._drop(session_id)
        finally:
            with self._done:
                self._pending.pop(session_id, None)
                self._cancelled.discard(session_id)
                self._slots_done.append(slot)
                self._done.notify_all()

    def _copy(self, slot: int, ready: Any) -> SlotSnapshot:
        p = self.pool
        k = torch.empty(p.k[:, slot].shape, dtype=p.dtype, pin_memory=self._pin)  # [L, kvh, cap, hd]
        v = torch.empty(p.v[:, slot].shape, dtype=p.dtype, pin_memory=self._pin)  # [L, kvh, cap, hd]
        pos = torch.empty(p.pos[slot].shape, dtype=p.pos.dtype)  # [cap]
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                k.copy_(p.k[:, slot], non_blocking=True)
                v.copy_(p.v[:, slot], non_blocking=True)
                pos.copy_(p.pos[slot])
            self._stream.synchronize()
        else:
            k.copy_(p.k[:, slot])
            v.copy_(p.v[:, slot])
            pos.copy_(p.pos[slot])
        return SlotSnapshot(k=k, v=v, pos=pos)

    def _make_room(self, need: int) -> None:
        """Demote least recently offloaded host entries until `need` more bytes fit in the host budget."""
        while True:
            with self._lock:
                if self._host_bytes() + need <= self.host_budget or not self._host:
                    return
                sid, snap = self._host.popitem(last=False)
                self._moving[sid] = snap  # still counted as host memory until written
            self._to_disk(sid, snap, direct=False)

    def _to_disk(self, session_id: str, snap: SlotSnapshot, direct: bool) -> None:
        """Write an entry popped from host (`direct`: straight from its slot) and file it under the disk
        tier, unless the engine claimed or discarded it meanwhile."""

        def ours() -> bool:
            return session_id not in self._cancelled if direct else session_id in self._moving

        if self.disk_dir is None or self.entry_bytes > self.disk_budget:
            self._drop(session_id)
            return
        self._trim_disk(self.entry_bytes + 4096)  # a header is well under 4 KiB
        path = self._path(session_id)
        try:
            size = write_entry(path, session_id, snap, self.geometry)
        except OSError as e:
            log.warning("disk KV tier: writing session %s failed (%s); it will be rebuilt", session_id, e)
            with self._lock:
                self.counts.errors["write"] += 1
            self._drop(session_id)
            return
        with self._lock:
            keep = ours()
            self._moving.pop(session_id, None)
            if keep:
                self._disk[session_id] = size
                self.counts.demotions["disk"] += 1
        if not keep:  # claimed or discarded while it was being written
            path.unlink(missing_ok=True)

    def _trim_disk(self, need: int) -> None:
        while True:
            with self._lock:
                if sum(self._disk.values()) + need <= self.disk_budget or not self._disk:
                    return
                sid, _ = self._disk.popitem(last=False)
            self._path(sid).unlink(missing_ok=True)
            self._drop(sid)

    def _drop(self, session_id: str) -> None:
        with self._lock:
            self._moving.pop(session_id, None)
            self.counts.demotions["none"] += 1
            self._dropped.append(session_id)

    # -- helpers -----------------------------------------------------------------------------------
    def _read(self, session_id: str) -> SlotSnapshot | None:
        path = self._path(session_id)
        try:
            snap = read_entry(path, session_id, self.geometry, pin=self._pin)
            if snap.k.shape != self.pool.k[:, 0].shape or snap.pos.shape != self.pool.pos[0].shape:
                raise CorruptEntry(f"{path.name}: tensor shapes do not match the pool")
        except (OSError, CorruptEntry) as e:
            log.warning("disk KV tier: session %s unreadable (%s); it will be rebuilt", session_id, e)
            with self._lock:
                self.counts.errors["read"] += 1
            return None
        finally:
            path.unlink(missing_ok=True)
        with self._lock:
            self.counts.promotions["disk"] += 1
        return snap

    def _path(self, session_id: str) -> Path:
        assert self.disk_dir is not None
        return self.disk_dir / (hashlib.sha256(session_id.encode()).hexdigest()[:32] + ".kv")

    def _wipe(self) -> None:
        """Delete this tier's files (only those: the directory may be shared by mistake)."""
        if self.disk_dir is not None:
            for path in [*self.disk_dir.glob("*.kv"), *self.disk_dir.glob("*.kv.tmp-*")]:
                path.unlink(missing_ok=True)
        with self._lock:
            self._disk.clear()

    def _host_bytes(self) -> int:
        return sum(s.nbytes for s in self._host.values()) + sum(s.nbytes for s in self._moving.values())
