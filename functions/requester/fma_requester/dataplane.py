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
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from fma_common.errors import ApiError, UpstreamAnswer, UpstreamError, error_envelope

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
    actuation: Actuation
    body: bytes | None = None
    stream: RelayStream | None = None

    def json(self) -> Any:
        return json.loads(self.body or b"")


@dataclass(frozen=True)
class EventOutcome:
    """What a ``completion.requested`` event gets back: succeeded (the response) or failed (an envelope)."""

    ok: bool
    data: dict[str, Any]


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


class DataPlane:
    def __init__(self, actuator: Actuator, proxy: WorkerProxy, metrics: RequesterMetrics) -> None:
        self.actuator = actuator
        self.proxy = proxy
        self.metrics = metrics

    def complete(self, model: str, path: str, body: bytes, stream: bool) -> Completion:
        """Serve one request: raises a typed :class:`ApiError` (an :class:`UpstreamAnswer`
        for the worker's own error answers) or returns the worker's success."""
        lease = self.actuator.ensure_ready(model)
        if lease.actuation.path == "warm":
            log.info("%s: warm, worker leased in %.2f ms", model, lease.actuation.seconds * 1000)
        else:
            log.info("%s served after a %s start of %.2f s", model, lease.actuation.path, lease.actuation.seconds)
        try:
            upstream = self.proxy.forward(lease, path, body, stream)
        except UpstreamError as exc:
            self.metrics.requests.labels(model, path, str(exc.status)).inc()
            if exc.code == "worker_unreachable":
                self.actuator.worker_unreachable(lease)  # is it gone? then the next request starts a new one
            raise
        except ApiError as exc:
            self.metrics.requests.labels(model, path, str(exc.status)).inc()
            raise
        self.metrics.requests.labels(model, path, str(upstream.status)).inc()
        headers = {**upstream.headers, "X-FMA-Actuation": lease.actuation.header()}
        if upstream.status >= 400:
            if upstream.stream is not None:  # an error answer is never streamed; read and close it
                upstream.stream.close()
            retry = {k: v for k, v in upstream.headers.items() if k.lower() == "retry-after"}
            raise UpstreamAnswer(upstream.status, upstream_envelope(upstream.status, upstream.body),
                                 headers={**retry, "X-FMA-Actuation": lease.actuation.header()})
        return Completion(upstream.status, headers, lease.actuation, body=upstream.body, stream=upstream.stream)

    def complete_event(self, model: str, data: dict[str, Any]) -> EventOutcome:
        """A whole completion for a CloudEvent. Transient failures are raised (the
        broker retries: no reply event); permanent ones are a failed outcome."""
        body = json.dumps({**data, "model": model, "stream": False}).encode()
        try:
            done = self.complete(model, p.PATH_COMPLETIONS, body, stream=False)
        except ApiError as err:
            if p.is_transient(err.status):
                raise
            return EventOutcome(False, err.envelope())
        try:
            payload = done.json()
        except (ValueError, UnicodeDecodeError):
            payload = None
        if not isinstance(payload, dict):
            return EventOutcome(False, error_envelope("the worker answered with a body that is not a JSON object",
                                                      "server_error", "upstream_bad_body"))
        return EventOutcome(True, payload)
