"""Forwarding a request to a worker: pooled connections, timeouts, streaming passthrough.

Plain Python (no Flask). A non-streaming answer is returned whole; a
streaming one is a :class:`RelayStream` of raw upstream bytes, passed
through unchanged and unbuffered. If the worker dies mid-stream, the client
gets one SSE error event (design.md) instead of a hang or a silently
truncated stream. Closing the relay (client gone, even before the first
chunk) closes the upstream response, which makes the worker stop
generating, and releases the lease.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from fma_common.errors import ShuttingDown, UpstreamError, UpstreamTimeout
from fma_common.http import sse_error

from . import drain
from .actuator import WorkerLease
from .metrics import RequesterMetrics

log = logging.getLogger("fma.requester.proxy")

# Hop-by-hop and length headers must not be copied between connections.
_DROP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server", "date"}


def refused_before_received(exc: BaseException) -> bool:
    """Whether a failed send proves no live process accepted the request: the connection was refused, or the
    peer's socket was already closed (a reset or a broken pipe on the request itself: a pooled connection to a
    worker that had died). A worker that dies *after* reading a request closes with an EOF instead ("Server
    disconnected without sending a response"): that one may have been working on it."""
    if isinstance(exc, httpx.ConnectError):
        return True
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ConnectionResetError, BrokenPipeError, ConnectionRefusedError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class SSETail:
    """Follows an SSE byte stream event by event, to tell how it ended.

    A stream ended well when its last complete event is ``data: [DONE]`` or
    an error event (``data: {"error": ...}``, which a worker sends instead of
    ``[DONE]``). Only the incomplete tail is kept, bounded.
    """

    MAX_PENDING = 1 << 16

    def __init__(self) -> None:
        self._pending = b""
        self.last_data: str | None = None
        self._oversized = False

    def feed(self, chunk: bytes) -> None:
        data = self._pending + chunk.replace(b"\r\n", b"\n")
        *events, self._pending = data.split(b"\n\n")
        for event in events:
            self._event(event)
        if len(self._pending) > self.MAX_PENDING:  # one enormous event: it is not a terminator
            self._pending, self._oversized = b"", True
            self.last_data = None

    def _event(self, raw: bytes) -> None:
        lines = [line[5:].lstrip(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")]
        if lines:
            self.last_data = b"\n".join(lines).decode(errors="replace")
            self._oversized = False

    @property
    def ended_well(self) -> bool:
        if self._pending.strip() or self.last_data is None or self._oversized:
            return False
        if self.last_data == "[DONE]":
            return True
        try:
            body = json.loads(self.last_data)
        except ValueError:
            return False
        return isinstance(body, dict) and "error" in body


class RelayStream:
    """A worker's SSE body, relayed chunk by chunk.

    Releases its upstream connection and its lease exactly once, however it
    ends: exhausted, failed, or closed by the server because the client went
    away - including before its first chunk, when a bare generator's
    ``finally`` would never run (``close`` is what WSGI servers call).
    """

    def __init__(self, lease: WorkerLease, resp: httpx.Response, metrics: RequesterMetrics) -> None:
        self.lease = lease
        self._resp = resp
        self._metrics = metrics
        self._closed = False
        self._lock = threading.Lock()
        self.on_broken: Callable[[], None] | None = None  # the data plane's: probe the worker

    def __iter__(self) -> Iterator[bytes]:
        return self._relay()

    def _relay(self) -> Iterator[bytes]:
        tail = SSETail()
        try:
            for chunk in self._resp.iter_raw():
                if chunk:
                    tail.feed(chunk)
                    yield chunk
                    if drain.closing_soon() and not tail.ended_well:
                        log.warning("ending a stream from %s: the drain deadline is here", self.lease.model)
                        yield sse_error(ShuttingDown("the requester is shutting down and cannot finish this "
                                                     "stream; retry the request"))
                        return
            if not tail.ended_well:
                # The worker closed the stream without [DONE] and without an error event of its own.
                raise httpx.RemoteProtocolError("stream ended before [DONE]")
        except httpx.HTTPError as exc:
            self._metrics.upstream_errors.labels(self.lease.model, "stream").inc()
            log.warning("stream from %s broke: %s", self.lease.model, exc)
            if self.on_broken is not None:
                self.on_broken()
            yield sse_error(UpstreamError(f"worker for {self.lease.model} failed mid-stream: {exc}"))
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._resp.close()
        finally:
            self.lease.done()

    @property
    def closed(self) -> bool:
        return self._closed


@dataclass
class UpstreamResponse:
    status: int
    headers: dict[str, str]
    body: bytes | None = None
    stream: RelayStream | None = None


class WorkerProxy:
    def __init__(self, metrics: RequesterMetrics, connect_timeout: float, read_timeout: float,
                 max_connections: int = 1000, token: str | None = None) -> None:
        self.metrics = metrics
        # The worker's token (FMA_WORKER_TOKEN), never the client's key: workers answer only the requester.
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        # As many connections as the requester accepts clients, so the pool is never the queue.
        self._client = httpx.Client(
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=min(64, max_connections)),
        )

    def close(self) -> None:
        self._client.close()

    def forward(self, lease: WorkerLease, path: str, body: bytes, stream: bool,
                read_timeout: float | None = None) -> UpstreamResponse:
        """Send ``body`` to the worker. The lease is released when the answer is
        complete - for a stream, when the stream ends or is closed. ``read_timeout``
        replaces the configured one for this request (a deadline's remainder)."""
        started = time.monotonic()
        extra: dict[str, Any] = {}
        if read_timeout is not None:
            pool = self._client.timeout
            extra["timeout"] = httpx.Timeout(read_timeout, connect=pool.connect, pool=pool.pool)
        request = self._client.build_request("POST", f"{lease.url}{path}", content=body,
                                             headers={"Content-Type": "application/json", **self._auth}, **extra)
        try:
            resp = self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            lease.done()
            self.metrics.upstream_errors.labels(lease.model, "timeout").inc()
            raise UpstreamTimeout(f"worker for {lease.model} did not answer in time: {exc}") from None
        except httpx.HTTPError as exc:
            lease.done()
            self.metrics.upstream_errors.labels(lease.model, "connect").inc()
            error = UpstreamError(f"worker for {lease.model} is unreachable: {exc}", code="worker_unreachable")
            error.not_received = refused_before_received(exc)
            raise error from None
        first_byte = time.monotonic() - started
        self.metrics.ttfb.labels(lease.model).observe(first_byte)
        log.info("upstream POST %s%s -> %d first byte %.1f ms", lease.model, path, resp.status_code,
                 first_byte * 1000)
        headers = {k: v for k, v in resp.headers.items() if k.lower() not in _DROP}
        is_sse = resp.headers.get("content-type", "").startswith("text/event-stream")
        if not (stream and is_sse):
            try:
                data = resp.read()
            except httpx.TimeoutException as exc:
                self.metrics.upstream_errors.labels(lease.model, "timeout").inc()
                raise UpstreamTimeout(f"worker for {lease.model} stopped answering: {exc}") from None
            except httpx.HTTPError as exc:
                self.metrics.upstream_errors.labels(lease.model, "read").inc()
                raise UpstreamError(f"worker for {lease.model} failed while answering: {exc}") from None
            finally:
                resp.close()
                lease.done()
            return UpstreamResponse(resp.status_code, headers, body=data)
        return UpstreamResponse(resp.status_code, headers, stream=RelayStream(lease, resp, self.metrics))
