"""The requester's HTTP edge: a Flask application factory.

gunicorn serves ``fma_requester.app:create_app()`` with the gevent worker
class and one process (see ``gunicorn_conf.py``): one process means one owner
of the actuator's state, so there is exactly one worker per model; gevent lets
that process hold thousands of idle or streaming connections in a few MiB.
This module imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import logging
import threading

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from fma_common import events
from fma_common.errors import ApiError, InvalidRequest
from fma_common.http import (
    SSE_HEADERS,
    install_access_log,
    json_response,
    parse_json,
    parse_model,
    query_args,
    register_error_handlers,
)
from fma_common.logs import setup_logging
from fma_common.settings import describe

from .actuator import Actuator
from .events import SOURCE, SinkEmitter
from .gpus import nvidia_smi
from .metrics import RequesterMetrics
from .proxy import WorkerProxy
from .registry import ModelRegistry
from .settings import RequesterSettings

log = logging.getLogger("fma.requester")

# Every live app, so gunicorn's worker_exit hook can stop their workers.
_LIVE: list[Flask] = []


class RoutedRequest(BaseModel):
    """The two fields the requester reads; the worker validates the rest."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(min_length=1)
    stream: bool = False


class ModelQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)


class SleepQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    level: int = Field(default=1, ge=1, le=2)


def build_actuator(settings: RequesterSettings, registry: ModelRegistry, metrics: RequesterMetrics,
                   emit: SinkEmitter) -> Actuator:
    if settings.actuator == "knative":
        from .knative import KnativeActuator, KnativeSettings

        return KnativeActuator(registry, metrics, KnativeSettings.from_env(), emit=emit,
                               backoff_base_s=settings.restart_backoff_s, backoff_max_s=settings.restart_backoff_max_s)
    from .local import LocalActuator

    return LocalActuator(settings, registry, metrics, emit=emit)


def create_app(settings: RequesterSettings | None = None, *, registry: ModelRegistry | None = None,
               actuator: Actuator | None = None, metrics: RequesterMetrics | None = None) -> Flask:
    settings = settings or RequesterSettings.from_env()
    setup_logging(settings.log_level)
    registry = registry or ModelRegistry.load(settings.models_file)
    metrics = metrics or RequesterMetrics()
    emit = SinkEmitter(settings.sink)
    actuator = actuator or build_actuator(settings, registry, metrics, emit)
    proxy = WorkerProxy(metrics, settings.upstream_connect_timeout_s, settings.upstream_read_timeout_s)
    log.info("requester settings: %s; models from %s: %s", describe(settings), registry.origin,
             ", ".join(registry.names()))
    ready = threading.Event()
    ready.set()  # can take requests at once: workers start on demand

    app = Flask("fma_requester")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["fma"] = {"actuator": actuator, "proxy": proxy, "metrics": metrics, "settings": settings,
                             "registry": registry, "ready": ready}
    register_error_handlers(app)
    install_access_log(app, "fma.requester.access")

    def infer(path: str) -> Response:
        raw = request.get_data(cache=True)
        routed = parse_model(RoutedRequest, parse_json(raw))
        lease = actuator.ensure_ready(routed.model)
        if lease.actuation.path == "warm":
            log.info("%s: warm, worker leased in %.2f ms", routed.model, lease.actuation.seconds * 1000)
        else:
            log.info("%s served after a %s start of %.2f s", routed.model, lease.actuation.path,
                     lease.actuation.seconds)
        upstream = proxy.forward(lease, path, raw, routed.stream)
        metrics.requests.labels(routed.model, path, str(upstream.status)).inc()
        headers = dict(upstream.headers)
        headers["X-FMA-Actuation"] = f"{lease.actuation.path};dur={lease.actuation.seconds:.4f}"
        if upstream.stream is not None:
            resp = Response(upstream.stream, status=upstream.status, headers={**headers, **SSE_HEADERS})
            close = getattr(upstream.stream, "close", None)
            if close:
                resp.call_on_close(close)  # client gone: close upstream so the worker stops
            return resp
        return Response(upstream.body, status=upstream.status, headers=headers)

    @app.get("/health")
    def health() -> Response:
        return json_response({"status": "ok"})

    @app.get("/ready")
    def is_ready() -> Response:
        if ready.is_set():
            return Response("OK\n", mimetype="text/plain")
        return Response("Service Unavailable\n", 503, mimetype="text/plain")

    @app.post("/v1/become-ready")
    def become_ready() -> Response:
        ready.set()
        return Response("OK\n", mimetype="text/plain")

    @app.post("/v1/become-unready")
    def become_unready() -> Response:
        ready.clear()
        return Response("OK\n", mimetype="text/plain")

    @app.get("/v1/dual-pods/accelerators")
    def accelerators() -> Response:
        uuids = [row[0] for row in nvidia_smi(["uuid"])]
        if not uuids:
            return Response("no GPUs found\n", 500, mimetype="text/plain")
        return json_response(uuids)

    @app.get("/v1/dual-pods/accelerator-memory-usage")
    def accelerator_memory() -> Response:
        rows = nvidia_smi(["uuid", "memory.used"], nounits=True)
        if not rows:
            return Response("no GPUs found\n", 500, mimetype="text/plain")
        return json_response({row[0]: int(float(row[1])) for row in rows})

    @app.get("/metrics")
    def metrics_text() -> Response:
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models() -> Response:
        data = [{"id": s.model, "object": "model", "created": 0, "owned_by": "fma", "state": s.state,
                 "backend": s.backend} for s in actuator.list()]
        return json_response({"object": "list", "data": data})

    @app.post("/v1/completions")
    def completions() -> Response:
        return infer("/v1/completions")

    @app.post("/v1/chat/completions")
    def chat() -> Response:
        return infer("/v1/chat/completions")

    @app.get("/v1/workers")
    def workers() -> Response:
        return json_response({"object": "list", "data": [s.as_dict() for s in actuator.list()]})

    @app.post("/v1/workers/<path:model>/warm")
    def warm(model: str) -> Response:
        actuator.ensure_ready(model).done()
        return json_response(actuator.describe(model).as_dict())

    @app.post("/v1/workers/<path:model>/sleep")
    def sleep(model: str) -> Response:
        query = parse_model(SleepQuery, query_args(request.args))
        return json_response(actuator.sleep(model, query.level).as_dict())

    @app.delete("/v1/workers/<path:model>")
    def release(model: str) -> Response:
        return json_response(actuator.release(model).as_dict())

    @app.get("/v1/workers/<path:model>")
    def describe_worker(model: str) -> Response:
        return json_response(actuator.describe(model).as_dict())

    @app.post("/")
    def cloudevent() -> Response:
        incoming = events.parse_event(dict(request.headers), request.get_data())
        return _handle_event(incoming, actuator, proxy)

    actuator.start()
    _LIVE.append(app)
    return app


def _handle_event(incoming: events.IncomingEvent, actuator: Actuator, proxy: WorkerProxy) -> Response:
    kind = incoming.type
    if kind not in (events.COMPLETION_REQUESTED, events.WORKER_WARM_REQUESTED, events.WORKER_RELEASE_REQUESTED):
        raise InvalidRequest(f"unsupported event type {kind!r}")
    failed_type = events.COMPLETION_FAILED if kind == events.COMPLETION_REQUESTED else events.WORKER_FAILED
    try:
        data = incoming.data_object()
        model = data.get("model") or incoming.subject
        if not isinstance(model, str) or not model:
            raise InvalidRequest("the event names no model: set data.model or the subject attribute")
        if kind == events.COMPLETION_REQUESTED:
            data = {**data, "model": model, "stream": False}
            lease = actuator.ensure_ready(model)
            upstream = proxy.forward(lease, "/v1/completions", json.dumps(data).encode(), stream=False)
            payload = json.loads(upstream.body or b"{}")
            if upstream.status != 200:
                if upstream.status in (429, 503):
                    return Response(upstream.body, upstream.status, headers=upstream.headers)
                body, headers = events.reply_to(incoming, events.COMPLETION_FAILED, SOURCE, payload, subject=model)
            else:
                body, headers = events.reply_to(incoming, events.COMPLETION_SUCCEEDED, SOURCE, payload,
                                                subject=model)
        elif kind == events.WORKER_WARM_REQUESTED:
            actuator.ensure_ready(model).done()
            body, headers = events.reply_to(incoming, events.WORKER_READY, SOURCE,
                                            actuator.describe(model).as_dict(), subject=model)
        else:
            body, headers = events.reply_to(incoming, events.WORKER_RELEASED, SOURCE,
                                            actuator.release(model).as_dict(), subject=model)
    except ApiError as err:
        if err.status in (429, 503, 502, 504):
            raise  # transient: no reply event, the broker retries
        body, headers = events.reply_to(incoming, failed_type, SOURCE, err.envelope())
    return Response(body, 200, headers=headers)


def shutdown_all(timeout: float) -> None:
    """Stop the workers of every app in this process (gunicorn worker_exit)."""
    while _LIVE:
        app = _LIVE.pop()
        fma = app.extensions["fma"]
        fma["actuator"].shutdown(timeout)
        fma["proxy"].close()
