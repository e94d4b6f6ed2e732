"""The worker's HTTP edge: a Flask application factory.

gunicorn serves ``fma_worker.app:create_app()`` with the ``gthread`` worker
class and one process (see ``gunicorn_conf.py``). Routes only parse, call the
:class:`CompletionService` or the :class:`Engine`, and render; all errors are
rendered by ``register_error_handlers``.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from fma_common import events
from fma_common import wire as p
from fma_common.auth import KeyRing
from fma_common.errors import ApiError, InvalidRequest
from fma_common.http import (
    SSE_HEADERS,
    install_access_log,
    json_response,
    parse_body,
    parse_model,
    query_args,
    register_error_handlers,
)
from fma_common.logs import setup_logging
from fma_common.openapi import on_first_use
from fma_common.settings import describe
from fma_common.wire_embeddings import PATH_EMBEDDINGS, EmbeddingRequest

from . import timeline
from .admission import Admission
from .embed_service import EmbeddingService
from .engine import Engine
from .metrics import WorkerMetrics, resident_bytes
from .serving import CompletionService, SSEStream
from .settings import WorkerSettings

log = logging.getLogger("fma.worker")


def create_app(settings: WorkerSettings | None = None, *, engine: Engine | None = None,
               metrics: WorkerMetrics | None = None, start_loading: bool = True) -> Flask:
    """Build the worker app. With ``start_loading`` the model starts loading
    on a background thread now; ``/ready`` turns 200 when it is done."""
    timeline.mark("app")
    settings = settings or WorkerSettings.from_env()
    setup_logging(settings.log_level)
    log.info("worker settings: %s", describe(settings))
    metrics = metrics or WorkerMetrics(settings.model)
    engine = engine or Engine(settings, metrics)
    if start_loading:
        # Before the Flask app and its routes (20-40 ms in a forked child): those build while the weights map.
        engine.start()
    admission = Admission(settings.max_batch, settings.max_queue, settings.queue_timeout_s,
                          tokens=settings.max_batch_tokens)
    service = CompletionService(settings, engine, admission, metrics)
    embedder = EmbeddingService(settings, engine, admission, metrics)

    app = Flask("fma_worker")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["fma"] = {"engine": engine, "service": service, "metrics": metrics, "settings": settings}
    register_error_handlers(app)
    install_access_log(app, "fma.worker.access")
    token = KeyRing.of(admin=[settings.worker_token]) if settings.worker_token else KeyRing()
    open_paths = {p.PATH_HEALTH, p.PATH_READY, p.PATH_LOADED, p.PATH_METRICS, p.PATH_OPENAPI}

    @app.before_request
    def _only_the_requester() -> None:
        # Workers answer only whoever holds the token (the requester that started them); probes stay open.
        if request.path not in open_paths:
            token.require(request.headers.get("Authorization"), "admin")

    def render(result: BaseModel | SSEStream) -> Response:
        if isinstance(result, SSEStream):
            resp = Response(result, mimetype="text/event-stream", headers=SSE_HEADERS)
            resp.call_on_close(result.close)
            return resp
        return json_response(result.model_dump(mode="json"))

    @app.after_request
    def _count(resp: Response) -> Response:
        if request.path in (p.PATH_COMPLETIONS, p.PATH_CHAT, PATH_EMBEDDINGS, p.PATH_CLOUDEVENTS):
            metrics.requests.labels(settings.model, request.path, str(resp.status_code)).inc()
        return resp

    @app.get(p.PATH_HEALTH)
    def health() -> Response:
        return json_response({"status": "ok", "state": engine.state})

    @app.get(p.PATH_READY)
    def ready() -> Response:
        query = parse_model(p.ReadyQuery, query_args(request.args))
        if query.wait:
            engine.wait_until_settled(query.wait)
        if engine.is_ready:
            if query.wait is None:
                return Response("OK\n", mimetype="text/plain")
            load = engine.last_load
            return json_response({"status": "ready", "start": timeline.report(load.phases if load else None)})
        body: dict[str, Any] = {"status": engine.state}
        if engine.error:
            body["error"] = engine.error
        return json_response(body, 503)

    @app.get(p.PATH_LOADED)
    def loaded() -> Response:
        # Awake or asleep, this process holds its model and answers the sleep API: ready, for Knative.
        if engine.state in ("ready", "sleeping"):
            return Response("OK\n", mimetype="text/plain")
        body: dict[str, Any] = {"status": engine.state}
        if engine.error:
            body["error"] = engine.error
        return json_response(body, 503)

    # Built on first use: the routes' pydantic schemas took 30 ms of every cold start here, on the main thread,
    # holding the GIL while the weights load on theirs.
    openapi_doc = on_first_use("fma worker", p.__doc__ or "", p.routes)

    @app.get(p.PATH_OPENAPI)
    def openapi() -> Response:
        return json_response(openapi_doc())

    @app.get(p.PATH_METRICS)
    def metrics_text() -> Response:
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get(p.PATH_MODELS)
    def models() -> Response:
        return json_response(service.models().model_dump(mode="json"))

    def generative(endpoint: str) -> None:
        """An embedding model generates no text: say which endpoint it serves instead of a confusing failure."""
        if engine.kind == "embedding":
            raise InvalidRequest(f"model {settings.model} is an embedding model; it serves /v1/embeddings, not "
                                 f"{endpoint}", param="model", code="wrong_model_kind")

    @app.post(p.PATH_COMPLETIONS)
    def completions() -> Response:
        req = parse_body(p.CompletionRequest)
        generative(p.PATH_COMPLETIONS)
        return render(service.complete(req))

    @app.post(p.PATH_CHAT)
    def chat() -> Response:
        req = parse_body(p.ChatCompletionRequest)
        generative(p.PATH_CHAT)
        return render(service.chat(req))

    @app.post(PATH_EMBEDDINGS)
    def embeddings() -> Response:
        req = parse_body(EmbeddingRequest)
        if engine.kind != "embedding":
            raise InvalidRequest(f"model {settings.model} is a {engine.kind} model, not an embedding model; it "
                                 "serves /v1/completions and /v1/chat/completions", param="model",
                                 code="wrong_model_kind")
        return render(embedder.embed(req))

    @app.post(p.PATH_SLEEP)
    def sleep() -> Response:
        query = parse_model(p.SleepQuery, query_args(request.args))
        seconds = engine.sleep(query.level)
        # What the sleep gave back, measured: this process's resident memory and torch's device memory.
        return json_response({"is_sleeping": True, "level": query.level, "seconds": round(seconds, 4),
                              "device_memory_allocated": engine.device_memory_allocated(),
                              "resident_bytes": resident_bytes()})

    @app.post(p.PATH_WAKE)
    def wake_up() -> Response:
        seconds = engine.wake()
        return json_response({"is_sleeping": False, "seconds": round(seconds, 4),
                              "device_memory_allocated": engine.device_memory_allocated(),
                              "resident_bytes": resident_bytes()})

    @app.get(p.PATH_IS_SLEEPING)
    def is_sleeping() -> Response:
        return json_response({"is_sleeping": engine.is_sleeping})

    @app.post(p.PATH_CLOUDEVENTS)
    def cloudevent() -> Response:
        incoming = events.parse_event(dict(request.headers), request.get_data())
        if incoming.type != events.COMPLETION_REQUESTED:
            raise InvalidRequest(f"unsupported event type {incoming.type!r}; the worker accepts "
                                 f"{events.COMPLETION_REQUESTED}")
        source = f"/fma/worker/{settings.model}"
        try:
            data = incoming.data_object()
            data.setdefault("model", incoming.subject or settings.model)
            data["stream"] = False  # a reply event carries one whole response
            result = service.complete(parse_model(p.CompletionRequest, data))
            if isinstance(result, SSEStream):  # cannot happen: stream forced off above
                raise InvalidRequest("streaming is not available over CloudEvents")
            body, headers = events.reply_to(incoming, events.COMPLETION_SUCCEEDED, source,
                                            result.model_dump(mode="json"))
        except ApiError as err:
            if err.status in (429, 503):
                raise  # transient: no event, the broker retries
            body, headers = events.reply_to(incoming, events.COMPLETION_FAILED, source, err.envelope())
        return Response(body, 200, headers=headers)

    return app
