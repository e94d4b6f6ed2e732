"""Bounded admission to the running batch.

The batch holds at most ``rows`` sequences (a request with ``n`` choices takes
``n``) and ``tokens`` KV slots. The batch's cache is left-padded to its longest
row (``batching.py``), so what it can come to hold is every row times the
longest any row may grow to (its prompt + ``max_tokens``): a long request
beside short ones costs the short ones its length too. That product, not a sum
of lengths, is what admission bounds. A request that does not fit waits, FIFO by arrival (a big request at
the head is not overtaken by small ones behind it, so nothing starves), for at
most ``timeout_s``; beyond ``max_queue`` waiting it is refused at once with
:class:`QueueFull` (429 + ``Retry-After``), so gunicorn threads stay free for
``/health`` and ``/ready``. A request larger than the whole budget runs when
the batch is empty rather than never.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

from fma_common.errors import QueueFull


class Lease:
    """Held capacity. ``release`` is idempotent: both the stream's ``finally``
    and the response's ``close`` call it, whichever runs first wins."""

    def __init__(self, admission: Admission, rows: int, width: int, waited_s: float) -> None:
        self._admission = admission
        self._released = False
        self.rows = rows
        self.width = width
        self.waited_s = waited_s

    def release(self) -> None:
        adm = self._admission
        with adm._cond:
            if self._released:
                return
            self._released = True
            adm._rows -= self.rows
            adm._widths[self.width] -= 1
            if not adm._widths[self.width]:
                del adm._widths[self.width]
            adm._running -= 1
            adm._cond.notify_all()


class Admission:
    def __init__(self, rows: int, max_queue: int, timeout_s: float, tokens: int = 0) -> None:
        self.rows = rows
        self.tokens = tokens  # 0: no token budget
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._rows = 0
        self._widths: Counter[int] = Counter()  # the running requests' widths (for the longest)
        self._running = 0
        self._waiters: deque[object] = deque()

    @property
    def busy(self) -> int:
        """Requests admitted and not yet released."""
        return self._running

    @property
    def busy_rows(self) -> int:
        return self._rows

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about what the queue ahead needs, 1-60."""
        return int(min(60, max(1, self.timeout_s / 4 if self._waiters else 1)))

    @property
    def kv_slots(self) -> int:
        """What the running batch's cache may come to hold: every row times the longest row."""
        return self._rows * max(self._widths, default=0)

    def _fits(self, rows: int, width: int) -> bool:
        if self._running == 0:
            return True  # alone, anything that passed validation runs
        if self._rows + rows > self.rows:
            return False
        return not self.tokens or (self._rows + rows) * max(width, max(self._widths, default=0)) <= self.tokens

    def acquire(self, rows: int = 1, width: int = 0) -> Lease:
        """Room for ``rows`` sequences that may each grow to ``width`` tokens (prompt + ``max_tokens``)."""
        started = time.monotonic()
        with self._cond:
            if not self._waiters and self._fits(rows, width):
                return self._grant(rows, width, 0.0)
            if len(self._waiters) >= self.max_queue:
                raise QueueFull(f"worker is busy: {self._running} request(s) generating ({self._rows} of "
                                f"{self.rows} sequences) and {len(self._waiters)} waiting; retry later",
                                retry_after=self.retry_after())
            ticket = object()
            self._waiters.append(ticket)
            deadline = started + self.timeout_s
            try:
                while not (self._waiters[0] is ticket and self._fits(rows, width)):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise QueueFull(f"no room in the batch within {self.timeout_s:.0f} s; retry later",
                                        retry_after=self.retry_after())
                    self._cond.wait(remaining)
                lease = self._grant(rows, width, time.monotonic() - started)
            finally:
                self._waiters.remove(ticket)
                self._cond.notify_all()
            return lease

    def _grant(self, rows: int, width: int, waited: float) -> Lease:
        self._rows += rows
        self._widths[width] += 1
        self._running += 1
        return Lease(self, rows, width, waited)
