"""One completion per ``completion.requested`` event, however often it is delivered.

Eventing delivers at least once: a Broker re-sends a delivery whose answer it
did not get (its ``delivery.timeout``, a connection cut by queue-proxy or by
a producer hanging up on a synchronous channel), and a producer that timed
out may send the same event again. The CloudEvents spec makes ``source`` and
``id`` the event's identity, so a repeat is recognised by them: while the
first delivery is still being answered, a repeat waits for that answer; once
answered, a repeat gets the same reply (same bytes, so the same reply ``id``)
for ``ttl_s``. A transient failure (429/503: "retry me") is not remembered,
so the retry does the work.

Bounded: at most ``keep`` answers (LRU), each a reply event (a completion's
JSON). Held in this process: the requester is one process per pod, pinned at
one pod.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass
class _Entry:
    done: threading.Event = field(default_factory=threading.Event)
    answer: object = None
    failed: bool = False
    at: float = 0.0


class ReplyCache:
    def __init__(self, keep: int = 1024, ttl_s: float = 900.0) -> None:
        self.keep = keep
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self.repeats = 0  # answered from the first delivery's reply

    def answer(self, key: tuple[str, str], compute: Callable[[], T]) -> T:
        """``compute()``'s result for the first delivery of ``key``; the same result for a repeat."""
        while True:
            now = time.monotonic()
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry.done.is_set() and now - entry.at > self.ttl_s:
                    del self._entries[key]
                    entry = None
                if entry is None:
                    entry = self._entries[key] = _Entry()
                    owner = True
                else:
                    self._entries.move_to_end(key)
                    owner = False
            if owner:
                return self._compute(key, entry, compute)
            entry.done.wait()
            if not entry.failed:
                with self._lock:
                    self.repeats += 1
                return entry.answer  # type: ignore[return-value]
            # The first delivery failed transiently and was forgotten: this one does the work.

    def _compute(self, key: tuple[str, str], entry: _Entry, compute: Callable[[], T]) -> T:
        try:
            result = compute()
        except BaseException:
            with self._lock:
                if self._entries.get(key) is entry:
                    del self._entries[key]
                entry.failed = True
            entry.done.set()
            raise
        with self._lock:
            entry.answer, entry.at = result, time.monotonic()
            while len(self._entries) > self.keep:
                oldest_key, oldest = next(iter(self._entries.items()))
                if not oldest.done.is_set():  # never forget an answer still being computed
                    self._entries.move_to_end(oldest_key)
                    if oldest_key == key:
                        break
                    continue
                del self._entries[oldest_key]
        entry.done.set()
        return result
