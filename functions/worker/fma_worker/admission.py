"""Bounded admission to generation slots.

``slots`` generations run at once; up to ``max_queue`` more wait (FIFO by
arrival, woken in order by the condition variable) for at most ``timeout_s``.
Anything beyond that is refused at once with :class:`QueueFull` (429 +
``Retry-After``) so gunicorn threads stay free for ``/health`` and ``/ready``.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from fma_common.errors import QueueFull


class Lease:
    """One held slot. ``release`` is idempotent: both the stream's ``finally``
    and the response's ``close`` call it, whichever runs first wins."""

    def __init__(self, admission: Admission, waited_s: float) -> None:
        self._admission = admission
        self._released = False
        self.waited_s = waited_s

    def release(self) -> None:
        with self._admission._cond:
            if self._released:
                return
            self._released = True
            self._admission._busy -= 1
            self._admission._cond.notify_all()


class Admission:
    def __init__(self, slots: int, max_queue: int, timeout_s: float) -> None:
        self.slots = slots
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._busy = 0
        self._waiters: deque[object] = deque()

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def acquire(self) -> Lease:
        started = time.monotonic()
        with self._cond:
            if self._busy < self.slots and not self._waiters:
                self._busy += 1
                return Lease(self, 0.0)
            if len(self._waiters) >= self.max_queue:
                raise QueueFull(f"worker is busy: {self._busy} running and {len(self._waiters)} waiting; retry later",
                                retry_after=2)
            ticket = object()
            self._waiters.append(ticket)
            deadline = started + self.timeout_s
            try:
                while not (self._busy < self.slots and self._waiters[0] is ticket):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise QueueFull(f"no generation slot became free within {self.timeout_s:.0f} s; retry later",
                                        retry_after=5)
                    self._cond.wait(remaining)
                self._busy += 1
            finally:
                self._waiters.remove(ticket)
                self._cond.notify_all()
            return Lease(self, time.monotonic() - started)
