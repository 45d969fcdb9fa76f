"""The engine's loop thread: calls queued from any thread run between steps, steps run while there is work.

Stopping leaves no caller waiting: the loop ends every request in flight, then runs what is still queued
until nothing is (a submit queued then is refused), and only then hands over to inline calls. Whether a
call is queued or run inline is decided under the same lock, so no call falls between the two.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineLoop:
    def __init__(
        self, has_work: Callable[[], bool], step: Callable[[], None], abort_all: Callable[[], None]
    ) -> None:
        self._has_work, self._step, self._abort_all = has_work, step, abort_all
        self._inbox: list[Callable[[], None]] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self.stopping = False
        """Set by `stop`; new requests are refused from then on."""

    @property
    def running(self) -> bool:
        """A loop thread serves the calls (otherwise they run inline)."""
        return self._thread is not None

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the loop thread between steps (inline when no loop thread runs)."""
        fut: Future[T] = Future()

        def job() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

        with self._wake:
            queued = self._thread is not None
            if queued:
                self._inbox.append(job)
                self._wake.notify()
        if not queued:
            job()
        return fut

    def start(self) -> None:
        self.stopping = False
        self._thread = threading.Thread(target=self._run, name="streamllm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop after the current step (see the module docstring); without a loop thread, abort inline."""
        with self._wake:
            self.stopping = True
            thread = self._thread
            self._wake.notify()
        if thread is None:
            self._abort_all()
            return
        thread.join(timeout)
        if thread.is_alive():
            log.error("the engine loop did not stop within %.0f s (a step is hung)", timeout)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and not self._has_work() and not self.stopping:
                    self._wake.wait()
                jobs, self._inbox = self._inbox, []
            for job in jobs:
                job()
            if self.stopping:
                self._shut_down()
                return
            if self._has_work():
                self._step()

    def _shut_down(self) -> None:
        self._abort_all()
        while True:
            with self._wake:
                jobs, self._inbox = self._inbox, []
                if not jobs:
                    self._thread = None  # from here on, calls run inline
                    return
            for job in jobs:
                job()
