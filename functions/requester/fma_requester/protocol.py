"""Wire types of the requester: what it reads from clients, what it answers, and its names.

Everything a client or a peer can see is defined here once: request models
(validated before any logic), the worker status of design.md, the HTTP paths,
the CloudEvent types (from ``fma_common.events``, shared with the worker),
and which upstream statuses are transient (a broker or client should retry)
or permanent.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fma_common import events

# ---- paths ---------------------------------------------------------------------

PATH_HEALTH = "/health"
PATH_READY = "/ready"
PATH_METRICS = "/metrics"
PATH_COMPLETIONS = "/v1/completions"
PATH_CHAT = "/v1/chat/completions"
PATH_MODELS = "/v1/models"
PATH_WORKERS = "/v1/workers"
PATH_CLOUDEVENTS = "/"
PATH_UI = "/ui"
PATH_BECOME_READY = "/v1/become-ready"
PATH_BECOME_UNREADY = "/v1/become-unready"
PATH_ACCELERATORS = "/v1/dual-pods/accelerators"
PATH_ACCELERATOR_MEMORY = "/v1/dual-pods/accelerator-memory-usage"

# Worker paths the requester calls (the vLLM sleep API and readiness).
WORKER_READY = "/ready"
WORKER_SLEEP = "/sleep"
WORKER_WAKE = "/wake_up"
WORKER_IS_SLEEPING = "/is_sleeping"

# ---- CloudEvent types ---------------------------------------------------------

COMPLETION_REQUESTED = events.COMPLETION_REQUESTED
COMPLETION_SUCCEEDED = events.COMPLETION_SUCCEEDED
COMPLETION_FAILED = events.COMPLETION_FAILED
WORKER_WARM_REQUESTED = events.WORKER_WARM_REQUESTED
WORKER_RELEASE_REQUESTED = events.WORKER_RELEASE_REQUESTED
WORKER_READY_EVENT = events.WORKER_READY
WORKER_RELEASED = events.WORKER_RELEASED
WORKER_STARTED = events.WORKER_STARTED
WORKER_FAILED = events.WORKER_FAILED
WORKER_SLEEPING = events.WORKER_SLEEPING
# A PingSource cannot choose its events' type (knative/eventing pkg/adapter/mtping/runner.go, makeEvent, sets
# it to this), so a scheduled pre-warm arrives as a ping whose data names the model, and is read as a warm.
PING_TYPE = "dev.knative.sources.ping"
REQUEST_TYPES = (COMPLETION_REQUESTED, WORKER_WARM_REQUESTED, WORKER_RELEASE_REQUESTED, PING_TYPE)
# Events that change a worker's state: with API keys on, only an admin key may send them.
CONTROL_TYPES = (WORKER_WARM_REQUESTED, WORKER_RELEASE_REQUESTED, PING_TYPE)
# What the requester sends: replies (back into the Broker, so no request Trigger may match them) and lifecycle
# events (to K_SINK).
REPLY_TYPES = (COMPLETION_SUCCEEDED, COMPLETION_FAILED, WORKER_READY_EVENT, WORKER_RELEASED, WORKER_FAILED)
LIFECYCLE_TYPES = (WORKER_STARTED, WORKER_READY_EVENT, WORKER_SLEEPING, WORKER_RELEASED, WORKER_FAILED)
EVENT_SOURCE = "/fma/requester"

# ---- error classes ------------------------------------------------------------

# Worth retrying as they are: a full queue, a worker that is starting, a
# worker unreachable or too slow. Anything else (4xx, a worker's 500) will
# fail again the same way.
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})


def is_transient(status: int) -> bool:
    return status in TRANSIENT_STATUSES


# ---- requests --------------------------------------------------------------------


# The model kinds each inference endpoint serves (a request for another kind is a 400 naming the right endpoint).
ENDPOINT_KINDS: dict[str, tuple[str, ...]] = {
    "/v1/completions": ("chat", "completion"),
    "/v1/chat/completions": ("chat",),
    "/v1/responses": ("chat",),
    "/v1/embeddings": ("embedding",),
}


class RoutedRequest(BaseModel):
    """The two fields the requester reads of a completion; the worker validates the rest."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(min_length=1)
    stream: bool = False


class WarmQuery(BaseModel):
    """``POST /v1/workers/{model}/warm?level=``: up and awake, or up and then asleep (a later wake is fast)."""

    model_config = ConfigDict(extra="ignore")
    level: Literal["awake", "sleep1", "sleep2"] = "awake"


class SleepQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    level: int = Field(default=1, ge=1, le=2)


# ---- worker status ------------------------------------------------------------------

State = Literal["cold", "starting", "ready", "sleeping", "failed"]
ActuationPath = Literal["cold", "wake", "warm"]


class Actuation(BaseModel):
    """How a request got its worker: started cold, woken, or found warm; and how long that took."""

    model_config = ConfigDict(frozen=True)
    path: ActuationPath
    seconds: float
    steps: dict[str, float] | None = None  # a cold start's timeline (local workers: spawn, boot, load phases...)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "seconds": round(self.seconds, 4)}
        if self.steps:
            out["steps"] = self.steps
        return out

    def header(self) -> str:
        """The ``X-FMA-Actuation`` response header."""
        return f"{self.path};dur={self.seconds:.4f}"


class WorkerStatus(BaseModel):
    """The worker status of design.md, one per configured model.

    ``state`` keeps design.md's five values; ``phase`` is the state
    machine's fine-grained one (``going_to_sleep``, ``waking``, ``stopping``...).
    """

    model_config = ConfigDict(frozen=True)
    model: str
    state: State
    phase: str
    backend: str
    url: str | None
    last_used: float | None
    in_flight: int
    queued: int
    last_actuation: Actuation | None
    last_start: Actuation | None = None  # the last cold start and where its seconds went (``steps``)
    error: str | None = None
    detail: str | None = None  # what a start in progress is waiting for (e.g. "waiting for a node: ...")
    idle_left_s: float | None = None  # seconds before an idle worker scales to zero; None while busy or cold

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model, "state": self.state, "phase": self.phase, "backend": self.backend,
            "url": self.url, "last_used": self.last_used, "in_flight": self.in_flight, "queued": self.queued,
            "last_actuation": self.last_actuation.as_dict() if self.last_actuation else None,
            "last_start": self.last_start.as_dict() if self.last_start else None,
            "idle_left_s": None if self.idle_left_s is None else round(self.idle_left_s, 1),
        }
        if self.state == "failed":
            out["error"] = self.error or "unknown error"
        if self.detail:
            out["detail"] = self.detail
        return out


# ---- the routes, for the OpenAPI document (GET /openapi.json; a test keeps them equal to the app's) ----------

PATH_OPENAPI = "/openapi.json"


def routes() -> list[Any]:
    from fma_common import wire
    from fma_common.openapi import Route
    from fma_common.wire_embeddings import PATH_EMBEDDINGS, EmbeddingRequest, EmbeddingResponse
    from fma_common.wire_responses import PATH_RESPONSES, ResponsesRequest

    infer = (400, 404, 413, 429, 502, 503, 504)
    workers = f"{PATH_WORKERS}/<path:model>"
    return [
        Route("GET", PATH_HEALTH, "liveness", errors=()),
        Route("GET", PATH_READY, "readiness (become-ready / become-unready switch it)", answer="text", errors=(503,)),
        Route("POST", PATH_BECOME_READY, "mark the requester ready", answer="text", auth="admin", errors=()),
        Route("POST", PATH_BECOME_UNREADY, "mark the requester unready (new traffic goes elsewhere)", answer="text",
              auth="admin", errors=()),
        Route("GET", PATH_ACCELERATORS, "the GPUs this requester holds (UUIDs)", auth="infer", errors=(500,)),
        Route("GET", PATH_ACCELERATOR_MEMORY, "memory used per GPU (MiB)", auth="infer", errors=(500,)),
        Route("GET", PATH_METRICS, "Prometheus metrics", answer="text", errors=()),
        Route("GET", PATH_OPENAPI, "this document", errors=()),
        Route("GET", PATH_MODELS, "the listed models (unlisted ones are left out): kind, aliases, description and "
              "their workers' state", auth="infer", errors=()),
        Route("POST", f"{PATH_MODELS}/<path:model>/pull", "fetch a hub model into the model cache now (its "
              "revision as the hub has it), before any request needs it: one JSON line per progress message, then "
              "`done` or `error`", answer="text", auth="admin", errors=(400, 404)),
        Route("GET", f"{PATH_MODELS}/<path:model>", "one model, by its name or an alias", auth="infer",
              errors=(404,)),
        Route("POST", PATH_COMPLETIONS, "OpenAI completions: starts or wakes the model's worker as needed",
              body=wire.CompletionRequest, answer=wire.CompletionResponse, streams=True, auth="infer",
              errors=infer),
        Route("POST", PATH_CHAT, "OpenAI chat completions", body=wire.ChatCompletionRequest,
              answer=wire.ChatCompletionResponse, streams=True, auth="infer", errors=infer),
        Route("POST", PATH_EMBEDDINGS, "OpenAI embeddings, from a model of kind embedding",
              body=EmbeddingRequest, answer=EmbeddingResponse, auth="infer", errors=infer),
        Route("POST", PATH_RESPONSES, "OpenAI Responses (stateless), served on the chat path",
              body=ResponsesRequest, streams=True, auth="infer", errors=infer),
        Route("GET", PATH_WORKERS, "every model's worker status", auth="infer", errors=()),
        Route("GET", workers, "one model's worker status", auth="infer", errors=(404,)),
        Route("POST", f"{workers}/warm", "start the worker (and park it asleep with level=sleep1|sleep2)",
              query=WarmQuery, auth="admin", errors=(400, 404, 409, 429, 503)),
        Route("POST", f"{workers}/sleep", "put the worker to sleep", query=SleepQuery, auth="admin",
              errors=(400, 404, 409, 502, 503)),
        Route("DELETE", workers, "release the worker (scale to zero)", auth="admin", errors=(404,)),
        Route("GET", PATH_UI, "the status page", answer="text", errors=()),
        Route("GET", f"{PATH_UI}/<name>", "the status page's files", answer="text", errors=(404,)),
        Route("GET", PATH_CLOUDEVENTS, "where things are (a browser gets the status page)", errors=()),
        Route("POST", PATH_CLOUDEVENTS, "CloudEvents: completions and worker control; the reply is an event",
              body="cloudevent", answer="cloudevent", auth="infer", errors=(400, 404, 415, 429, 503)),
    ]
