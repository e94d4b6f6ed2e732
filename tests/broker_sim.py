"""A Knative Eventing Broker (the MT channel-based one) simulated at the HTTP level, for tests.

Read from knative/eventing ``knative-v1.22.2``; each behaviour names the file it mirrors:

* **Ingress** (``pkg/broker/ingress/ingress_handler.go``): ``POST /<namespace>/<broker>`` with a binary or
  structured CloudEvent; a malformed event is 400; the event gets ``knativearrivaltime`` and the TTL
  extension ``knativebrokerttl`` (``pkg/broker/ttl.go``, ``TTLDefaulter``: absent -> 255, the ingress's
  ``MAX_TTL``; present -> one less, at least 0), and an event whose TTL is 0 is dropped with 400: the loop
  guard. Accepted events are answered 202 and fanned out to every Trigger.
* **Filters** (``pkg/broker/filter/filter_handler.go``, ``filterEvent``): ``spec.filters`` when set
  (``exact``, ``prefix``, ``suffix``, ``all``, ``any``, ``not``: ``pkg/eventfilter/subscriptionsapi``), else
  the legacy ``spec.filter.attributes``, where every attribute must be present and equal, ``""`` meaning
  any value (``pkg/eventfilter/attributes/filter.go``).
* **Delivery** to the subscriber (``handleDispatchToSubscriberRequest``): the TTL extension removed, headers
  ``Prefer: reply`` (``pkg/kncloudevents/event_dispatcher.go``) and ``Kn-Namespace``, binary mode unless the
  Trigger's ``delivery.format`` says ``json``. Retries follow the Trigger's ``delivery``, or the Broker's when
  the Trigger has none - the whole spec, not field by field (``pkg/reconciler/broker/trigger/trigger.go``),
  but for the dead-letter sink, which falls back to the Broker's (``pkg/reconciler/subscription/subscription.go``
  ``resolveDeadLetterSink``, from the channel's delivery):
  ``SelectiveRetry`` retries no answer, 5xx, 404, 408, 409 and 429 and nothing else; the wait before retry
  ``i`` (from 0) is ``backoffDelay * 2**i`` (exponential) or ``backoffDelay * i`` (linear), and - only when
  ``retryAfterMax`` is set, which needs the alpha flag ``delivery-retryafter`` - at least the 429/503
  ``Retry-After``, capped by ``retryAfterMax`` (``pkg/kncloudevents/retries.go``; the attempt counter is
  go-retryablehttp's, starting at 0). ``delivery.timeout`` bounds each attempt.
* **Replies** (``writeResponse``): a 2xx whose body is a CloudEvent is sent back into the Broker with the
  TTL it was delivered with, so the ingress takes one off, with the delivery's retries; a reply that cannot be
  delivered sends the original event to the dead-letter sink (``event_dispatcher.go`` ``send``); a 2xx with a
  non-empty body that is not a CloudEvent is a failed delivery (502), retried like any other; an empty 2xx is
  done.
* **Dead letters** (``event_dispatcher.go``, ``dispatchExecutionInfoTransformers``): after the last attempt
  the original event goes to ``deadLetterSink`` (with the delivery's retries) with ``knativeerrordest`` (the
  subscriber's URL), ``knativeerrorcode`` and ``knativeerrordata`` (the last answer's body, base64, cut at
  1024 characters: ``pkg/kncloudevents/attributes/knative_error.go``); with no answer at all, none of them.

* **Sender identity** (feature ``authentication-oidc``, when ``oidc_token`` is given): a delivery to a
  subscriber with an audience (``spec.subscriber.audience``; ``pkg/reconciler/broker/trigger/trigger.go`` puts
  it in ``status.subscriberAudience``) carries ``Authorization: Bearer <jwt>``, a token of the Trigger's
  ServiceAccount for that audience (``filter_handler.go``, ``WithOIDCAuthentication``;
  ``event_dispatcher.go``), the account named ``<trigger>-oidc-eventing.knative.dev-trigger``
  (``pkg/auth/serviceaccount.go``, ``kmeta.ChildName``), the token reused until 5 minutes before it expires
  (``pkg/auth/token_provider.go``; here: for the Broker's life).

* **The channel** (the Broker's InMemoryChannel ``<broker>-kne-trigger``): synchronous unless the Broker carries
  ``messaging.knative.dev/async-handler`` parsed true by Go's ``strconv.ParseBool`` (``broker.go`` ``ReconcileKind``
  copies every ``messaging.knative.dev*`` annotation to the channel; ``inmemorychannel.go``
  ``newConfigForInMemoryChannel``). *Synchronous*: the ingress answers its producer only after every matching
  Trigger's delivery ended - its subscriber's cold start, every retry and backoff, the reply's own ingress (itself
  synchronous) and the dead letter - 202 when all succeeded or were dead-lettered, else 500 with no body, never the
  subscriber's status (``fanout_event_handler.go`` ``dispatch``; ``event_receiver.go`` ``ServeHTTP``;
  ``ingress_handler.go`` ``receive`` turns any non-2xx into 500). The fan-out gives up after 15 minutes without a
  further result (``defaultTimeout``, restarted per awaited result): 500. Deliveries run on the producer's request
  context: a producer that hangs up cancels them, retries included (here: the connection to the subscriber is shut).
  *Asynchronous*: 202 once the event parsed, deliveries in the background, their failures only logged.

Not simulated: the channel's own persistence (delivery here is in memory, one thread per event and
Trigger), TLS, CESQL filters, EventTypes, OIDC at the ingress. Waits run ``speed`` times faster than wall
time.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import queue
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

TTL_ATTRIBUTE = "knativebrokerttl"
ASYNC_ANNOTATION = "messaging.knative.dev/async-handler"  # in_memory_channel_types.go AsyncHandlerAnnotation
FANOUT_TIMEOUT_S = 15 * 60.0  # fanout_event_handler.go defaultTimeout
MAX_TTL = 255
ERROR_DATA_MAX = 1024

_PERIOD = re.compile(r"^P(?!$)(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)W)?(?:(\d+)D)?"
                     r"(?:T(?=\d)(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?$")


class _Scope:
    """A request context (Go's ``context.WithCancel``): cancelled by itself or by its parent, never the other way."""

    def __init__(self, parent: _Scope | None = None) -> None:
        self._event = threading.Event()
        self._parent = parent

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set() or (self._parent is not None and self._parent.is_set())

    def wait(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not self.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self._event.wait(min(left, 0.02))
        return True


def go_parse_bool(text: str | None) -> bool:
    """Go's ``strconv.ParseBool``; anything it refuses counts as false (``newConfigForInMemoryChannel``)."""
    return text in ("1", "t", "T", "TRUE", "true", "True")


def client_hung_up(conn: socket.socket) -> bool:
    """The client closed its side of this server connection (Go cancels the request's context then)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def iso8601_seconds(text: str) -> float:
    """An ISO 8601 period as Knative parses it (rickb777/date ``period.Parse``), in seconds."""
    m = _PERIOD.match(text)
    if not m:
        raise ValueError(f"{text!r} is not an ISO 8601 duration")
    y, mo, w, d, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return ((((y * 365.2425 + mo * 30.436875 + w * 7 + d) * 24 + h) * 60 + mi) * 60) + s


@dataclass(frozen=True)
class Delivery:
    retry: int = 0
    backoff_policy: str | None = None
    backoff_delay_s: float | None = None
    timeout_s: float | None = None
    retry_after_max_s: float | None = None
    dead_letter: Mapping[str, Any] | None = None  # a Destination, resolved when used
    format: str | None = None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> Delivery:
        spec = spec or {}
        return cls(retry=int(spec.get("retry", 0)), backoff_policy=spec.get("backoffPolicy"),
                   backoff_delay_s=iso8601_seconds(spec["backoffDelay"]) if "backoffDelay" in spec else None,
                   timeout_s=iso8601_seconds(spec["timeout"]) if "timeout" in spec else None,
                   retry_after_max_s=iso8601_seconds(spec["retryAfterMax"]) if "retryAfterMax" in spec else None,
                   dead_letter=spec.get("deadLetterSink"),
                   format=spec.get("format"))

    def backoff(self, attempt: int, status: int | None, retry_after: str | None) -> float:
        """retries.go: generateBackoffFn over RetryConfigFromDeliverySpec."""
        wait = 0.0
        if self.backoff_policy and self.backoff_delay_s is not None:
            wait = self.backoff_delay_s * (2 ** attempt if self.backoff_policy == "exponential" else attempt)
        if self.retry_after_max_s is not None and status in (429, 503) and retry_after:
            try:
                after = float(int(retry_after))
            except ValueError:
                after = 0.0
            wait = max(wait, min(after, self.retry_after_max_s))
        return wait


def _trigger_delivery(own: Mapping[str, Any] | None, broker: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """trigger.go subscribeToBrokerChannel: the Trigger's delivery or else the Broker's, whole - except the dead-letter
    sink, which a Subscription without one takes from its channel, whose delivery is the Broker's
    (subscription.go resolveDeadLetterSink; broker.go gives the channel ``b.Spec.Delivery``)."""
    if not own:
        return broker
    if "deadLetterSink" not in own and broker and broker.get("deadLetterSink"):
        return {**own, "deadLetterSink": broker["deadLetterSink"]}
    return own


def should_retry(status: int | None) -> bool:
    """retries.go: SelectiveRetry (``None``: no answer at all)."""
    return status is None or status >= 500 or status in (404, 408, 409, 429)


# ---- filters ------------------------------------------------------------------------------

def _attribute(attrs: Mapping[str, Any], name: str) -> Any:
    return attrs.get(name)


def _dialect(expr: Mapping[str, Any], attrs: Mapping[str, Any]) -> bool:
    (kind, arg), = expr.items()
    if kind in ("exact", "prefix", "suffix"):
        for name, want in arg.items():
            value = _attribute(attrs, name)
            if value is None:
                return False
            value = str(value)
            if (kind == "exact" and value != want) or (kind == "prefix" and not value.startswith(want)) or \
                    (kind == "suffix" and not value.endswith(want)):
                return False
        return True
    if kind == "all":
        return all(_dialect(e, attrs) for e in arg)
    if kind == "any":
        return any(_dialect(e, attrs) for e in arg)
    if kind == "not":
        return not _dialect(arg, attrs)
    raise NotImplementedError(f"filter dialect {kind!r} is not simulated")


def trigger_matches(spec: Mapping[str, Any], attrs: Mapping[str, Any]) -> bool:
    """filter_handler.go filterEvent: ``filters`` if any, else the legacy attributes filter."""
    if spec.get("filters"):
        return all(_dialect(f, attrs) for f in spec["filters"])
    wanted = ((spec.get("filter") or {}).get("attributes")) or {}
    for name, value in wanted.items():
        have = _attribute(attrs, name)
        if have is None or (value == "" and have == ""):
            return False
        if value != "" and str(have) != value:
            return False
    return True


def attribute_view(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes as filters see them: strings (``time`` as RFC 3339)."""
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in attrs.items()}


# ---- the broker ---------------------------------------------------------------------------

@dataclass
class Attempt:
    status: int | None
    retry_after: str | None
    at: float


@dataclass
class DeliveryRecord:
    trigger: str
    event_type: str
    event_id: str
    attempts: list[Attempt] = field(default_factory=list)
    outcome: str = "pending"  # delivered | replied | dead-lettered | failed
    request_headers: dict[str, str] = field(default_factory=dict)


@dataclass
class SimTrigger:
    name: str
    spec: dict[str, Any]
    delivery: Delivery


class SimulatedBroker:
    """One Broker with its Triggers, taken from rendered manifests; ``resolve`` maps a Destination to a URL
    (when an event is delivered, so subscribers may start after the Broker, as on a cluster)."""

    def __init__(self, broker: Mapping[str, Any], triggers: list[Mapping[str, Any]],
                 resolve: Callable[[Mapping[str, Any]], str], *, speed: float = 1.0,
                 oidc_token: Callable[[str, str], str] | None = None) -> None:
        self.oidc_token = oidc_token  # (ServiceAccount username, audience) -> JWT, as a TokenRequest gives
        annotations = (broker.get("metadata") or {}).get("annotations") or {}
        self.asynchronous = go_parse_bool(annotations.get(ASYNC_ANNOTATION))
        self.fanout_timeout_s = FANOUT_TIMEOUT_S
        self._tokens: dict[tuple[str, str], str] = {}
        self.name = broker["metadata"]["name"]
        self.namespace = broker["metadata"].get("namespace", "default")
        self.speed = speed
        self.resolve = resolve
        broker_delivery = (broker.get("spec") or {}).get("delivery")
        self.triggers = [
            SimTrigger(t["metadata"]["name"], t["spec"],
                       Delivery.from_spec(_trigger_delivery(t["spec"].get("delivery"), broker_delivery)))
            for t in triggers if t["spec"].get("broker") == self.name]
        self.records: list[DeliveryRecord] = []
        self.received: list[dict[str, Any]] = []  # every event the ingress accepted, attributes only
        self.dropped_ttl: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._http = httpx.Client(timeout=None)
        broker_sim = self

        class Ingress(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = broker_sim._ingress(self.path, dict(self.headers), body, producer=self.connection)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Ingress)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/{self.namespace}/{self.name}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    # ---- ingress ----------------------------------------------------------------------------

    def _ingress(self, path: str, headers: dict[str, str], body: bytes, producer: socket.socket | None = None,
                 parent: _Scope | None = None) -> int:
        if path.rstrip("/") != f"/{self.namespace}/{self.name}":
            return 404
        try:
            event = from_http_event(HTTPMessage(headers, body))
        except Exception:
            return 400
        attrs = dict(event.get_attributes())
        ttl_raw = attrs.get(TTL_ATTRIBUTE)
        try:
            ttl = MAX_TTL if ttl_raw is None else max(0, int(ttl_raw) - 1)
        except (TypeError, ValueError):
            ttl = MAX_TTL
        attrs[TTL_ATTRIBUTE] = ttl
        attrs["knativearrivaltime"] = datetime.now(UTC).isoformat()
        view = attribute_view(attrs)
        if ttl <= 0:
            with self._lock:
                self.dropped_ttl.append(view)
            return 400
        with self._lock:
            self.received.append(view)
        data = event.get_data()
        cancel = _Scope(parent)  # this request's context: a reply's own fan-out timing out cancels only its own
        results: queue.Queue[bool] = queue.Queue()
        started = 0
        for trigger in self.triggers:
            if trigger_matches(trigger.spec, view):
                # Asynchronous: on context.Background(), so the producer hanging up cancels nothing.
                own = _Scope() if self.asynchronous else cancel
                thread = threading.Thread(
                    target=lambda t=trigger, c=own: results.put(self._dispatch(t, attrs, data, c)), daemon=True)
                self._threads.append(thread)
                thread.start()
                started += 1
        if self.asynchronous or not started:
            return 202
        ok = True
        for _ in range(started):
            result = self._await(results, producer, cancel)
            if result is None:  # the fan-out timed out, or the producer hung up
                return 500
            ok = ok and result
        return 202 if ok else 500

    def _await(self, results: queue.Queue[bool], producer: socket.socket | None, cancel: _Scope) -> bool | None:
        """The next delivery's result, or None when the fan-out's timer ran out (it restarts per result) or the
        producer hung up (then every delivery of the event is cancelled)."""
        deadline = time.monotonic() + self.fanout_timeout_s / self.speed
        while time.monotonic() < deadline:
            try:
                return results.get(timeout=0.02)
            except queue.Empty:
                pass
            if producer is not None and client_hung_up(producer):
                cancel.set()
                return None
            if cancel.is_set():
                return None
        cancel.set()
        return None

    # ---- dispatch ---------------------------------------------------------------------------

    def _dispatch(self, trigger: SimTrigger, attrs: dict[str, Any], data: Any, cancel: _Scope) -> bool:
        """One Trigger's delivery of one event, to the end: True when it was delivered (or replied, and the reply
        accepted) or dead-lettered, False when it failed or was cancelled."""
        ttl = attrs[TTL_ATTRIBUTE]
        delivered = {k: v for k, v in attrs.items() if k != TTL_ATTRIBUTE}
        event = CloudEvent(delivered, data)
        structured = trigger.delivery.format == "json"
        msg = to_structured_event(event) if structured else to_binary_event(event)
        headers = {**dict(msg.headers), "Prefer": "reply", "Kn-Namespace": self.namespace}
        audience = trigger.spec["subscriber"].get("audience")
        if self.oidc_token is not None and audience:
            headers["Authorization"] = f"Bearer {self._token_for(trigger.name, audience)}"
        record = DeliveryRecord(trigger.name, attrs["type"], attrs["id"], request_headers=headers)
        with self._lock:
            self.records.append(record)
        d = trigger.delivery
        subscriber = self.resolve(trigger.spec["subscriber"])
        last_body, last_status = b"", None
        for attempt in range(d.retry + 1):
            if cancel.is_set():
                record.outcome = "cancelled"
                return False
            status, retry_after, resp_headers, body = self._post(subscriber, headers, msg.body, d.timeout_s, cancel)
            if status is not None and 200 <= status < 300:
                reply = _reply_event(resp_headers, body)
                if reply is _NOT_AN_EVENT:
                    status = 502  # writeResponse: a non-empty answer that is not a CloudEvent
                else:
                    record.attempts.append(Attempt(status, retry_after, time.monotonic()))
                    if reply is None:
                        record.outcome = "delivered"
                        return True
                    # event_dispatcher.go send: the reply goes to the Broker with the same retries; a reply that
                    # cannot be delivered sends the original event to the dead-letter sink.
                    if self._send_reply(reply, ttl, cancel, d):
                        record.outcome = "replied"
                        return True
                    record.outcome = "reply-failed"
                    last_body, last_status = body, status
                    break
            record.attempts.append(Attempt(status, retry_after, time.monotonic()))
            last_body, last_status = body, status
            if not should_retry(status) or attempt == d.retry:
                break
            if cancel.wait(d.backoff(attempt, status, retry_after) / self.speed):
                record.outcome = "cancelled"
                return False
        if cancel.is_set():
            record.outcome = "cancelled"
            return False
        if d.dead_letter and self._dead_letter(self.resolve(d.dead_letter), subscriber, delivered, data, last_status,
                                               last_body, d, cancel):
            record.outcome = "dead-lettered"
            return True  # event_dispatcher.go send: a dead letter accepted is a delivery that succeeded
        if record.outcome != "reply-failed":
            record.outcome = "failed"
        return False

    def _send_reply(self, reply: CloudEvent, ttl: int, cancel: _Scope, d: Delivery) -> bool:
        for attempt in range(d.retry + 1):
            if cancel.is_set():
                return False
            status = self._reenqueue(reply, ttl, cancel)
            if 200 <= status < 300:
                return True
            if not should_retry(status) or attempt == d.retry:
                return False
            if cancel.wait(d.backoff(attempt, status, None) / self.speed):
                return False
        return False

    def _token_for(self, trigger: str, audience: str) -> str:
        suffix = "-oidc-eventing.knative.dev-trigger"
        if len(trigger) + len(suffix) > 63:  # kmeta.ChildName would shorten it with a hash: not simulated
            raise ValueError(f"Trigger name {trigger!r} too long for the simulated OIDC identity")
        user = f"system:serviceaccount:{self.namespace}:{trigger}{suffix}"
        with self._lock:
            if (user, audience) not in self._tokens:
                self._tokens[(user, audience)] = self.oidc_token(user, audience)
            return self._tokens[(user, audience)]

    def _post(self, url: str, headers: Mapping[str, str], body: bytes, timeout: float | None,
              cancel: _Scope | None = None) -> tuple[int | None, str | None, dict[str, str], bytes]:
        """One attempt, on its own connection so a cancelled context can shut it (the subscriber, or an activator
        holding the request for a cold pod, sees the client go away)."""
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80,
                                          timeout=None if timeout is None else timeout / self.speed)
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.02):
                if cancel is not None and cancel.is_set():
                    if conn.sock is not None:
                        with contextlib.suppress(OSError):
                            conn.sock.shutdown(socket.SHUT_RDWR)
                    return

        threading.Thread(target=watch, daemon=True).start()
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("POST", target, body=body,
                         headers={**dict(headers), "Content-Length": str(len(body))})
            resp = conn.getresponse()
            content = resp.read()
            return resp.status, resp.getheader("Retry-After"), dict(resp.getheaders()), content
        except (OSError, http.client.HTTPException):
            return None, None, {}, b""
        finally:
            done.set()
            conn.close()

    def _reenqueue(self, reply: CloudEvent, ttl: int, parent: _Scope | None = None) -> int:
        attrs = {**reply.get_attributes(), TTL_ATTRIBUTE: ttl}
        msg = to_binary_event(CloudEvent(attrs, reply.get_data()))
        return self._ingress(f"/{self.namespace}/{self.name}", dict(msg.headers), msg.body, parent=parent)

    def _dead_letter(self, url: str, subscriber: str, attrs: dict[str, Any], data: Any, status: int | None,
                     body: bytes, d: Delivery, cancel: _Scope) -> bool:
        """event_dispatcher.go send: the dead letter gets the same retries and per-attempt timeout, on the same
        context. The error extensions come from the filter's answer; with no answer at all (a timeout, a connection
        that failed) there is none to decode, and the event goes without them (dispatchExecutionInfoTransformers)."""
        extra: dict[str, str] = {}
        if status is not None:
            extra = {"knativeerrordest": subscriber, "knativeerrorcode": str(status)}
            encoded = base64.b64encode(body).decode()[:ERROR_DATA_MAX]
            if encoded:
                extra["knativeerrordata"] = encoded
        msg = to_binary_event(CloudEvent({**attrs, **extra}, data))
        for attempt in range(d.retry + 1):
            answer, retry_after, _, _ = self._post(url, dict(msg.headers), msg.body, d.timeout_s, cancel)
            if answer is not None and 200 <= answer < 300:
                return True
            if not should_retry(answer) or attempt == d.retry or \
                    cancel.wait(d.backoff(attempt, answer, retry_after) / self.speed):
                return False
        return False

    # ---- for tests --------------------------------------------------------------------------

    def wait(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; deliveries: {self.summary()}")

    def summary(self) -> list[str]:
        with self._lock:
            return [f"{r.trigger} {r.event_type} {r.outcome} {[a.status for a in r.attempts]}" for r in self.records]

    def deliveries(self, trigger: str) -> list[DeliveryRecord]:
        with self._lock:
            return [r for r in self.records if r.trigger == trigger]


_NOT_AN_EVENT = object()


def _reply_event(headers: Mapping[str, str], body: bytes) -> Any:
    """None: no reply; a CloudEvent; or _NOT_AN_EVENT (a body that is not one)."""
    lower = {k.lower(): v for k, v in headers.items()}
    if "ce-specversion" not in lower and not lower.get("content-type", "").startswith("application/cloudevents"):
        return None if not body else _NOT_AN_EVENT
    try:
        return from_http_event(HTTPMessage(dict(headers), body))
    except Exception:
        return _NOT_AN_EVENT


def load_json(body: bytes) -> Any:
    return json.loads(body)
