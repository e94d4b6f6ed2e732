"""Lifecycle CloudEvents sent to ``K_SINK`` (a Knative SinkBinding sets it, and ``K_CE_OVERRIDES``).

The state machine emits under its lock, so emitting must never wait: an
event goes into a bounded queue and one background sender delivers the queue
in order, each send bounded by a timeout and retried a bounded number of
times with a short backoff. A sink that is slow, down or hanging costs the
requests nothing: the queue fills and further events are dropped, counted in
``fma_events_dropped_total{reason}``, and logged once per burst (the first
drop, then one summary when events flow again or a minute has passed), not
once per event. ``K_CE_OVERRIDES`` (``{"extensions": {...}}``) is applied to
every event; overrides that are not valid JSON or not valid extension names
are logged once at start-up and ignored, as Knative's own adapters do with
bad overrides.

Each event carries CloudEvents' ``sequence`` extension (``extensions/sequence.md``:
a string, ordered lexicographically): this process's start time in
milliseconds then a counter, both zero-padded, so it grows across restarts.
A sender retry re-sends the same event (same ``id``, same ``sequence``). An
asynchronous channel delivers each event on its own (Eventing's fan-out runs a
goroutine per event), so arrival order is not send order; the event log puts
them back in order and drops a repeated ``id`` (``fma_requester/eventlog.py``).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import Counter

from fma_common.events import SEQUENCE_ATTRIBUTE, encode_event, make_event

from .protocol import EVENT_SOURCE

log = logging.getLogger("fma.requester.events")

BURST_LOG_INTERVAL_S = 60.0


def parse_overrides(raw: str | None) -> dict[str, str]:
    """The ``extensions`` of a ``K_CE_OVERRIDES`` value (SinkBinding writes ``{"extensions": {...}}``)."""
    if not raw:
        return {}
    try:
        extensions = json.loads(raw).get("extensions") or {}
        if not isinstance(extensions, dict):
            raise ValueError("extensions is not an object")
    except (ValueError, AttributeError) as exc:
        log.warning("K_CE_OVERRIDES ignored: not {\"extensions\": {...}} JSON (%s)", exc)
        return {}
    good = {}
    for name, value in extensions.items():
        # CloudEvents 1.0: extension names are lowercase letters and digits; the SDK refuses the rest.
        if isinstance(name, str) and name.isascii() and name.isalnum() and name == name.lower() and \
                name not in _RESERVED:
            good[name] = str(value)
        else:
            log.warning("K_CE_OVERRIDES: extension %r ignored (not a valid CloudEvents extension name)", name)
    return good


_RESERVED = {"id", "source", "specversion", "type", "datacontenttype", "dataschema", "subject", "time", "data"}


@dataclass
class EmitterConfig:
    sink: str | None
    overrides: Mapping[str, str] = field(default_factory=dict)
    max_pending: int = 256
    timeout_s: float = 2.0
    retries: int = 2
    backoff_s: float = 0.2
    # With Eventing's authentication-oidc, the SinkBinding mounts a token for K_SINK's audience here (the
    # Secret's key "token" in a projected volume at /oidc: pkg/apis/sources/v1/sinkbinding_lifecycle.go,
    # pkg/reconciler/sinkbinding/sinkbinding.go) and keeps it fresh; sent as a Bearer token when present.
    token_file: Path | None = Path("/oidc/token")


class SinkEmitter:
    """``emit(type, data)``: never blocks, never raises; delivery happens on one background thread."""

    def __init__(self, config: EmitterConfig, *, sent: Counter | None = None, dropped: Counter | None = None) -> None:
        self.config = config
        self.sink = config.sink
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(config.max_pending)
        self._sent, self._dropped = sent, dropped
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._burst: dict[str, int] = {}  # drops since the burst's first, by reason
        self._burst_logged_at = 0.0
        self._epoch_ms = int(time.time() * 1000)
        self._counter = 0  # the sender thread's alone

    def __call__(self, type_: str, data: dict[str, Any]) -> None:
        if not self.sink or self._closed:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fma-sink", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait((type_, data))
        except queue.Full:
            self._drop(type_, "queue_full")

    # ---- the sender -------------------------------------------------------------------------

    def _run(self) -> None:
        timeout = httpx.Timeout(self.config.timeout_s)
        with httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=2)) as client:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                type_, data = item
                try:
                    self._deliver(client, type_, data)
                except Exception:  # never let one event stop the sender
                    log.exception("could not encode or send %s", type_)
                    self._drop(type_, "error")

    def _token(self) -> str | None:
        """The SinkBinding's current OIDC token, read at each delivery (the file is rotated under us)."""
        path = self.config.token_file
        if path is None:
            return None
        try:
            token = path.read_text().strip()
        except OSError:
            return None
        return token or None

    def next_sequence(self) -> str:
        self._counter += 1
        return f"{self._epoch_ms:015d}-{self._counter:012d}"

    def _deliver(self, client: httpx.Client, type_: str, data: dict[str, Any]) -> None:
        extensions = {**self.config.overrides, SEQUENCE_ATTRIBUTE: self.next_sequence()}
        event = make_event(type_, EVENT_SOURCE, data, subject=data.get("model"), extensions=extensions)
        body, headers = encode_event(event, structured=False)
        token = self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        reason = "error"
        for attempt in range(self.config.retries + 1):
            if attempt:
                time.sleep(self.config.backoff_s * 2 ** (attempt - 1))
            try:
                resp = client.post(self.sink or "", content=body, headers=headers)
            except httpx.TimeoutException:
                reason = "timeout"
                continue
            except httpx.HTTPError:
                reason = "unreachable"
                continue
            if resp.status_code < 300:
                self._delivered(type_)
                return
            reason = f"status_{resp.status_code}"
            # As Knative's own senders do (pkg/kncloudevents/retries.go, SelectiveRetry): retry 5xx, 404, 408,
            # 409 and 429; any other answer will not change.
            if not (resp.status_code >= 500 or resp.status_code in (404, 408, 409, 429)):
                break
        self._drop(type_, "timeout" if reason == "timeout" else
                   "unreachable" if reason == "unreachable" else "rejected" if reason.startswith("status_") else
                   reason)

    # ---- counting and logging ---------------------------------------------------------------

    def _delivered(self, type_: str) -> None:
        if self._sent is not None:
            self._sent.labels(type_).inc()
        with self._lock:
            burst, self._burst = self._burst, {}
        if burst:
            log.warning("event sink %s reachable again; %s", self.sink, _summary(burst))

    def _drop(self, type_: str, reason: str) -> None:
        if self._dropped is not None:
            self._dropped.labels(reason).inc()
        now = time.monotonic()
        with self._lock:
            first = not self._burst
            self._burst[reason] = self._burst.get(reason, 0) + 1
            due = now - self._burst_logged_at >= BURST_LOG_INTERVAL_S
            if first or due:
                self._burst_logged_at = now
            burst = dict(self._burst) if (due and not first) else None
        if first:
            log.warning("event sink %s: dropped %s (%s); further drops are counted in fma_events_dropped_total "
                        "and summarised", self.sink, type_, reason)
        elif burst is not None:
            log.warning("event sink %s still failing; %s so far", self.sink, _summary(burst))

    def close(self, timeout: float) -> None:
        """Deliver what is queued for up to ``timeout`` seconds (the last ``released`` events at shutdown)."""
        self._closed = True
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))


def _summary(burst: Mapping[str, int]) -> str:
    return "dropped " + ", ".join(f"{n} ({reason})" for reason, n in sorted(burst.items()))
