"""The requester's HTTP edge: a Flask application factory.

gunicorn serves ``fma_requester.app:create_app()`` with the gevent worker
class and one process (see ``gunicorn_conf.py``): one process means one owner
of the actuator's state, so there is exactly one worker per model; gevent lets
that process hold thousands of idle or streaming connections in a few MiB.

The edge is thin: routes parse (``protocol.py``), call the data plane or the
actuator, and render. Completions over HTTP and over CloudEvents go through
the same :class:`~fma_requester.dataplane.DataPlane`. This module imports
neither torch nor transformers.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fma_common import events
from fma_common.auth import KeyRing, Role, read_keys
from fma_common.errors import ApiError, InvalidRequest, ModelNotFound, ShuttingDown
from fma_common.http import (
    SSE_HEADERS,
    install_access_log,
    json_response,
    merged_headers,
    parse_json,
    parse_model,
    query_args,
    register_error_handlers,
)
from fma_common.logs import setup_logging
from fma_common.openapi import on_first_use
from fma_common.settings import SettingsError, describe
from fma_common.sources import default_cache_dir
from fma_common.wire_embeddings import PATH_EMBEDDINGS
from fma_common.wire_responses import PATH_RESPONSES, ResponsesRequest

from . import drain, model_cache, oidc, responses, ui
from . import protocol as p
from .actuator import Actuator
from .dataplane import DataPlane
from .events import EmitterConfig, SinkEmitter, parse_overrides
from .gpus import gpu_uuids, nvidia_smi
from .metrics import RequesterMetrics
from .proxy import WorkerProxy
from .registry import ModelRegistry
from .reload import FileWatcher
from .replies import ReplyCache
from .settings import RequesterSettings

if TYPE_CHECKING:
    from cloudevents.core.v1.event import CloudEvent

log = logging.getLogger("fma.requester")

# Every live app, so gunicorn's worker_exit hook can stop their workers.
_LIVE: list[Flask] = []


def build_actuator(settings: RequesterSettings, registry: ModelRegistry, metrics: RequesterMetrics,
                   emit: SinkEmitter) -> Actuator:
    from .lifecycle import LifecycleConfig

    config = LifecycleConfig.from_settings(settings)
    if settings.actuator == "knative":
        from .knative import KnativeActuator, KnativeSettings

        return KnativeActuator(registry, metrics, KnativeSettings.from_env(), emit=emit, config=config,
                               token=settings.worker_token, hub_cache_dir=settings.hub_cache_dir)
    from .local import LocalActuator

    return LocalActuator(settings, registry, metrics, emit=emit, config=config)


# Routes anyone may call with auth on: probes, the scrape, the status page's files (its data needs a key).
_OPEN = frozenset({p.PATH_HEALTH, p.PATH_READY, p.PATH_METRICS, p.PATH_UI, p.PATH_OPENAPI})


def required_role(method: str, path: str) -> Role | None:
    """What a request needs: None (open), inference, or admin (anything that changes state)."""
    if path in _OPEN or path.startswith(p.PATH_UI + "/") or (method == "GET" and path == p.PATH_CLOUDEVENTS):
        return None
    if path in (p.PATH_BECOME_READY, p.PATH_BECOME_UNREADY):
        return "admin"
    if path.startswith(p.PATH_WORKERS + "/") and method not in ("GET", "HEAD"):
        return "admin"
    if path.startswith(p.PATH_MODELS + "/") and path.endswith("/pull") and method == "POST":
        return "admin"  # it fills the cache from the hub
    return "infer"


def key_ring(settings: RequesterSettings) -> KeyRing:
    try:
        return KeyRing.of(read_keys(settings.api_keys, settings.api_keys_file),
                          read_keys(settings.admin_keys, settings.admin_keys_file))
    except ValueError as exc:
        raise SettingsError(f"FMA_API_KEYS_FILE / FMA_ADMIN_KEYS_FILE: {exc}") from None


def event_senders(settings: RequesterSettings, reviewer: oidc.Reviewer | None = None) -> oidc.EventSenders | None:
    """Knative Eventing's OIDC senders, when ``FMA_EVENTS_OIDC_AUDIENCE`` is set."""
    if not settings.events_oidc_audience:
        return None
    subjects = tuple(s.strip() for s in (settings.events_oidc_subjects or "").split(",") if s.strip())
    try:
        return oidc.EventSenders(settings.events_oidc_audience, subjects,
                                 reviewer or oidc.in_cluster_reviewer(timeout_s=5.0))
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    except Exception as exc:  # kubernetes.config.ConfigException: no in-cluster config and no kubeconfig
        raise SettingsError(f"FMA_EVENTS_OIDC_AUDIENCE: TokenReviews need the Kubernetes API (in-cluster, or a "
                            f"kubeconfig), and none was found: {exc}") from None


def _say_auth(settings: RequesterSettings, keys: KeyRing) -> None:
    if keys.enabled:
        log.info("auth on: %s; /health, /ready, /metrics and /ui stay open", keys)
        return
    exposed = [b for b in settings.binds or () if b.rsplit(":", 1)[0] not in ("127.0.0.1", "localhost", "[::1]")]
    if exposed:
        log.warning("auth is off and the requester listens on %s: anyone who reaches it can run completions and "
                    "put workers to sleep or release them; set FMA_API_KEYS and FMA_ADMIN_KEYS",
                    ", ".join(exposed))
    else:
        log.info("auth is off (no FMA_API_KEYS or FMA_ADMIN_KEYS); listening on loopback only")


def create_app(settings: RequesterSettings | None = None, *, registry: ModelRegistry | None = None,
               actuator: Actuator | None = None, metrics: RequesterMetrics | None = None,
               token_reviewer: oidc.Reviewer | None = None) -> Flask:
    settings = settings or RequesterSettings.from_env()
    setup_logging(settings.log_level)
    cache_dir = settings.hub_cache_dir or settings.cache_dir or default_cache_dir()  # where hub models are
    keys = key_ring(settings)
    senders = event_senders(settings, token_reviewer)
    if settings.worker_token is None and settings.actuator == "local":
        # Local workers answer only this requester: a fresh token each start, passed in their environment.
        settings = settings.model_copy(update={"worker_token": secrets.token_urlsafe(32)})
    registry = registry or ModelRegistry.load(settings.models_file)
    metrics = metrics or RequesterMetrics()
    emit = SinkEmitter(EmitterConfig(settings.sink, parse_overrides(settings.ce_overrides),
                                     max_pending=settings.events_queue, timeout_s=settings.events_timeout_s,
                                     retries=settings.events_retries),
                       sent=metrics.events_sent, dropped=metrics.events_dropped)
    actuator = actuator or build_actuator(settings, registry, metrics, emit)
    proxy = WorkerProxy(metrics, settings.upstream_connect_timeout_s, settings.upstream_read_timeout_s,
                        max_connections=settings.connections, token=settings.worker_token)
    plane = DataPlane(actuator, proxy, metrics, keepalive_s=settings.stream_keepalive_s)
    log.info("requester settings: %s; models from %s: %s", describe(settings), registry.origin,
             ", ".join(registry.names()))
    _say_auth(settings, keys)
    if senders is not None:
        log.info("CloudEvents also accepted from Knative Eventing senders: %s", senders)
    ready = threading.Event()
    ready.set()  # can take requests at once: workers start on demand

    app = Flask("fma_requester")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["fma"] = {"actuator": actuator, "proxy": proxy, "metrics": metrics, "settings": settings,
                             "registry": registry, "ready": ready, "dataplane": plane, "events": emit}
    register_error_handlers(app)
    install_access_log(app, "fma.requester.access")

    def client_address() -> str:
        """Who sent the request, for per-client budgets: the first X-Forwarded-For address (Knative's ingress and
        activator add it), else the peer."""
        forwarded = request.headers.get("X-Forwarded-For", "")
        return forwarded.split(",")[0].strip() or request.remote_addr or ""

    @app.before_request
    def _authorize() -> None:
        need = required_role(request.method, request.path)
        if need is not None:
            header = request.headers.get("Authorization")
            if senders is not None and keys.enabled and request.path == p.PATH_CLOUDEVENTS \
                    and keys.role_of(header) is None and (sender := senders.sender(header, client_address())):
                # A Broker delivery with a valid OIDC token of an allowed Trigger: events only, any type.
                g.fma_event_sender = sender
            else:
                keys.require(header, need)
            if drain.draining():
                # SIGTERM: in-flight requests finish, but a new one (on a kept-alive connection; new connections
                # are refused) would only be cut at the deadline. Say so now, so the client retries elsewhere.
                raise ShuttingDown("the requester is shutting down; retry the request",
                                   headers={"Retry-After": "1", "Connection": "close"})

    @app.after_request
    def _close_when_draining(resp: Response) -> Response:
        if drain.draining():  # a kept-alive connection reused after the listener closes could only be reset
            resp.headers["Connection"] = "close"
        return resp

    def models_now() -> ModelRegistry:
        return getattr(actuator, "registry", None) or registry  # a reload swaps the actuator's

    def route_to(name: str, path: str) -> str:
        """The model a request for ``name`` on ``path`` reaches (aliases resolved); 400 when the model's kind is
        not what the endpoint serves. An unknown name is returned as it is, for the actuator's 404."""
        reg = models_now()
        model = reg.resolve(name)
        spec = reg.get(model)
        if spec is not None and spec.model_kind not in p.ENDPOINT_KINDS[path]:
            right = [e for e, kinds in p.ENDPOINT_KINDS.items() if spec.model_kind in kinds]
            raise InvalidRequest(f"model {model} is a {spec.model_kind} model: it serves {' and '.join(right)}, not "
                                 f"{path}", param="model", code="wrong_model_kind")
        return model

    def infer(path: str) -> Response:
        raw = request.get_data(cache=True)
        payload = parse_json(raw)
        routed = parse_model(p.RoutedRequest, payload)
        model = route_to(routed.model, path)
        if model != routed.model:  # an alias: the worker knows its model by its own name
            payload["model"] = model
            raw = json.dumps(payload).encode()
        done = plane.complete(model, path, raw, routed.stream)
        if done.stream is not None:
            resp = Response(done.stream, status=done.status, headers=merged_headers(done.headers, SSE_HEADERS))
            resp.call_on_close(done.stream.close)  # client gone: close upstream so the worker stops
            return resp
        return Response(done.body, status=done.status, headers=done.headers)

    @app.get(p.PATH_HEALTH)
    def health() -> Response:
        return json_response({"status": "ok"})

    @app.get(p.PATH_READY)
    def is_ready() -> Response:
        if ready.is_set():
            return Response("OK\n", mimetype="text/plain")
        return Response("Service Unavailable\n", 503, mimetype="text/plain")

    @app.post(p.PATH_BECOME_READY)
    def become_ready() -> Response:
        ready.set()
        return Response("OK\n", mimetype="text/plain")

    @app.post(p.PATH_BECOME_UNREADY)
    def become_unready() -> Response:
        ready.clear()
        return Response("OK\n", mimetype="text/plain")

    @app.get(p.PATH_ACCELERATORS)
    def accelerators() -> Response:
        uuids = gpu_uuids()  # a MIG instance by its own MIG- UUID, not its parent GPU's
        if not uuids:
            return Response("no GPUs found\n", 500, mimetype="text/plain")
        return json_response(uuids)

    @app.get(p.PATH_ACCELERATOR_MEMORY)
    def accelerator_memory() -> Response:
        rows = nvidia_smi(["uuid", "memory.used"], nounits=True)
        if not rows:
            return Response("no GPUs found\n", 500, mimetype="text/plain")
        return json_response({row[0]: int(float(row[1])) for row in rows})

    openapi_doc = on_first_use("fma requester", p.__doc__ or "", p.routes)

    @app.get(p.PATH_OPENAPI)
    def openapi() -> Response:
        return json_response(openapi_doc())

    @app.get(p.PATH_METRICS)
    def metrics_text() -> Response:
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    def model_card(status: Any) -> dict[str, Any] | None:
        spec = models_now().get(status.model)
        card: dict[str, Any] = {"id": status.model, "object": "model", "created": 0, "owned_by": "fma",
                                "state": status.state, "backend": status.backend}
        if spec is not None:
            card.update(kind=spec.model_kind, aliases=list(spec.aliases), description=spec.description,
                        unlisted=spec.unlisted, source=spec.source, cache=model_cache.state(spec, cache_dir))
        return card

    @app.get(p.PATH_MODELS)
    def models() -> Response:
        data = [card for card in map(model_card, actuator.list()) if card and not card.get("unlisted")]
        return json_response({"object": "list", "data": data})

    @app.get(f"{p.PATH_MODELS}/<path:model>")
    def one_model(model: str) -> Response:
        name = models_now().resolve(model)
        status = next((s for s in actuator.list() if s.model == name), None)
        if status is None:
            raise ModelNotFound(f"model {model!r} is not configured here", param="model")
        return json_response(model_card(status))

    @app.post(f"{p.PATH_MODELS}/<path:model>/pull")
    def pull_model(model: str) -> Response:
        spec = models_now().get(models_now().resolve(model))
        if spec is None:
            raise ModelNotFound(f"model {model!r} is not configured here", param="model")
        return Response(model_cache.pull(spec, cache_dir), mimetype="application/x-ndjson")

    @app.post(p.PATH_COMPLETIONS)
    def completions() -> Response:
        return infer(p.PATH_COMPLETIONS)

    @app.post(p.PATH_CHAT)
    def chat() -> Response:
        return infer(p.PATH_CHAT)

    @app.post(PATH_EMBEDDINGS)
    def embeddings() -> Response:
        return infer(PATH_EMBEDDINGS)

    @app.post(PATH_RESPONSES)
    def create_response() -> Response:
        req = parse_model(ResponsesRequest, parse_json())
        req = req.model_copy(update={"model": route_to(req.model, PATH_RESPONSES)})
        body = json.dumps(responses.chat_body(req)).encode()
        done = plane.complete(req.model, p.PATH_CHAT, body, req.stream, endpoint=PATH_RESPONSES)
        if done.stream is not None:
            stream = responses.ResponsesStream(req, done.stream)
            resp = Response(stream, status=done.status, headers=merged_headers(done.headers, SSE_HEADERS))
            resp.call_on_close(stream.close)
            return resp
        kept = {k: v for k, v in done.headers.items() if k.lower().startswith("x-fma-")}
        return json_response(responses.from_chat(req, done.json()), headers=kept)

    @app.get(p.PATH_WORKERS)
    def workers() -> Response:
        return json_response({"object": "list", "data": [s.as_dict() for s in actuator.list()]})

    @app.post(f"{p.PATH_WORKERS}/<path:model>/warm")
    def warm(model: str) -> Response:
        query = parse_model(p.WarmQuery, query_args(request.args))
        model = models_now().resolve(model)
        actuator.ensure_ready(model).done()
        if query.level != "awake":  # prewarm to a sleep level: loaded once, parked, woken fast later
            return json_response(actuator.sleep(model, int(query.level[-1])).as_dict())
        return json_response(actuator.describe(model).as_dict())

    @app.post(f"{p.PATH_WORKERS}/<path:model>/sleep")
    def sleep(model: str) -> Response:
        query = parse_model(p.SleepQuery, query_args(request.args))
        return json_response(actuator.sleep(models_now().resolve(model), query.level).as_dict())

    @app.delete(f"{p.PATH_WORKERS}/<path:model>")
    def release(model: str) -> Response:
        return json_response(actuator.release(models_now().resolve(model)).as_dict())

    @app.get(f"{p.PATH_WORKERS}/<path:model>")
    def describe_worker(model: str) -> Response:
        return json_response(actuator.describe(models_now().resolve(model)).as_dict())

    @app.get(p.PATH_UI)
    def status_page() -> Response:
        return ui.page()

    @app.get(f"{p.PATH_UI}/<name>")
    def status_page_asset(name: str) -> Response:
        return ui.asset(name)

    @app.get(p.PATH_CLOUDEVENTS)
    def index() -> Response:
        # A browser at the root gets the status page; a program gets where things are.
        if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
            return ui.page()
        return json_response({"object": "fma.requester", "status_page": p.PATH_UI, "workers": p.PATH_WORKERS,
                              "models": p.PATH_MODELS, "metrics": p.PATH_METRICS, "cloudevents": "POST /"})

    replies = ReplyCache()

    @app.post(p.PATH_CLOUDEVENTS)
    def cloudevent() -> Response:
        incoming = events.parse_event(dict(request.headers), request.get_data())
        if incoming.type in p.CONTROL_TYPES and not g.get("fma_event_sender"):
            keys.require(request.headers.get("Authorization"), "admin")  # it changes state: an admin key's to send
        return handle_event(incoming, actuator, plane, replies, settings.events_deadline_s)

    if settings.models_file and settings.models_reload_s > 0:
        paths = [Path(settings.models_file)]
        if settings.actuator == "knative" and os.environ.get("FMA_WORKER_TEMPLATE"):
            paths.append(Path(os.environ["FMA_WORKER_TEMPLATE"]))

        def reload_models() -> None:
            changes = actuator.reload(ModelRegistry.load(settings.models_file))
            app.extensions["fma"]["registry"] = actuator.registry if hasattr(actuator, "registry") else registry
            log.info("models now: %s (%s)", ", ".join(s.model for s in actuator.list()),
                     "; ".join(changes) or "no model changed")

        app.extensions["fma"]["watcher"] = FileWatcher(paths, settings.models_reload_s, reload_models).start()
    actuator.start()
    _LIVE.append(app)
    return app


def handle_event(incoming: events.IncomingEvent, actuator: Actuator, plane: DataPlane,
                 replies: ReplyCache | None = None, deadline_s: float | None = None) -> Response:
    """A CloudEvent in, a reply in the same mode out (or a transient error: the broker retries). A
    ``completion.requested`` delivered again (same source and id) gets the first delivery's reply, not a second
    completion (replies.py)."""
    kind = incoming.type
    if kind not in p.REQUEST_TYPES:
        raise InvalidRequest(f"unsupported event type {kind!r}; this requester accepts {', '.join(p.REQUEST_TYPES)}")
    if kind == p.COMPLETION_REQUESTED and replies is not None:
        # The same reply event (same id) for a repeat, in the mode the repeat came in.
        key = (str(incoming.event.get_source()), incoming.id)
        reply = replies.answer(key, lambda: _reply(incoming, actuator, plane, deadline_s))
    else:
        reply = _reply(incoming, actuator, plane, deadline_s)
    body, headers = events.encode_event(reply, incoming.structured)
    return Response(body, 200, headers=headers)


def _reply(incoming: events.IncomingEvent, actuator: Actuator, plane: DataPlane,
           deadline_s: float | None) -> CloudEvent:
    kind = incoming.type
    failed_type = p.COMPLETION_FAILED if kind == p.COMPLETION_REQUESTED else p.WORKER_FAILED
    try:
        data = incoming.data_object()
        model = data.get("model") or incoming.subject
        if not isinstance(model, str) or not model:
            raise InvalidRequest("the event names no model: set data.model or the subject attribute")
        registry = getattr(actuator, "registry", None)
        if registry is not None:
            model = registry.resolve(model)  # an alias reaches its model, as over HTTP
            spec = registry.get(model)
            if kind == p.COMPLETION_REQUESTED and spec is not None and spec.model_kind == "embedding":
                raise InvalidRequest(f"model {model} is an embedding model; completion events need a chat or "
                                     "completion model", param="model", code="wrong_model_kind")
        if kind == p.COMPLETION_REQUESTED:
            outcome = plane.complete_event(model, data, deadline_s)
            reply_type, payload = (p.COMPLETION_SUCCEEDED, outcome.data) if outcome.ok else \
                (p.COMPLETION_FAILED, outcome.data)
        elif kind in (p.WORKER_WARM_REQUESTED, p.PING_TYPE):
            actuator.ensure_ready(model).done()
            reply_type, payload = p.WORKER_READY_EVENT, actuator.describe(model).as_dict()
        else:
            reply_type, payload = p.WORKER_RELEASED, actuator.release(model).as_dict()
        return events.reply_event(incoming, reply_type, p.EVENT_SOURCE, payload, subject=model)
    except ApiError as err:
        if p.is_transient(err.status):
            raise  # no reply event: the broker retries
        return events.reply_event(incoming, failed_type, p.EVENT_SOURCE, err.envelope())


def shutdown_all(timeout: float) -> None:
    """Stop the workers of every app in this process (gunicorn worker_exit)."""
    while _LIVE:
        app = _LIVE.pop()
        fma = app.extensions["fma"]
        if fma.get("watcher"):
            fma["watcher"].stop()
        fma["actuator"].shutdown(timeout)
        fma["proxy"].close()
        fma["events"].close(fma["settings"].events_timeout_s)  # the last released events, within a bound
