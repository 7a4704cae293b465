"""One thread at a time per attached model: a re-entrant hold that names the thread holding it.

An attached model carries per-call state (step, batch layout, trace), so two threads running it at once
would mix their decisions. Instead of a lock that blocks (and hides the design problem), a second thread
gets a ``ConcurrentUseError`` that names the thread in the way. Serving many threads: one pipeline (or
model) per worker thread, each attached in its worker, or one worker that batches requests.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

from fusion_engine.errors import ConcurrentUseError


def _thread_label(ident: int) -> str:
    for thread in threading.enumerate():
        if thread.ident == ident:
            return f"{thread.name!r} (ident {ident})"
    return f"ident {ident} (finished)"


class Owner:
    """Who is using an attached model now: the holding thread, how deeply, and for what."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self._lock = threading.Lock()
        self._thread: int | None = None
        self._depth = 0
        self._what = ""

    def acquire(self, what: str) -> None:
        me = threading.get_ident()
        with self._lock:
            if self._thread not in (None, me):
                raise ConcurrentUseError(
                    f"{what} on thread {_thread_label(me)}: the attached {self.model_name} is in use by thread "
                    f"{_thread_label(self._thread)} ({self._what}); an attached model serves one thread at a time: "
                    "give each worker thread its own pipeline (copy.deepcopy before attaching) or serialize calls"
                )
            if self._depth == 0:
                self._thread, self._what = me, what
            self._depth += 1

    def release(self) -> None:
        """Undo one ``acquire`` of this thread (a no-op on a thread whose acquire was refused)."""
        with self._lock:
            if self._thread != threading.get_ident():
                return
            self._depth -= 1
            if self._depth <= 0:
                self._thread, self._depth, self._what = None, 0, ""

    @contextmanager
    def hold(self, what: str):
        """Acquire for a block; on exit the depth is what it was before, also when a forward inside was cut
        short by a KeyboardInterrupt (torch runs always-call forward hooks on ``Exception`` only)."""
        self.acquire(what)
        depth = self._depth - 1
        try:
            yield
        finally:
            with self._lock:
                if self._thread == threading.get_ident():
                    self._depth = depth
                    if depth == 0:
                        self._thread, self._what = None, ""

    def check_free(self, what: str) -> None:
        """Raise unless the model is idle or held by this thread (for detach)."""
        self.acquire(what)
        self.release()
