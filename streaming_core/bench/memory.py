"""Peak memory of a code region, relative to a baseline taken when the tracker is created.

CUDA: `torch.cuda.max_memory_allocated` (tensors only, exact). CPU: the process's resident set size,
sampled from /proc/self/statm by a background thread every ~0.5 ms (Linux only; NaN elsewhere), so it
misses spikes shorter than the sampling period. glibc keeps freed memory resident and reuses it without
the RSS growing, which would hide a region's allocations behind earlier ones: free memory is handed
back (malloc_trim) before the baseline and before the region.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from types import TracebackType

import torch

_STATM = "/proc/self/statm"


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def rss_bytes() -> int:
    with open(_STATM) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """`mem = PeakMemory(device)`, allocate, then `with mem: ...`; `mem.peak_mb` is the peak increase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.available = self.cuda or os.path.exists(_STATM)
        self.baseline = self._current()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def method(self) -> str:
        if self.cuda:
            return "CUDA max_memory_allocated"
        return "peak RSS increase, sampled from /proc/self/statm" if self.available else "unavailable"

    def _current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        if not self.available:
            return 0
        _malloc_trim()
        return rss_bytes()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0005)

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.available:
            _malloc_trim()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20 if self.available else float("nan")
