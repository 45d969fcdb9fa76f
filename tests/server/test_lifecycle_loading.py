"""The model loads in a thread that ends with it (server/lifecycle.py `in_passing_thread`): a loader
thread that stayed alive would keep libgomp's worker pool and slow every parallel region of the engine."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from server.lifecycle import in_passing_thread


def test_the_loading_thread_returns_the_result_and_ends():
    seen: list[threading.Thread] = []

    def load(a: int, b: int) -> int:
        seen.append(threading.current_thread())
        torch.randn(1, 1 << 16).add_(1.0)  # an OpenMP region, as the tuner runs
        return a + b

    assert asyncio.run(in_passing_thread(load, 2, 3)) == 5
    assert seen and seen[0] is not threading.main_thread()
    seen[0].join(timeout=5)
    assert not seen[0].is_alive()


def test_a_failing_load_raises_in_the_awaiting_task():
    def load() -> None:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        asyncio.run(in_passing_thread(load))
