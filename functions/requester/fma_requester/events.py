"""Lifecycle CloudEvents sent to ``K_SINK`` (Knative SinkBinding sets it).

Sending never blocks a request: events go through a small bounded queue to
one background thread; if the sink is slow or down, events are dropped with a
warning rather than piling up in memory.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import httpx

from fma_common.events import encode_event, make_event

from .protocol import EVENT_SOURCE

log = logging.getLogger("fma.requester.events")


class SinkEmitter:
    def __init__(self, sink: str | None, max_pending: int = 256) -> None:
        self.sink = sink
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(max_pending)
        self._thread: threading.Thread | None = None

    def __call__(self, type_: str, data: dict[str, Any]) -> None:
        if not self.sink:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fma-sink", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait((type_, data))
        except queue.Full:
            log.warning("event sink %s is behind; dropped %s", self.sink, type_)

    def _run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while True:
                type_, data = self._queue.get()
                event = make_event(type_, EVENT_SOURCE, data, subject=data.get("model"))
                body, headers = encode_event(event, structured=False)
                try:
                    resp = client.post(self.sink or "", content=body, headers=headers)
                    if resp.status_code >= 300:
                        log.warning("event sink answered %d to %s", resp.status_code, type_)
                except httpx.HTTPError as exc:
                    log.warning("could not deliver %s to the event sink: %s", type_, exc)
