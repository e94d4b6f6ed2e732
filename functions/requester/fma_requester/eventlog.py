"""The event log: where the example's Broker puts what it could not deliver, and lifecycle events go.

A small scale-to-zero Knative Service (``fma event-log``, in the requester's
image) in the shape of Knative's event-display: every CloudEvent it receives
is one log line, and the last ``FMA_EVENTLOG_KEEP`` are kept in memory for
``GET /events``.

* ``POST /`` - lifecycle events (``ai.llm-d.fma.worker.*``) from their
  Trigger: logged at info.
* ``POST /dead-letter`` - the Broker's dead-letter sink: an event whose
  deliveries all failed, with the extensions Knative adds
  (``knativeerrordest``, ``knativeerrorcode``, ``knativeerrordata``: the
  subscriber's last answer, base64; ``pkg/kncloudevents/event_dispatcher.go``)
  logged at warning and counted in ``fma_dead_letters_total{type}``.

Delivery is at least once and, through an asynchronous channel, in no
particular order (a Broker retries a delivery whose answer it did not see;
the channel dispatches each event on its own). So an event whose ``source``
and ``id`` were already recorded is answered 202 and not recorded again (the
CloudEvents spec: the pair identifies an event), counted in
``fma_events_duplicate_total``; and events that carry the ``sequence``
extension are kept in their sender's order, whatever order they came in.

Event data is not logged or kept unless ``FMA_EVENTLOG_DATA=true``: a
dead-lettered ``completion.requested`` carries a prompt. Answers are ``202``
with no body, so nothing is sent back into the Broker.
"""

from __future__ import annotations

import base64
import binascii
import collections
import logging
import threading
import time
from typing import Any

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from fma_common import events
from fma_common.http import install_access_log, json_response, register_error_handlers
from fma_common.logs import setup_logging
from fma_common.settings import EnvSettings, Flag, setting

log = logging.getLogger("fma.eventlog")

KNATIVE_ERROR_EXTENSIONS = ("knativeerrordest", "knativeerrorcode", "knativeerrordata")
_SPEC_ATTRIBUTES = {"specversion", "type", "id", "source", "subject", "time", "datacontenttype", "dataschema"}


class EventLogSettings(EnvSettings):
    bind: str | None = setting("FMA_BIND", None, "address to serve on", shown="0.0.0.0:$PORT, else 127.0.0.1:8080")
    port: int | None = setting("PORT", None, "the port Knative assigns", shown="unset")
    keep: int = setting("FMA_EVENTLOG_KEEP", "200", "events kept in memory for `GET /events` (attributes only, "
                        "unless FMA_EVENTLOG_DATA)", ge=0, le=100_000)
    log_data: Flag = setting("FMA_EVENTLOG_DATA", "false", "log and keep event data too (off: dead-lettered "
                             "completions carry prompts)")
    log_level: str = setting("FMA_LOG_LEVEL", "info", "log level")

    def address(self) -> str:
        return self.bind or (f"0.0.0.0:{self.port}" if self.port else "127.0.0.1:8080")


def _error_text(value: object) -> str:
    """``knativeerrordata`` is the subscriber's answer, base64 and cut at Knative's limit: a readable prefix."""
    try:
        raw = base64.b64decode(str(value) + "=" * (-len(str(value)) % 4), validate=False)
    except (binascii.Error, ValueError):
        return str(value)[:200]
    return raw.decode("utf-8", "replace")[:300]


def create_app(settings: EventLogSettings | None = None) -> Flask:
    settings = settings or EventLogSettings.from_env()
    setup_logging(settings.log_level)
    registry = CollectorRegistry()
    received = Counter("fma_events_received", "CloudEvents received, by type and route", ["type", "route"],
                       registry=registry)
    dead = Counter("fma_dead_letters", "Events the Broker could not deliver, by type", ["type"], registry=registry)
    duplicates = Counter("fma_events_duplicate", "Events received again (same source and id) and not recorded",
                         ["type"], registry=registry)
    kept: collections.deque[dict[str, Any]] = collections.deque(maxlen=settings.keep)
    # (source, id) of recent events, to answer a redelivery without recording it twice. Bounded: a Broker's
    # retries of one event come within minutes, far fewer than this many events apart.
    seen: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
    seen_max = max(1000, 4 * settings.keep)
    lock = threading.Lock()

    def keep_in_order(attrs: dict[str, Any]) -> None:
        """Append, then move back past later events of the same sender (by ``sequence``). Under ``lock``."""
        kept.append(attrs)
        seq = attrs.get(events.SEQUENCE_ATTRIBUTE)
        if seq is None or settings.keep == 0:
            return
        i = len(kept) - 1
        while i > 0:
            before = kept[i - 1]
            if before.get("source") != attrs["source"] or before.get(events.SEQUENCE_ATTRIBUTE) is None or \
                    str(before[events.SEQUENCE_ATTRIBUTE]) <= str(seq):
                break
            kept[i] = before
            i -= 1
        kept[i] = attrs

    app = Flask("fma_eventlog")
    register_error_handlers(app)
    install_access_log(app, "fma.eventlog.access")

    def record(route: str) -> Response:
        incoming = events.parse_event(dict(request.headers), request.get_data())
        ev = incoming.event
        attrs: dict[str, Any] = {"type": ev.get_type(), "id": ev.get_id(), "source": ev.get_source(),
                                 "subject": ev.get_subject(), "time": str(ev.get_time() or ""), "route": route,
                                 "received": time.time()}
        for name, value in ev.get_attributes().items():
            if name in _SPEC_ATTRIBUTES:
                continue
            attrs[name] = _error_text(value) if name == "knativeerrordata" else value
        if settings.log_data:
            data = ev.get_data()
            attrs["data"] = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else data
        key = (str(attrs["source"]), str(attrs["id"]))
        with lock:
            repeated = route == "lifecycle" and key in seen
            if not repeated and route == "lifecycle":
                seen[key] = None
                while len(seen) > seen_max:
                    seen.popitem(last=False)
                keep_in_order(attrs)
            elif not repeated:
                kept.append(attrs)
        if repeated:
            duplicates.labels(attrs["type"]).inc()
            log.info("event %s id=%s from %s received again; already recorded", attrs["type"], attrs["id"],
                     attrs["source"])
            return Response(status=202)
        received.labels(attrs["type"], route).inc()
        shown = {"type", "id", "source", "subject", "time", "route", "received", "data", *KNATIVE_ERROR_EXTENSIONS}
        extra = " ".join(f"{k}={attrs[k]}" for k in sorted(attrs) if k not in shown)
        if route == "dead-letter":
            dead.labels(attrs["type"]).inc()
            log.warning("dead letter %s id=%s subject=%s: delivery to %s failed with %s: %s %s", attrs["type"],
                        attrs["id"], attrs["subject"], attrs.get("knativeerrordest", "?"),
                        attrs.get("knativeerrorcode", "?"), attrs.get("knativeerrordata", ""), extra)
        else:
            log.info("event %s id=%s subject=%s source=%s %s", attrs["type"], attrs["id"], attrs["subject"],
                     attrs["source"], extra)
        if settings.log_data and "data" in attrs:
            log.info("data of %s: %s", attrs["id"], str(attrs["data"])[:2000])
        return Response(status=202)

    @app.post("/")
    def lifecycle() -> Response:
        return record("lifecycle")

    @app.post("/dead-letter")
    def dead_letter() -> Response:
        return record("dead-letter")

    @app.get("/events")
    def recent() -> Response:
        route = request.args.get("route")
        with lock:
            items = [e for e in kept if route is None or e["route"] == route]
        return json_response({"object": "list", "data": items})

    @app.get("/health")
    @app.get("/ready")
    def health() -> Response:
        return Response("OK", mimetype="text/plain")

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    return app
