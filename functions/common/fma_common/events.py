"""CloudEvents: the event types of the contract and reply framing.

Uses the CloudEvents SDK 2.x (``cloudevents.core``). A reply answers in the
mode (binary or structured) the event arrived in, carries a new ``id`` and the
extension ``requestid`` = the incoming event's ``id`` (design.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

from .errors import InvalidRequest
from .http import check_json_tree, loads_checked

COMPLETION_REQUESTED = "ai.llm-d.fma.completion.requested"
COMPLETION_SUCCEEDED = "ai.llm-d.fma.completion.succeeded"
COMPLETION_FAILED = "ai.llm-d.fma.completion.failed"
WORKER_WARM_REQUESTED = "ai.llm-d.fma.worker.warm.requested"
WORKER_READY = "ai.llm-d.fma.worker.ready"
WORKER_RELEASE_REQUESTED = "ai.llm-d.fma.worker.release.requested"
WORKER_RELEASED = "ai.llm-d.fma.worker.released"
WORKER_STARTED = "ai.llm-d.fma.worker.started"
WORKER_FAILED = "ai.llm-d.fma.worker.failed"
WORKER_SLEEPING = "ai.llm-d.fma.worker.sleeping"

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"


@dataclass(frozen=True)
class IncomingEvent:
    event: CloudEvent
    structured: bool

    @property
    def type(self) -> str:
        return self.event.get_type()

    @property
    def id(self) -> str:
        return self.event.get_id()

    @property
    def subject(self) -> str | None:
        return self.event.get_subject()

    def data_object(self) -> dict[str, Any]:
        """The event data as a JSON object, or :class:`InvalidRequest`."""
        data = self.event.get_data()
        if isinstance(data, (bytes, bytearray, str)):
            data = loads_checked(data, "event data")
        else:
            check_json_tree(data, "event data")
        if not isinstance(data, dict):
            raise InvalidRequest("event data must be a JSON object")
        return data


def is_cloudevent(headers: Mapping[str, str]) -> bool:
    lower = {k.lower(): v for k, v in headers.items()}
    return "ce-specversion" in lower or lower.get("content-type", "").startswith(STRUCTURED_CONTENT_TYPE)


REQUIRED_ATTRIBUTES = ("id", "source", "type", "specversion")


def _missing_required(lower_headers: Mapping[str, str], body: bytes, structured: bool) -> list[str]:
    """The REQUIRED attributes (CloudEvents 1.0, "Required Attributes") the message itself lacks.

    The SDK fills in a missing ``id`` (a fresh UUID) and ``specversion``; a
    reply would then carry a ``requestid`` its sender never knew, so such an
    event is refused instead, as malformed.
    """
    if not structured:
        return [a for a in REQUIRED_ATTRIBUTES if not lower_headers.get(f"ce-{a}")]
    envelope = loads_checked(body, "the structured event")  # invalid JSON is a 400 with its own reason
    if not isinstance(envelope, dict):
        raise InvalidRequest("malformed CloudEvent: a structured event is a JSON object")
    return [a for a in REQUIRED_ATTRIBUTES if a not in envelope]


def parse_event(headers: Mapping[str, str], body: bytes) -> IncomingEvent:
    """Decode a binary or structured event; anything malformed is a 400."""
    lower = {k.lower(): v for k, v in headers.items()}
    structured = lower.get("content-type", "").startswith(STRUCTURED_CONTENT_TYPE)
    if not structured and "ce-specversion" not in lower:
        raise InvalidRequest("not a CloudEvent: send ce-* headers (binary mode) or "
                             "Content-Type: application/cloudevents+json (structured mode)")
    missing = _missing_required(lower, body, structured)
    if missing:
        raise InvalidRequest(f"malformed CloudEvent: missing required attribute(s) {', '.join(missing)}")
    try:
        event = from_http_event(HTTPMessage(dict(headers), body))
    except Exception as exc:  # the SDK raises several unrelated types for bad input
        raise InvalidRequest(f"malformed CloudEvent: {exc}".splitlines()[0][:500]) from None
    return IncomingEvent(event, structured)


def make_event(type_: str, source: str, data: Any, *, subject: str | None = None,
               requestid: str | None = None, extensions: Mapping[str, str] | None = None) -> CloudEvent:
    attrs: dict[str, Any] = {**(extensions or {}), "type": type_, "source": source,
                             "datacontenttype": "application/json"}
    if subject:
        attrs["subject"] = subject
    if requestid:
        attrs["requestid"] = requestid
    return CloudEvent(attrs, data)


def encode_event(event: CloudEvent, structured: bool) -> tuple[bytes, dict[str, str]]:
    msg = to_structured_event(event) if structured else to_binary_event(event)
    return msg.body, dict(msg.headers)


# Knative Eventing's RequestReply (eventing.knative.dev/v1alpha1) puts a signed id in this extension of the
# request and matches a reply by the same value in the reply attribute (the resource's defaults:
# pkg/apis/eventing/v1alpha1/requestreply_defaults.go); echoing it is what lets a reply find its caller.
CORRELATION_ATTRIBUTE = "correlationid"
# CloudEvents' sequence extension (cloudevents/spec extensions/sequence.md): a sender's events in order, compared as
# strings. The requester's lifecycle events carry it; the event log orders by it.
SEQUENCE_ATTRIBUTE = "sequence"
REPLY_ATTRIBUTE = "replyid"


def reply_event(incoming: IncomingEvent, type_: str, source: str, data: Any,
                subject: str | None = None) -> CloudEvent:
    correlation = incoming.event.get_extension(CORRELATION_ATTRIBUTE)
    extensions = {REPLY_ATTRIBUTE: str(correlation)} if correlation else None
    return make_event(type_, source, data, subject=subject or incoming.subject, requestid=incoming.id,
                      extensions=extensions)


def reply_to(incoming: IncomingEvent, type_: str, source: str, data: Any,
             subject: str | None = None) -> tuple[bytes, dict[str, str]]:
    """The reply event, encoded in the mode the request came in."""
    return encode_event(reply_event(incoming, type_, source, data, subject), incoming.structured)
