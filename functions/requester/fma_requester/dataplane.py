"""The data plane: one way to complete a request, for every edge.

HTTP (``/v1/completions``, ``/v1/chat/completions``) and CloudEvents
(``completion.requested``) both call :meth:`DataPlane.complete` (KServe's
DataPlane): ensure a ready worker, forward, count, and classify the
outcome the same way, so deadlines, errors and metrics do not depend on how
the request arrived.

Outcomes: a worker's 2xx is passed through (a stream stays a stream); a
worker's error answer becomes :class:`~fma_common.errors.UpstreamAnswer`
with the worker's own envelope (or one made from its text: a Knative
activator answers 503 in plain text); failures before the worker answers
are the actuator's and the proxy's typed errors. Whether a failure is
transient (429, 502, 503, 504: retry) or permanent is
:func:`fma_requester.protocol.is_transient`, for both edges.

A streamed request that would wait longer than ``FMA_STREAM_KEEPALIVE`` for
its worker becomes a :class:`KeepaliveStream`: its 200 goes out, SSE comments
keep the connection alive through the cold start, and its tokens follow.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fma_common.errors import (
    ApiError,
    DeadlineExceeded,
    ShuttingDown,
    UpstreamAnswer,
    UpstreamError,
    UpstreamTimeout,
    error_envelope,
)
from fma_common.http import sse_error

from . import drain
from . import protocol as p
from .actuator import Actuator
from .metrics import RequesterMetrics
from .protocol import Actuation
from .proxy import RelayStream, WorkerProxy

log = logging.getLogger("fma.requester.dataplane")


@dataclass
class Completion:
    """A worker's successful answer: whole, or a stream to relay."""

    status: int
    headers: dict[str, str]
    actuation: Actuation | None  # None for a stream that began before its worker was ready
    body: bytes | None = None
    stream: RelayStream | KeepaliveStream | None = None

    def json(self) -> Any:
        return json.loads(self.body or b"")


@dataclass(frozen=True)
class EventOutcome:
    """What a ``completion.requested`` event gets back: succeeded (the response) or failed (an envelope)."""

    ok: bool
    data: dict[str, Any]


def _is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False


def upstream_envelope(status: int, body: bytes | None) -> dict[str, Any]:
    """The worker's error envelope, or one made from whatever it sent."""
    try:
        parsed = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return parsed
    text = (body or b"").decode(errors="replace").strip()[:300] or "no body"
    type_ = "invalid_request_error" if status < 500 else "service_unavailable_error" if p.is_transient(status) \
        else "server_error"
    return error_envelope(f"the worker answered {status}: {text}", type_, f"upstream_{status}")


def refused_asleep(status: int, body: bytes | None) -> bool:
    """The worker's 503 ``worker_sleeping``: it did nothing with the request, so it can be sent again once awake."""
    if status != 503:
        return False
    error = upstream_envelope(status, body).get("error") or {}
    return error.get("code") == "worker_sleeping"


KEEPALIVE = b": keepalive\n\n"
DRAIN_POLL_S = 0.5  # how often a request waiting for its worker looks at the drain deadline


class KeepaliveStream:
    """A streamed request whose worker is not ready yet: SSE comments until it is, then its tokens.

    A client (or a proxy in front of it) that sees nothing for long gives up;
    an SSE comment line (``: keepalive``) is ignored by SSE parsers and keeps
    the connection alive through a long cold start. The status (200) is sent
    with the first keepalive, so anything that goes wrong afterwards - the
    start fails, its deadline passes, the worker refuses the request - ends
    the stream with one ``data: {"error": ...}`` event, as a stream that fails
    after it started does (design.md). Closing it (the client left) gives up
    the place in the queue, or the lease, and the upstream connection.
    """

    def __init__(self, plane: DataPlane, ticket: Any, model: str, path: str, body: bytes, every_s: float,
                 endpoint: str | None = None) -> None:
        self._endpoint = endpoint
        self._plane, self._ticket, self._model, self._path, self._body = plane, ticket, model, path, body
        self._every = every_s
        self._relay: RelayStream | None = None
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self._run()

    def _run(self) -> Iterator[bytes]:
        plane = self._plane
        try:
            yield KEEPALIVE
            for attempt in (1, 2):
                while True:
                    try:
                        lease = plane.actuator.wait_for(self._ticket, timeout=self._every)
                    except ApiError as err:
                        yield sse_error(err)
                        return
                    if lease is not None:
                        break
                    if drain.closing_soon():  # still waiting for its worker at the drain deadline: say so
                        yield sse_error(ShuttingDown("the requester is shutting down before this model's worker "
                                                     "was ready; retry the request"))
                        return
                    yield KEEPALIVE
                plane.log_lease(self._model, lease.actuation)
                yield f": fma-actuation {lease.actuation.header()}\n\n".encode()
                try:
                    upstream = plane.forward(lease, self._model, self._path, self._body, True,
                                             endpoint=self._endpoint)
                except ApiError as err:
                    if isinstance(err, UpstreamError):
                        plane.actuator.worker_lost(lease)  # gone? replaced now, for the next request
                    yield sse_error(err)
                    return
                if attempt == 1 and upstream.stream is None and refused_asleep(upstream.status, upstream.body):
                    plane.actuator.worker_asleep(lease)  # asleep after all: wait for its wake, then send again
                    try:
                        self._ticket = plane.actuator.admit(self._model)
                    except ApiError as err:
                        yield sse_error(err)
                        return
                    continue
                break
            if upstream.stream is None:  # the worker answered whole: an error, or no stream after all
                if upstream.status >= 400:
                    yield sse_error(UpstreamAnswer(upstream.status, upstream_envelope(upstream.status, upstream.body)))
                else:
                    yield upstream.body or b""
                return
            self._relay = upstream.stream
            yield from upstream.stream
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._relay is not None:
            self._relay.close()
        else:
            self._plane.actuator.abandon(self._ticket)


class DataPlane:
    def __init__(self, actuator: Actuator, proxy: WorkerProxy, metrics: RequesterMetrics,
                 keepalive_s: float = 0.0) -> None:
        self.actuator = actuator
        self.proxy = proxy
        self.metrics = metrics
        self.keepalive_s = keepalive_s  # 0: no keepalives, a stream waits like any request

    def log_lease(self, model: str, actuation: Actuation) -> None:
        if actuation.path == "warm":
            log.info("%s: warm, worker leased in %.2f ms", model, actuation.seconds * 1000)
        else:
            log.info("%s served after a %s start of %.2f s", model, actuation.path, actuation.seconds)

    def forward(self, lease: Any, model: str, path: str, body: bytes, stream: bool,
                deadline: float | None = None, endpoint: str | None = None) -> Any:
        """Send to the worker and count the answer; a worker that cannot be reached is reported. With a
        ``deadline`` (monotonic), the worker's answer is waited for until then and no longer."""
        label = endpoint or path  # the client's endpoint in metrics (/v1/responses is served on the chat path)
        read_timeout = None
        if deadline is not None:
            read_timeout = deadline - time.monotonic()
            if read_timeout <= 0:
                lease.done()
                raise DeadlineExceeded(f"the request's deadline passed before the worker for {model} was free")
        try:
            upstream = self.proxy.forward(lease, path, body, stream, read_timeout=read_timeout)
        except (UpstreamError, UpstreamTimeout) as exc:
            self.metrics.requests.labels(model, label, str(exc.status)).inc()
            if exc.code == "upstream_timeout" and deadline is not None and time.monotonic() >= deadline - 0.05:
                # Our deadline, not a hung worker: the worker is busy with a long answer, so no probe.
                raise DeadlineExceeded(f"the worker for {model} had not answered when the request's deadline "
                                       f"passed") from None
            if exc.code == "upstream_timeout":
                # Hung (a SIGSTOPped or wedged process)? A probe off the request's path tells; a worker that does
                # not answer its /health is replaced, so the model does not stay unusable.
                self.actuator.worker_unreachable(lease)
            raise
        except ApiError as exc:
            self.metrics.requests.labels(model, label, str(exc.status)).inc()
            raise
        self.metrics.requests.labels(model, label, str(upstream.status)).inc()
        if upstream.stream is not None:
            upstream.stream.on_broken = lambda: self.actuator.worker_unreachable(lease)
        return upstream

    def _wait_for_worker(self, model: str, deadline: float | None = None) -> Any:
        """A lease for a request that is not streamed: waits like ``ensure_ready``, but a request still waiting
        for its worker when the drain deadline comes is answered 503 ``shutting_down`` (retry elsewhere or
        later), never left to be reset when gunicorn kills what is left; one still waiting at its own
        ``deadline`` is answered 504 ``deadline_exceeded``."""
        ticket = self.actuator.admit(model)
        while True:
            lease = self.actuator.wait_for(ticket, timeout=DRAIN_POLL_S)
            if lease is not None:
                return lease
            if deadline is not None and time.monotonic() >= deadline:
                self.actuator.abandon(ticket)
                raise DeadlineExceeded(f"the worker for {model} was not ready within the request's deadline")
            if drain.closing_soon():
                self.actuator.abandon(ticket)
                raise ShuttingDown(f"the requester is shutting down before the worker for {model} was ready; "
                                   f"retry the request", headers={"Retry-After": "1"})

    def complete(self, model: str, path: str, body: bytes, stream: bool, deadline: float | None = None,
                 endpoint: str | None = None) -> Completion:
        """Serve one request: raises a typed :class:`ApiError` (an :class:`UpstreamAnswer`
        for the worker's own error answers) or returns the worker's success.

        A stream whose worker is not ready within ``keepalive_s`` becomes a
        :class:`KeepaliveStream` (200 at once, comments while it waits)."""
        for attempt in (1, 2):
            if stream and self.keepalive_s > 0:
                ticket = self.actuator.admit(model)  # a full queue or a backoff is still a proper 429/503
                lease = self.actuator.wait_for(ticket, timeout=self.keepalive_s)
                if lease is None:
                    log.info("%s: the worker is not ready; keeping the stream alive while it starts", model)
                    return Completion(200, {"Content-Type": "text/event-stream"}, None,
                                      stream=KeepaliveStream(self, ticket, model, path, body, self.keepalive_s,
                                                                            endpoint))
            else:
                lease = self._wait_for_worker(model, deadline)
            self.log_lease(model, lease.actuation)
            try:
                upstream = self.forward(lease, model, path, body, stream, deadline, endpoint)
            except UpstreamError as exc:
                # The connection failed before the worker answered; a worker that is gone is replaced. The request
                # goes again, to a new worker (the client sees a cold start), only when no live process can have
                # accepted it: refused, or sent into a socket already closed (docs/design.md, request flow).
                # A worker that died while it had the request may have died of it: that is a 502, not a retry.
                gone = self.actuator.worker_lost(lease)
                if gone and attempt == 1 and getattr(exc, "not_received", False):
                    log.warning("%s: the worker was gone before it took the request (%s); retrying on a new "
                                "worker", model, exc.message[:200])
                    continue
                raise
            if attempt == 1 and upstream.stream is None and refused_asleep(upstream.status, upstream.body):
                # Asleep though we thought it awake (put to sleep by someone else, or adopted before it said so):
                # it refused before doing anything, so the request goes again, through a wake.
                self.actuator.worker_asleep(lease)
                continue
            break
        headers = {**upstream.headers, "X-FMA-Actuation": lease.actuation.header()}
        if upstream.status >= 400:
            if upstream.stream is not None:  # an error answer is never streamed; read and close it
                upstream.stream.close()
            retry = {k: v for k, v in upstream.headers.items() if k.lower() == "retry-after"}
            raise UpstreamAnswer(upstream.status, upstream_envelope(upstream.status, upstream.body),
                                 headers={**retry, "X-FMA-Actuation": lease.actuation.header()})
        if upstream.body is not None and not _is_json_object(upstream.body):
            # A worker's success is an OpenAI response object; anything else (an HTML page from something in
            # between, a truncated or garbled body) must not reach the client as a 200. Probe the worker too.
            self.metrics.upstream_errors.labels(model, "bad_body").inc()
            self.actuator.worker_unreachable(lease)
            ctype = next((v for k, v in upstream.headers.items() if k.lower() == "content-type"), "no content type")
            raise UpstreamError(f"the worker for {model} answered {upstream.status} with a body that is not a JSON "
                                f"object ({len(upstream.body)} bytes, {ctype})", code="upstream_bad_body",
                                headers={"X-FMA-Actuation": lease.actuation.header()})
        return Completion(upstream.status, headers, lease.actuation, body=upstream.body, stream=upstream.stream)

    def complete_event(self, model: str, data: dict[str, Any], deadline_s: float | None = None) -> EventOutcome:
        """A whole completion for a CloudEvent. Transient failures are raised (the
        broker retries: no reply event); permanent ones are a failed outcome, the
        ``deadline_s`` passing included (retrying would pass it again)."""
        body = json.dumps({**data, "model": model, "stream": False}).encode()
        deadline = time.monotonic() + deadline_s if deadline_s is not None else None
        try:
            done = self.complete(model, p.PATH_COMPLETIONS, body, stream=False, deadline=deadline)
        except ApiError as err:
            # Our own deadline is permanent whatever its status: a redelivery would wait as long and be cut again.
            if p.is_transient(err.status) and not isinstance(err, DeadlineExceeded):
                raise
            return EventOutcome(False, err.envelope())
        return EventOutcome(True, done.json())  # complete() checked it is a JSON object
