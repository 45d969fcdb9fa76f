"""Bounded KV tiers on a tiny random Llama: budgets, bit-identical restores, disk faults, freeing, no stalls."""

from __future__ import annotations

import contextlib
import errno
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from streaming_core import kv_tiers
from streaming_core.config import CacheConfig, EngineConfig
from streaming_core.engine import Engine
from streaming_core.kv_disk import CorruptEntry, read_entry, write_entry
from streaming_core.sampler import SamplingParams

from .helpers import tiny_llama, wrap
from .test_engine import WordTokenizer, generate, prompt

S, W = 4, 28
GREEDY = SamplingParams(max_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def model():
    return wrap(tiny_llama())


def make_engine(model, num_slots=1, host=2 << 30, disk=20 << 30, kv_dir: Path | None = None) -> Engine:
    cache = CacheConfig(S, W, num_slots, prefill_chunk=16, host_budget_bytes=host, disk_budget_bytes=disk)
    return Engine(model, WordTokenizer(), EngineConfig(cache=cache), kv_dir=kv_dir)


def entry(engine: Engine) -> int:
    return engine.tiers.entry_bytes


def recording(engine: Engine) -> list[torch.Tensor]:
    """Every logits row the runner hands back, in order."""
    seen: list[torch.Tensor] = []
    run = engine.runner.run

    def wrapped(plan):
        out = run(plan)
        seen.extend(out.logits[i].clone() for i in sorted(out.logits))
        return out

    engine.runner.run = wrapped  # type: ignore[method-assign]
    return seen


def test_host_tier_stays_under_its_budget_and_dropped_sessions_are_forgotten(model):
    """Regression: every offloaded session used to stay in host memory forever."""
    engine = make_engine(model, num_slots=1, host=0, disk=0)
    budget = 2 * entry(engine) + 100
    engine = make_engine(model, num_slots=1, host=budget, disk=0)
    for i in range(8):
        generate(engine, f"s{i}", prompt(10, i), GREEDY)
        engine.tiers.flush()
        counts = engine.tier_counts()
        assert counts.host_bytes <= budget
    counts = engine.tier_counts()
    assert counts.host_sessions == 2 and counts.slot_sessions == 1
    assert counts.demotions["none"] == 5  # s0..s4: pushed out of the host tier, nowhere else to go
    engine.step()  # the engine applies the drops between steps
    assert sorted(engine.scheduler.sessions) == ["s5", "s6", "s7"]
    assert engine.stats("s0") is None  # forgotten: the server rebuilds it from Redis on its next turn
    assert [engine.stats(f"s{i}").location for i in (5, 6, 7)] == ["host", "host", "slot"]


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_restore_from_a_tier_is_bit_identical(model, tmp_path, tier):
    first, second = prompt(20, 5), prompt(9, 6)
    plain = make_engine(model, num_slots=2)
    want = recording(plain)
    t1 = generate(plain, "a", first, GREEDY)
    t2 = generate(plain, "a", [t1[-1], *second], GREEDY)

    host = 2 << 30 if tier == "host" else 0
    moved = make_engine(model, num_slots=2, host=host, kv_dir=tmp_path / "kv")
    got = recording(moved)
    assert generate(moved, "a", first, GREEDY) == t1
    moved.offload("a")
    assert moved.stats("a").location == tier
    assert moved.tier_counts().demotions[tier] == 1
    assert generate(moved, "a", [t1[-1], *second], GREEDY) == t2
    assert moved.stats("a").location == "slot"
    assert moved.tier_counts().promotions[tier] == 1
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert not list((tmp_path / "kv").iterdir())  # a promoted entry leaves no file behind


def test_host_overflow_goes_to_disk_lru_then_is_dropped(model, tmp_path):
    probe = make_engine(model, host=0, disk=0)
    one = entry(probe)
    engine = make_engine(model, num_slots=1, host=one, disk=2 * (one + 4096), kv_dir=tmp_path)
    for i in range(5):
        generate(engine, f"s{i}", prompt(8, i), GREEDY)
    engine.tiers.flush()
    engine.step()
    where = {sid: engine.stats(sid).location for sid in engine.scheduler.sessions}
    assert where == {"s1": "disk", "s2": "disk", "s3": "host", "s4": "slot"}
    c = engine.tier_counts()
    assert c.disk_sessions == 2 and c.disk_bytes <= 2 * (one + 4096) and c.host_bytes <= one
    assert len(list(tmp_path.glob("*.kv"))) == 2


def _disk_engine(model, tmp_path: Path) -> Engine:
    return make_engine(model, num_slots=2, host=0, kv_dir=tmp_path / "kv")


def test_corrupt_disk_entry_is_rebuilt_never_reused(model, tmp_path):
    first, second = prompt(20, 5), prompt(9, 6)
    ref = make_engine(model, num_slots=2)
    t1 = generate(ref, "a", first, GREEDY)
    t2 = generate(ref, "a", [t1[-1], *second], GREEDY)  # nothing was evicted: a rebuild is exact

    engine = _disk_engine(model, tmp_path)
    generate(engine, "a", first, GREEDY)
    engine.offload("a")
    (path,) = (tmp_path / "kv").glob("*.kv")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit pattern in the values
    path.write_bytes(bytes(data))
    assert generate(engine, "a", [t1[-1], *second], GREEDY) == t2
    c = engine.tier_counts()
    assert c.errors["read"] == 1 and c.promotions["disk"] == 0
    assert engine.stats("a").tokens_seen == ref.stats("a").tokens_seen


def test_disk_entry_validation(tmp_path):
    from streaming_core.kv_pool import SlotSnapshot

    snap = SlotSnapshot(torch.randn(2, 2, 8, 4), torch.randn(2, 2, 8, 4), torch.arange(8))
    geo = {"layers": 2, "kv_heads": 2, "head_dim": 4, "capacity": 8, "dtype": "torch.float32"}
    path = tmp_path / "a.kv"
    write_entry(path, "a", snap, geo)
    back = read_entry(path, "a", geo)
    assert torch.equal(back.k, snap.k) and torch.equal(back.v, snap.v) and torch.equal(back.pos, snap.pos)
    with pytest.raises(CorruptEntry):
        read_entry(path, "a", geo | {"capacity": 16})  # another cache shape
    with pytest.raises(CorruptEntry):
        read_entry(path, "b", geo)  # another session's file
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CorruptEntry):
        read_entry(path, "a", geo)  # truncated
    assert [p.name for p in tmp_path.iterdir()] == ["a.kv"]  # no temporary file left


def test_disk_write_failure_drops_and_counts(model, tmp_path, monkeypatch, caplog):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kv_tiers, "write_entry", full)
    engine = _disk_engine(model, tmp_path)
    generate(engine, "a", prompt(10, 1), GREEDY)
    with caplog.at_level("WARNING", logger="streaming_core.kv_tiers"):
        engine.offload("a")
    assert "No space left on device" in caplog.text
    c = engine.tier_counts()
    assert c.errors["write"] == 1 and c.demotions["none"] == 1 and c.disk_sessions == 0
    assert engine.stats("a") is None  # forgotten: rebuilt from Redis on its next turn
    assert not list((tmp_path / "kv").iterdir())


def _writable(path: Path) -> bool:
    try:
        (path / "probe").touch()
    except OSError:
        return False
    (path / "probe").unlink()
    return True


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """chmod; root ignores it, so as root also make the directory immutable (chattr +i)."""
    path.chmod(0o555)
    immutable = False
    try:
        if _writable(path):
            immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
            if _writable(path):
                pytest.skip("cannot make a directory read-only here")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def test_read_only_disk_dir_drops_and_counts(model, tmp_path):
    engine = _disk_engine(model, tmp_path)
    generate(engine, "a", prompt(10, 1), GREEDY)
    with read_only(tmp_path / "kv"):
        engine.offload("a")
    assert engine.tier_counts().errors["write"] == 1
    assert engine.stats("a") is None


def test_close_and_ephemeral_sessions_free_their_tier_copies(model, tmp_path):
    engine = make_engine(model, num_slots=2, host=0, kv_dir=tmp_path / "kv")
    generate(engine, "a", prompt(10, 1), GREEDY)
    engine.offload("a")
    assert len(list((tmp_path / "kv").iterdir())) == 1
    assert engine.close_session("a")
    assert not list((tmp_path / "kv").iterdir())
    host = make_engine(model, num_slots=2)
    generate(host, "b", prompt(10, 1), GREEDY)
    host.offload("b")
    assert host.tier_counts().host_sessions == 1
    assert host.close_session("b")
    assert host.tier_counts().host_sessions == 0 and host.tier_counts().host_bytes == 0
    generate(host, None, prompt(10, 2), GREEDY)  # stateless: nothing stays anywhere
    assert host.tier_counts().host_sessions == 0 and not host.scheduler.sessions


def test_running_batch_does_not_wait_for_a_demotion_copy(model, monkeypatch):
    """The slot copy blocks in the worker; the running stream keeps decoding and the waiting request is
    admitted only once the copy is done."""
    release = threading.Event()
    copy = kv_tiers.KVTiers._copy

    def slow_copy(self, slot, ready):
        assert release.wait(30)
        return copy(self, slot, ready)

    monkeypatch.setattr(kv_tiers.KVTiers, "_copy", slow_copy)
    engine = make_engine(model, num_slots=2)
    generate(engine, "idle", prompt(10, 1), GREEDY)
    running = engine.submit("run", prompt(6, 2), SamplingParams(max_tokens=20, temperature=0))
    engine.step()  # "run" takes the free slot
    waiting = engine.submit("new", prompt(6, 3), GREEDY)
    for _ in range(5):
        engine.step()  # the first starts offloading "idle"
    assert engine.scheduler.draining and engine.stats("new").slot is None
    assert running.stream._sync.qsize() >= 4  # "run" kept decoding meanwhile
    release.set()
    engine.run_until_done(running, waiting)
    assert engine.stats("idle").location == "host" and engine.stats("new").location == "slot"
