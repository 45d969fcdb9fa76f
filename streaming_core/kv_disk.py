"""One offloaded session's KV as a file: a small JSON header, then the raw k, v and pos bytes.

Layout: MAGIC, a 4-byte little-endian header length, the header (session id, the pool geometry it was
written for, each tensor's dtype and shape, a CRC32 of the data), then the tensors back to back. Files are
written to a temporary name and renamed, so a reader never sees half a file; a file that does not match
the pool it is read into, or whose bytes do not check out, raises `CorruptEntry` and is never restored.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import torch

from .kv_pool import SlotSnapshot

MAGIC = b"STREAMLLM-KV\x00\x01"
_LEN = struct.Struct("<I")
_MAX_HEADER = 1 << 16


class CorruptEntry(ValueError):
    """A KV file that is truncated, damaged, or written for another pool geometry."""


def _tensors(snap: SlotSnapshot) -> list[tuple[str, torch.Tensor]]:
    return [("k", snap.k), ("v", snap.v), ("pos", snap.pos)]


def _bytes(t: torch.Tensor) -> Any:
    """A zero-copy uint8 view of a contiguous CPU tensor, any dtype (bf16 has no numpy dtype)."""
    return t.contiguous().view(torch.uint8).numpy()


def write_entry(path: Path, session_id: str, snap: SlotSnapshot, geometry: dict[str, Any]) -> int:
    """Write atomically (tmp + rename); returns the file size. OSError (full disk, no permission) propagates
    with the temporary file removed."""
    crc = 0
    for _, t in _tensors(snap):
        crc = zlib.crc32(_bytes(t), crc)
    header = {
        "session": session_id,
        "geometry": geometry,
        "tensors": [[name, str(t.dtype), list(t.shape)] for name, t in _tensors(snap)],
        "crc32": crc,
    }
    head = json.dumps(header).encode()
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + _LEN.pack(len(head)) + head)
            for _, t in _tensors(snap):
                f.write(_bytes(t).data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def read_entry(path: Path, session_id: str, geometry: dict[str, Any], pin: bool = False) -> SlotSnapshot:
    """Read and validate a file written by `write_entry`; CorruptEntry unless it is whole and matches."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise CorruptEntry(f"{path.name}: not a KV file")
        (n,) = _LEN.unpack(f.read(_LEN.size) or b"\0\0\0\0")
        if not 0 < n <= _MAX_HEADER:
            raise CorruptEntry(f"{path.name}: bad header length {n}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CorruptEntry(f"{path.name}: unreadable header") from e
        if header.get("session") != session_id or header.get("geometry") != geometry:
            raise CorruptEntry(f"{path.name}: written for another session or pool geometry")
        out: dict[str, torch.Tensor] = {}
        crc = 0
        for name, dtype, shape in header.get("tensors", []):
            t = torch.empty(shape, dtype=_dtype(dtype), pin_memory=pin)
            view = _bytes(t)
            if f.readinto(view.data) != view.nbytes:
                raise CorruptEntry(f"{path.name}: truncated")
            crc = zlib.crc32(view, crc)
            out[name] = t
        if f.read(1) or crc != header.get("crc32") or set(out) != {"k", "v", "pos"}:
            raise CorruptEntry(f"{path.name}: damaged data")
    return SlotSnapshot(k=out["k"], v=out["v"], pos=out["pos"])


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptEntry(f"unknown dtype {name!r}")
    return dtype
