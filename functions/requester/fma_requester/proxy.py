"""Forwarding a request to a worker: pooled connections, timeouts, streaming passthrough.

Plain Python (no Flask). A non-streaming answer is returned whole; a
streaming one is an iterator of raw upstream bytes, passed through unchanged
and unbuffered. If the worker dies mid-stream, the client gets one SSE error
event (design.md) instead of a hang or a silently truncated stream. Closing
the iterator (client gone) closes the upstream response, which makes the
worker stop generating.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from fma_common.errors import UpstreamError, UpstreamTimeout
from fma_common.http import sse_error

from .actuator import WorkerLease
from .metrics import RequesterMetrics

log = logging.getLogger("fma.requester.proxy")

# Hop-by-hop and length headers must not be copied between connections.
_DROP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server", "date"}


@dataclass
class UpstreamResponse:
    status: int
    headers: dict[str, str]
    body: bytes | None = None
    stream: Iterator[bytes] | None = None


class WorkerProxy:
    def __init__(self, metrics: RequesterMetrics, connect_timeout: float, read_timeout: float,
                 max_connections: int = 512) -> None:
        self.metrics = metrics
        self._client = httpx.Client(
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout, pool=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=64),
        )

    def close(self) -> None:
        self._client.close()

    def forward(self, lease: WorkerLease, path: str, body: bytes, stream: bool) -> UpstreamResponse:
        """Send ``body`` to the worker. The lease is released when the answer is
        complete - for a stream, when the stream ends or is closed."""
        started = time.monotonic()
        request = self._client.build_request("POST", f"{lease.url}{path}", content=body,
                                             headers={"Content-Type": "application/json"})
        try:
            resp = self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            lease.done()
            self.metrics.upstream_errors.labels(lease.model, "timeout").inc()
            raise UpstreamTimeout(f"worker for {lease.model} did not answer in time: {exc}") from None
        except httpx.HTTPError as exc:
            lease.done()
            self.metrics.upstream_errors.labels(lease.model, "connect").inc()
            raise UpstreamError(f"worker for {lease.model} is unreachable: {exc}") from None
        first_byte = time.monotonic() - started
        self.metrics.ttfb.labels(lease.model).observe(first_byte)
        log.info("upstream POST %s%s -> %d first byte %.1f ms", lease.model, path, resp.status_code,
                 first_byte * 1000)
        headers = {k: v for k, v in resp.headers.items() if k.lower() not in _DROP}
        is_sse = resp.headers.get("content-type", "").startswith("text/event-stream")
        if not (stream and is_sse):
            try:
                data = resp.read()
            except httpx.HTTPError as exc:
                self.metrics.upstream_errors.labels(lease.model, "read").inc()
                raise UpstreamError(f"worker for {lease.model} failed while answering: {exc}") from None
            finally:
                resp.close()
                lease.done()
            return UpstreamResponse(resp.status_code, headers, body=data)
        return UpstreamResponse(resp.status_code, headers, stream=self._relay(lease, resp))

    def _relay(self, lease: WorkerLease, resp: httpx.Response) -> Iterator[bytes]:
        tail = b""  # the end of what was relayed, to see how the worker ended the stream
        try:
            for chunk in resp.iter_raw():
                if chunk:
                    tail = (tail + chunk)[-4096:]
                    yield chunk
            ended_well = b"data: [DONE]" in tail or b'data: {"error"' in tail
            if not ended_well:
                # The worker closed the stream without [DONE] and without an error event of its own.
                raise httpx.RemoteProtocolError("stream ended before [DONE]")
        except httpx.HTTPError as exc:
            self.metrics.upstream_errors.labels(lease.model, "stream").inc()
            log.warning("stream from %s broke: %s", lease.model, exc)
            yield sse_error(UpstreamError(f"worker for {lease.model} failed mid-stream: {exc}"))
        finally:
            resp.close()
            lease.done()
