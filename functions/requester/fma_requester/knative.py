"""Knative effects: one scale-to-zero Knative Service per model, through the Kubernetes API.

:class:`KnativeEffects` is the state machine's
:class:`~fma_requester.effects.Effects` on a cluster (every API call through
``kube.KubeClient``, each bounded by a timeout, watches included):

* start = create the worker Service, or adopt ours and bring it up to date
  (a merge patch with ``null`` for keys the template no longer has, and no
  write at all when nothing differs - every template change is a new
  Revision, and a new Revision starts a pod); then follow it with a watch
  until ``Ready=True`` at ``observedGeneration >= generation``; then re-pin
  the ready Revision's autoscaling annotations to the model's (a release
  set them to zero). A pod that cannot be scheduled yet keeps the start
  waiting, with the reason in the worker's status, until ``start_timeout``;
  any other ``Ready=False`` fails it at once with Knative's message. A Service
  not labelled ``app.kubernetes.io/managed-by=fma-requester`` (or serving
  another model) is never touched;
* stop (release) = the ready Revision's own annotations set to
  ``min-scale: "0"`` and a ``0s`` retention (its PodAutoscaler follows them:
  ``pkg/reconciler/revision/reconcile_resources.go``), and the Service marked
  released - never ``spec.template``; or delete the Service, by
  ``FMA_RELEASE_POLICY``;
* sleep = pin the ready Revision at ``min-scale: "1"`` (its PodAutoscaler
  keeps the pod although it gets no traffic), then the vLLM sleep API on the
  pod itself (pod IP, found by the ``serving.knative.dev/revision`` label):
  the route and the activator forward only to ready pods, and a sleeping
  worker is not ready. A Revision that may run more pods than one is refused
  (409). wake = the pod's ``/wake_up``, then the model's own scaling back;
* probe = the Service is still there and ready, and its running pod answers
  ``/health`` directly; read_log = the last condition seen.

A background watch on the managed label selector tells the state machine
what happens behind its back: a Service deleted (the model is cold), a
revision failing (the worker exited), a ready Service found at start-up
(adopted, unless it was released). Errors that asking again cannot fix (RBAC,
a name taken, the webhook refusing the worker) are permanent
(:class:`~fma_requester.kube.KnativeConfigError`, HTTP 500 with their own
code); the rest are 503.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import model_validator

from fma_common.errors import ApiError
from fma_common.settings import Duration, EnvSettings, Lower, SettingsError, setting
from fma_common.sources import default_cache_dir

from . import model_cache
from .control import WorkerControl
from .effects import EffectRefused, Effects, WorkerHandle
from .gpus import gpu_uuids
from .knative_spec import (
    ANNOTATION_MODEL,
    ANNOTATION_RELEASED,
    ANNOTATION_RESTARTED,
    CONTAINER_NAME,
    LABEL_MANAGED_BY,
    LABEL_REVISION,
    LABEL_SERVICE,
    MANAGED_BY,
    MANAGED_SELECTOR,
    MIN_SCALE,
    RETENTION_MAX_S,
    WorkerTemplate,
    adoption_patch,
    parse_go_duration,
    pin_patch,
    release_patch,
    render_worker_service,
    restart_patch,
    worker_service_name,
)
from .kube import AlreadyExists, KnativeConfigError, KnativeError, KubeClient, WatchStream, load_api
from .lifecycle import EventSink, Lifecycle, LifecycleConfig
from .metrics import RequesterMetrics
from .registry import ModelRegistry, ModelSpec

log = logging.getLogger("fma.requester.knative")

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
ReleasePolicy = Annotated[Literal["scale-to-zero", "delete"], Lower]

__all__ = ["KnativeActuator", "KnativeConfigError", "KnativeEffects", "KnativeError", "KnativeSettings", "condition",
           "readiness"]


class KnativeSettings(EnvSettings):
    namespace: str | None = setting("FMA_NAMESPACE", None, "namespace of the requester and its worker Services",
                                    shown="the pod's namespace, else `default`")
    worker_image: str | None = setting(
        "FMA_WORKER_IMAGE", None, "worker container image (wins over the worker template's `image`); unset: the "
        "requester's own image's registry, path and tag, named `fma-worker`",
        shown="`<requester's registry>/fma-worker:<its tag>`")
    worker_template_file: Path | None = setting(
        "FMA_WORKER_TEMPLATE", None, "YAML file with worker template defaults (image, cpu, memory, timeouts, env)",
        shown="unset")
    owner_service: str = setting("FMA_OWNER_SERVICE", "fma-requester", "Knative Service that owns the workers "
                                 "(garbage collection); empty: none", keep_empty=True)
    release_policy: ReleasePolicy = setting(
        "FMA_RELEASE_POLICY", "scale-to-zero", "`scale-to-zero` (keep the Service, no pods) or `delete` on release")
    retries: int = setting("FMA_KUBE_RETRIES", "4", "attempts for an API call that fails with 5xx, 429 or a "
                           "transport error", ge=1, le=20)
    kube_timeout_s: Duration = setting("FMA_KUBE_TIMEOUT", "30s", "longest wait for one Kubernetes API call")
    node_name: str | None = setting("NODE_NAME", None, "the requester's node, for `gpu_binding: shared` (downward "
                                    "API)", shown="unset")
    max_timeout_s: int = setting("FMA_KNATIVE_MAX_TIMEOUT", "600", "the cluster's `max-revision-timeout-seconds` "
                                 "(config-defaults); worker `timeout_seconds` must not exceed it", ge=1)
    release_timeout_s: Duration = setting(
        "FMA_KNATIVE_RELEASE_TIMEOUT", "180s", "longest wait for a released worker's pods to be gone (Knative "
        "removes an idle pod once the stable window, 60 s by default, has passed without requests, then drains it "
        "for 30 s); its memory counts against the budget until they are")
    serving_version: str = setting(
        "FMA_KNATIVE_SERVING_VERSION", "auto", "the cluster's Knative Serving release; `auto` reads it from the "
        "`app.kubernetes.io/version` label of the `services.serving.knative.dev` CRD. Below 1.21 sleep is refused "
        "(409) and a release deletes the worker Service")
    template: WorkerTemplate | None = None  # derived: the file, then FMA_WORKER_IMAGE, then the defaults
    image_explicit: bool = False  # derived: the worker image was set (else it follows the requester's own)

    @model_validator(mode="after")
    def _derive(self) -> KnativeSettings:
        namespace = self.namespace or (SA_NAMESPACE_FILE.read_text().strip() if SA_NAMESPACE_FILE.is_file()
                                       else "default")
        fields_: dict[str, Any] = {}
        if self.worker_template_file:
            try:
                data = yaml.safe_load(self.worker_template_file.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ValueError(f"FMA_WORKER_TEMPLATE: cannot read {self.worker_template_file}: {exc}") from None
            allowed = set(WorkerTemplate.__dataclass_fields__) - {"namespace"}
            unknown = set(data) - allowed
            if unknown:
                raise ValueError(f"FMA_WORKER_TEMPLATE: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
            fields_.update(data)
        if self.worker_image:
            fields_["image"] = self.worker_image
        template = WorkerTemplate(namespace=namespace, **fields_)
        check_template(template, self.max_timeout_s)
        return self.model_copy(update={"namespace": namespace, "template": template,
                                       "image_explicit": "image" in fields_})


def worker_image_for(requester_image: str) -> str:
    """The worker image beside a requester image: same registry, path and tag, named ``fma-worker``.

    ``registry.example.com/me/fma-requester:0.1.0`` -> ``registry.example.com/me/fma-worker:0.1.0``. A
    digest (``@sha256:...``) belongs to the requester's image only, so the worker gets ``:latest``.
    """
    name, _, digest = requester_image.partition("@")
    path, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    head = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
    return f"{head}fma-worker:{tag if tag and not digest else 'latest'}"


def check_template(tmpl: WorkerTemplate, max_timeout_s: int) -> None:
    """The worker template within what Knative's webhook accepts (``revision_validation.go``)."""
    where = "FMA_WORKER_TEMPLATE"
    if not 0 < tmpl.timeout_seconds <= max_timeout_s:
        raise ValueError(f"{where}: timeout_seconds {tmpl.timeout_seconds} must be within 1..{max_timeout_s}, the "
                         f"cluster's max-revision-timeout-seconds (FMA_KNATIVE_MAX_TIMEOUT)")
    if not 0 < tmpl.response_start_timeout_seconds <= tmpl.timeout_seconds:
        raise ValueError(f"{where}: response_start_timeout_seconds {tmpl.response_start_timeout_seconds} must be "
                         f"within 1..timeout_seconds ({tmpl.timeout_seconds})")
    for key in ("progress_deadline", "scale_to_zero_retention"):
        value = getattr(tmpl, key)
        seconds = parse_go_duration(value)
        if key == "progress_deadline" and (seconds <= 0 or round(seconds) != seconds):
            raise ValueError(f"{where}: progress_deadline {value!r} must be a positive whole number of seconds")
        if key == "scale_to_zero_retention" and not 0 <= seconds <= RETENTION_MAX_S:
            raise ValueError(f"{where}: scale_to_zero_retention {value!r} must be within 0s..1h")


def check_models(registry: ModelRegistry, kn: KnativeSettings) -> None:
    """Each model's waiting fits inside the worker's timeout, so clients get our 503 + Retry-After
    before Knative's 504: a request to a worker is cut at its ``timeoutSeconds``, even mid-stream."""
    assert kn.template is not None
    limit = kn.template.timeout_seconds
    for spec in registry:
        wait = spec.queue_timeout if spec.queue_timeout is not None else 120.0
        if wait >= limit:
            raise SettingsError(f"{registry.origin}: models.{spec.name}.queue_timeout: {wait:.0f}s must be below "
                                f"the worker's timeoutSeconds ({limit}s), or Knative answers 504 before we answer "
                                f"503 with Retry-After")


def condition(obj: Mapping[str, Any], kind: str = "Ready") -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def readiness(obj: Mapping[str, Any]) -> tuple[str, str]:
    """("ready" | "failed" | "pending", a line describing the last condition seen)."""
    generation = obj.get("metadata", {}).get("generation", 0)
    observed = (obj.get("status") or {}).get("observedGeneration", 0)
    ready = condition(obj)
    if ready is None or observed < generation:
        return "pending", f"generation {generation} not yet observed (observedGeneration {observed})"
    text = f"Ready={ready.get('status')}"
    if ready.get("reason"):
        text += f" reason={ready['reason']}"
    if ready.get("message"):
        text += f": {ready['message']}"
    if ready.get("status") == "True":
        return "ready", text
    if ready.get("status") == "False":
        return "failed", text
    return "pending", text


LADDER_MIN_VERSION = (1, 21)  # syncAnnotationsForKPA (knative/serving#16186): Revision annotations reach the PA
SERVING_CRD = "services.serving.knative.dev"
# Container states from which a pod will not become ready by itself: Knative would keep such a pod of a released
# Revision until its activation times out (progress deadline + 30 s), so a release deletes the Service instead.
STUCK_REASONS = frozenset({"CrashLoopBackOff", "CreateContainerConfigError", "CreateContainerError",
                           "ImagePullBackOff", "ErrImagePull", "InvalidImageName"})


def parse_serving_version(text: str | None) -> tuple[int, int] | None:
    """(major, minor) of a Knative release label: ``1.23.0``, ``v1.21.1``, ``knative-v1.20.3``; None for
    ``devel`` or anything else that names no release."""
    if not text:
        return None
    head = text.strip().removeprefix("knative-").lstrip("v").split(".")
    try:
        return int(head[0]), int(head[1])
    except (IndexError, ValueError):
        return None


def _user_container(pod: Mapping[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((c for c in statuses if c.get("name") == CONTAINER_NAME), None) or \
        next((c for c in statuses if c.get("name") != "queue-proxy"), {})


def pod_is_stuck(pod: Mapping[str, Any]) -> str | None:
    """Why a pod cannot become ready by itself (unscheduled, crash-looping, no config), or None."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return cond.get("message") or cond.get("reason") or "Unschedulable"
    waiting = (_user_container(pod).get("state") or {}).get("waiting") or {}
    if waiting.get("reason") in STUCK_REASONS:
        return f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    return None


def pod_is_running(pod: Mapping[str, Any]) -> bool:
    return "running" in (_user_container(pod).get("state") or {})


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's Ready condition (the kubelet's, from the readiness probe queue-proxy answers)."""
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _terminating(pod: Mapping[str, Any]) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def _address(obj: Mapping[str, Any]) -> str | None:
    status = obj.get("status") or {}
    return (status.get("address") or {}).get("url") or status.get("url")


class KnativeEffects(Effects):
    backend = "knative"
    stop_on_shutdown = False  # workers are Knative's to scale down; deleting fma-requester collects them
    reclaimable = True  # a release ends when the autoscaler removes the pod; a request meanwhile keeps it

    def can_reclaim(self, handle: WorkerHandle) -> bool:
        """Not when the release deleted the Service: its pods are going whatever happens, so a start would only
        run a second worker beside them (it waits for them instead: ``_wait_orphans``)."""
        return not handle.data.get("deleted")

    def __init__(self, registry: ModelRegistry, kn: KnativeSettings, *, api: Any = None,
                 control_timeout_s: float = 120.0, token: str | None = None,
                 hub_cache_dir: Path | None = None) -> None:
        self.registry = registry
        self.kn = kn
        self.hub_cache_dir = hub_cache_dir or default_cache_dir()  # the claim the requester mounts read-write
        self.kube = KubeClient(api if api is not None else load_api(), kn.namespace or "default",
                               retries=kn.retries, timeout_s=kn.kube_timeout_s)
        # The workers' token (FMA_WORKER_TOKEN, the same Secret key their pods get): every control call carries it.
        self._control = WorkerControl(control_timeout_s, 10.0, token=token)
        self._own: dict[str, Any] | None = None
        self._by_service = {worker_service_name(spec.name): spec.name for spec in registry}
        self._handles: dict[str, WorkerHandle] = {}  # model -> the incarnation the machine holds
        self._lock = threading.Lock()
        # Per model: a stop's writes and a start's (a request taking the worker back) never interleave.
        self._model_locks: dict[str, threading.Lock] = {}
        self._version: tuple[int, int] | None = None
        self._version_known = False
        self.pod_wait_s = 2.0  # one pod watch's length while a release waits for its pods to go
        self._closing = threading.Event()
        self._watch: WatchStream | None = None
        self.watch_window_s = 60.0  # one watch request's length (the server ends it; we watch again)
        self.watch_grace_s = 10.0  # how much longer than the server's own watch timeout a silent read may wait

    # ---- the cluster's release -----------------------------------------------------------------

    def serving_version(self) -> tuple[int, int] | None:
        """(major, minor) of the cluster's Knative Serving, read once; None when it cannot be told."""
        with self._lock:
            if self._version_known:
                return self._version
        text: str | None = self.kn.serving_version
        where = "FMA_KNATIVE_SERVING_VERSION"
        if text == "auto":
            where = f"the {SERVING_CRD} CRD's app.kubernetes.io/version label"
            try:
                crd = self.kube.get_crd(SERVING_CRD)
            except KnativeConfigError as exc:  # 403: the ClusterRole is missing
                log.warning("cannot read Knative Serving's version: %s; assuming 1.21 or newer (set "
                            "FMA_KNATIVE_SERVING_VERSION to say)", exc.message)
                crd = {}
            except Exception as exc:  # the API is down: ask again next time
                log.warning("cannot read Knative Serving's version yet: %s", getattr(exc, "message", None) or exc)
                return None
            if crd is None:
                log.warning("no %s CRD: is Knative Serving installed?", SERVING_CRD)
            text = ((crd or {}).get("metadata", {}).get("labels") or {}).get("app.kubernetes.io/version")
        version = parse_serving_version(text)
        if version is None:
            log.warning("Knative Serving's release is unknown (%s: %r); assuming 1.21 or newer", where, text)
        elif version < LADDER_MIN_VERSION:
            log.warning("Knative Serving %d.%d (from %s): sleep is refused and a release deletes the worker Service; "
                        "the sleep ladder needs 1.21 or newer, where Revision annotations reach the autoscaler "
                        "(knative/serving#16186)", *version, where)
        else:
            log.info("Knative Serving %d.%d (from %s): the sleep ladder is on", *version, where)
        with self._lock:
            self._version, self._version_known = version, True
        return version

    def ladder_refusal(self) -> str | None:
        """Why this cluster cannot park a worker asleep, or None if it can."""
        version = self.serving_version()
        if version is None or version >= LADDER_MIN_VERSION:
            return None
        return (f"sleep needs Knative Serving 1.21 or newer (this cluster runs {version[0]}.{version[1]}: before "
                f"1.21 a Revision's annotations never reach its autoscaler and a change to them rolls a new pod); "
                f"release the model instead")

    def _model_lock(self, model: str) -> threading.Lock:
        with self._lock:
            return self._model_locks.setdefault(model, threading.Lock())

    def _write(self, handle: WorkerHandle, what: str, write: Callable[[], Any]) -> Any:
        """One write for ``handle``'s worker, under the model's lock and only while the handle is current.

        A stop cancels the handle first and writes under the same lock, so a start, sleep or wake still running
        when a release begins can never land a write after it (a re-pin after the release would keep the pod and
        its memory while the state machine counts the worker gone).
        """
        with self._model_lock(handle.model):
            if handle.cancelled:
                raise RuntimeError(f"{what} of {handle.model} cancelled: the worker is being released")
            return write()

    # ---- the Service ------------------------------------------------------------------------

    def _own_service(self) -> dict[str, Any] | None:
        """The requester's own Knative Service (read once): the workers' owner, and their image's source."""
        if self._own is None and self.kn.owner_service:
            self._own = self.kube.get(self.kn.owner_service) or {}
            if not self._own:
                log.warning("the requester's own Service %s was not found: workers get no ownerReference and the "
                            "default image", self.kn.owner_service)
        return self._own or None

    def owner_reference(self) -> dict[str, Any] | None:
        """The requester's own Service as owner, so deleting it collects the workers."""
        obj = self._own_service()
        if not obj:
            return None
        return {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": obj["metadata"]["name"],
                "uid": obj["metadata"]["uid"]}

    def worker_image(self) -> str:
        """The image in worker Services: as configured, else the requester's own registry and tag."""
        assert self.kn.template is not None
        if self.kn.image_explicit:
            return self.kn.template.image
        obj = self._own_service() or {}
        containers = ((obj.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []
        image = next((c.get("image") for c in containers if c.get("image")), None)
        return worker_image_for(image) if image else self.kn.template.image

    def manifest(self, spec: ModelSpec) -> dict[str, Any]:
        shared = spec.knative.gpu_binding == "shared"
        assert self.kn.template is not None
        tmpl = dataclasses.replace(self.kn.template, image=self.worker_image())
        uuids = gpu_uuids() if shared and spec.knative.gpus else None
        if uuids is not None and len(uuids) < spec.knative.gpus:
            # The worker will refuse to start and say why (its check names what it was given); said here too, since
            # this is where the cause is: the requester's own pod holds fewer devices than the model shares.
            log.warning("model %s shares %d of the requester's GPUs (gpu_binding: shared) but this requester sees "
                        "%d (nvidia-smi -L: %s); its worker will refuse to start. Give the requester that many "
                        "nvidia.com/gpu, or set the model's knative.gpus to 0 to run it on the CPU",
                        spec.name, spec.knative.gpus, len(uuids), ", ".join(uuids) or "none")
        return render_worker_service(spec, tmpl, owner=self.owner_reference(), gpu_uuids=uuids,
                                     node_name=self.kn.node_name if shared else None)

    def _ensure_service(self, spec: ModelSpec, body: dict[str, Any]) -> dict[str, Any]:
        """Create the worker Service, or adopt ours and bring it up to date (no write if it is)."""
        name = body["metadata"]["name"]
        try:
            return self.kube.create(body)
        except AlreadyExists:
            pass
        existing = self.kube.get(name)
        if existing is None:  # deleted between our create and get: try once more
            return self.kube.create(body)
        meta = existing.get("metadata", {})
        if (meta.get("labels") or {}).get(LABEL_MANAGED_BY) != MANAGED_BY:
            raise KnativeConfigError(f"a Service named {name} already exists in namespace {self.kube.namespace} "
                                     f"and is not managed by {MANAGED_BY}; refusing to touch it (rename or delete "
                                     f"it)", code="foreign_service")
        other = (meta.get("annotations") or {}).get(ANNOTATION_MODEL)
        if other and other != spec.name:
            raise KnativeConfigError(f"Service {name} serves model {other!r}, not {spec.name!r}: the two names map "
                                     f"to the same Service name; rename one of the models", code="name_collision")
        restarted = ((existing.get("spec", {}).get("template", {}).get("metadata") or {}).get("annotations") or
                     {}).get(ANNOTATION_RESTARTED)
        if restarted:  # a recovery's mark stays: taking it away would be one more new Revision
            body = copy.deepcopy(body)
            body["spec"]["template"]["metadata"]["annotations"][ANNOTATION_RESTARTED] = restarted
        patch = adoption_patch(existing, body)
        if patch is None:
            return existing  # already what we want: no write, so no new Revision
        log.info("adopting worker Service %s for %s", name, spec.name)
        return self.kube.patch(name, patch)

    def _unschedulable(self, obj: dict[str, Any]) -> str | None:
        """Why the latest Revision's pod is not scheduled yet, if that is why the Service is not Ready.

        Knative marks the Revision ResourcesAvailable=False as soon as a pod is
        PodScheduled=False (``reconcileDeployment``), which fails the Service;
        on a GPU node pool that scales up it is minutes of waiting, not an error.
        """
        name = (obj.get("status") or {}).get("latestCreatedRevisionName")
        revision = self.kube.get_revision(name) if name else None
        cond = condition(revision or {}, "ResourcesAvailable")
        if cond and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            return cond.get("message") or "Unschedulable"
        return None

    def _failed_revision(self, obj: dict[str, Any]) -> tuple[Literal["wait", "recreate", "fail"], str]:
        """What a ``Ready=False`` Service needs: to be waited on, a new Revision, or to fail the start.

        * a pod waiting for a node: wait (a GPU node pool scaling up);
        * a Revision that was ready, with its container running again after a
          crash: wait (``ContainerHealthy=False`` sticks until a pod is ready);
        * no pod left to recover it - scaled to zero after a crash (the condition
          sticks: ``reconcile_resources.go`` clears it only with a ready replica)
          or after "Initial scale was never achieved": a new Revision;
        * anything else (a container that cannot start): fail, with Knative's message.
        """
        waiting = self._unschedulable(obj)
        if waiting is not None:
            return "wait", f"waiting for a node: {waiting}"
        status = obj.get("status") or {}
        latest = status.get("latestCreatedRevisionName")
        own = condition(self.kube.get_revision(latest) or {}) if latest else None
        if own is not None and own.get("status") != "False":
            # The latest Revision itself has not failed: the Service is not Ready because its route still points
            # at an older Revision that did (configuration.go keeps the latest ready one until a newer is ready).
            return "wait", f"revision {latest} is deploying ({own.get('reason') or own.get('status')})"
        # The Service's own Ready names the route's view ("Configuration ... does not have any ready Revision"):
        # the Revision says why it failed.
        cause = f"; revision {latest}: {own.get('reason')}: {own.get('message')}" if own else ""
        pods = [pod for pod in self.kube.list_pods(f"{LABEL_REVISION}={latest}") if not _terminating(pod)] \
            if latest else []
        if not pods:
            return "recreate", f"revision {latest} failed and has no pod left to recover it"
        if latest == status.get("latestReadyRevisionName") and any(pod_is_running(pod) for pod in pods):
            restarts = max(int(_user_container(pod).get("restartCount") or 0) for pod in pods)
            return "wait", f"the worker's container restarted ({restarts} restart(s)); waiting for it to be ready"
        return "fail", cause

    def _wait_ready(self, name: str, handle: WorkerHandle, obj: dict[str, Any], deadline: float) -> dict[str, Any]:
        """Follow the Service with a watch until it is ready at its generation.

        A ``Ready=False`` Service is waited on, recovered with a new Revision
        (once per start) or fails the start at once with Knative's message, as
        :meth:`_failed_revision` says. The watch is bounded (a half-open
        connection is abandoned) and closed by a stop.
        """
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError as TransportError

        recreated = False
        while True:
            verdict, text = readiness(obj)
            if verdict == "failed":
                action, why = self._failed_revision(obj)
                if action == "recreate" and not recreated:
                    recreated = True
                    log.warning("worker Service %s is stuck (%s; %s): starting a new Revision", name, text, why)
                    touch = restart_patch(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                    obj = self._write(handle, "start", lambda touch=touch: self.kube.patch(name, touch))
                    verdict, text = "pending", f"recovering: {why}; a new Revision was started"
                elif action == "wait":
                    verdict, text = "pending", why
                else:
                    raise RuntimeError(f"worker Service {name} failed: {text}{why}")
            handle.progress = text
            if verdict == "ready":
                return obj
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"worker Service {name} not ready after the deadline; last condition: {text}")
            if handle.cancelled:
                raise RuntimeError(f"start of {name} cancelled")
            try:
                stream = self.kube.watch(field_selector=f"metadata.name={name}",
                                         timeout_s=min(remaining, self.watch_window_s),
                                         resource_version=obj["metadata"].get("resourceVersion"),
                                         read_grace_s=self.watch_grace_s)
                with handle.lock:
                    if handle.cancelled:
                        stream.close()
                    handle.data["watch"] = stream
                for event in stream:
                    if event["type"] == "DELETED":
                        raise RuntimeError(f"worker Service {name} was deleted while starting")
                    obj = event["object"]
                    if readiness(obj)[0] != "pending" or time.monotonic() >= deadline:
                        break
                stream.close()
            except ApiException as exc:
                if exc.status != 410:
                    raise
                log.info("watch on %s expired (410); re-reading", name)  # our resourceVersion is gone
                obj = self._reread(name)
            except TransportError as exc:  # a watch that went silent or broke: read again, watch again
                log.warning("watch on %s broke (%s); re-reading", name, exc)
                obj = self._reread(name)

    def _reread(self, name: str) -> dict[str, Any]:
        fresh = self.kube.get(name)
        if fresh is None:
            raise RuntimeError(f"worker Service {name} disappeared while starting")
        return fresh

    # ---- Effects ------------------------------------------------------------------------------

    def start(self, spec: ModelSpec, handle: WorkerHandle, timeout: float) -> str:
        """Create or adopt the Service, wait until it is ready, give its Revision the model's scaling, and
        make sure no pod of it is left asleep (a request must never wait on a pod that nobody wakes)."""
        deadline = time.monotonic() + timeout
        asked_at = time.monotonic()
        name = worker_service_name(spec.name)
        handle.data["service"] = name
        body = self.manifest(spec)

        def progress(message: str) -> None:
            handle.progress = message
            log.info("%s: %s", spec.name, message)

        # A hub model into the claim the workers mount read-only, before any pod needs it (model_cache.py). A
        # template without the claim gives workers no cache to read: nothing is fetched for them, and a hub
        # model's worker fails its load saying it is not in the model cache.
        if self.kn.template is not None and self.kn.template.model_cache_claim:
            model_cache.fetch_before_start(spec, self.hub_cache_dir, model_cache.hub_env(spec), progress)
        try:
            self._wait_orphans(name, handle, deadline)
            obj = self._write(handle, "start", lambda: self._ensure_service(spec, body))
            handle.data["uid"] = obj["metadata"].get("uid")
            obj = self._wait_ready(name, handle, obj, deadline)
            handle.data["revision"] = (obj.get("status") or {}).get("latestReadyRevisionName")
            self._pin(obj, body, handle)
            self._settle_pods(name, handle, deadline)
            self._scale_from_zero(name, obj, handle, deadline)
        except (ApiError, RuntimeError, TimeoutError):
            raise
        except Exception as exc:  # ApiException and friends: keep the status in the message
            status = getattr(exc, "status", None)
            raise RuntimeError(f"Kubernetes API error{f' {status}' if status else ''}: "
                               f"{getattr(exc, 'reason', None) or exc}") from None
        url = _address(obj)
        if not url:
            raise RuntimeError(f"worker Service {name} is ready but has no address")
        handle.data["revision"] = (obj.get("status") or {}).get("latestReadyRevisionName")
        with self._lock:
            if handle.cancelled:  # released meanwhile: the watch must follow the incarnation that replaced it
                raise RuntimeError(f"start of {name} cancelled")
            self._handles[spec.name] = handle
        handle.steps = self._start_steps(handle, asked_at)
        log.info("worker Service %s for %s ready at %s (revision %s)", name, spec.name, url,
                 (obj.get("status") or {}).get("latestReadyRevisionName"))
        return url

    def _start_steps(self, handle: WorkerHandle, asked_at: float) -> dict[str, float]:
        """The start's timeline: the pod's own boot and load phases (asked of the pod, not through the route),
        and ``total`` from the ask until the start ended here. No ``spawn`` or ``ready_seen``: the pod's clock is
        another node's, so only its own durations are comparable."""
        pods = self._pods(handle)
        start = self._control.start_report(pods[0], 5.0) if pods else {}
        steps = {k: round(float(v), 4) for k, v in (start.get("steps") or {}).items()
                 if isinstance(v, (int, float)) and k != "spawn"}
        steps["total"] = round(time.monotonic() - asked_at, 4)
        return steps

    def _pin(self, obj: dict[str, Any], body: dict[str, Any], handle: WorkerHandle) -> None:
        """Give the ready Revision the model's own scaling back (a release set it to zero).

        Not before Serving 1.21: there a Revision's annotations are copied into
        its pods' template, so a change rolls a new pod; releases delete the
        Service there, so a Revision never needs re-pinning.
        """
        if self.ladder_refusal() is not None:
            return
        name = (obj.get("status") or {}).get("latestReadyRevisionName")
        revision = self.kube.get_revision(name) if name else None
        if revision is None:
            return
        patch = pin_patch(revision, body["spec"]["template"]["metadata"]["annotations"])
        if patch is not None:
            log.info("re-pinning revision %s to the model's scaling", name)
            self._write(handle, "start", lambda: self.kube.patch_revision(name, patch))

    def _wait_orphans(self, name: str, handle: WorkerHandle, deadline: float) -> None:
        """Pods left by a Service deleted moments ago (a release by deletion) are being collected, and hold their
        memory until they are gone: a new Service's pod must not start beside them."""
        while self.kube.list_pods(f"{LABEL_SERVICE}={name}") and self.kube.get(name) is None:
            if time.monotonic() >= deadline or handle.cancelled:
                raise TimeoutError(f"the pods of the deleted worker Service {name} are still there")
            handle.progress = f"waiting for the pods of the deleted Service {name} to go"
            self._wait_pods_change(name, min(deadline - time.monotonic(), self.pod_wait_s))

    def _settle_pods(self, name: str, handle: WorkerHandle, deadline: float) -> None:
        """Before traffic goes to the route: wait out pods still terminating when none is left running (the
        next pod would start beside one that still holds its memory), and wake a pod left asleep (a release of
        a sleeping worker that a request took back, or a sleep someone else asked for)."""
        while True:
            pods = self.kube.list_pods(f"{LABEL_SERVICE}={name}")
            if not pods or any(not _terminating(pod) for pod in pods):
                break
            if time.monotonic() >= deadline or handle.cancelled:
                raise TimeoutError(f"worker Service {name}: its last pod is still terminating")
            handle.progress = f"waiting for {len(pods)} terminating pod(s) of {name} to go"
            self._wait_pods_change(name, min(deadline - time.monotonic(), self.pod_wait_s))
        for url in self._pods(handle):
            if self._control.is_sleeping(url, 10.0):
                log.info("worker Service %s: its pod at %s is asleep; waking it", name, url)
                self._control.wake(handle, max(1.0, deadline - time.monotonic()), url=url)

    def _scale_from_zero(self, name: str, obj: dict[str, Any], handle: WorkerHandle, deadline: float) -> None:
        """A ready Service need not have a pod: one released (or scaled to zero by Knative) stays Ready at zero
        pods, and adopting it writes nothing, so no new Revision starts one. A start must end with a ready pod of
        the ready Revision (a warm or a scheduled pre-warm that leaves none warms nothing): a request through the
        route makes the activator scale the Revision from zero and hold the request until a pod is ready
        (pkg/activator/handler/handler.go); ``/health`` is open and cheap.

        Asked in slices, so a release (which cancels the start) ends it; the activator answers 504 after the
        Revision's ``timeoutSeconds`` and a gateway may answer 502/503 while it programs the route: asked again
        until a pod is ready or the start's deadline. Success is a pod seen ready, not an answer."""
        import httpx

        revision = (obj.get("status") or {}).get("latestReadyRevisionName")
        url = _address(obj)
        if not revision or not url:
            return
        selector = f"{LABEL_REVISION}={revision}"

        def serving() -> bool:
            return any(not _terminating(pod) and pod_is_ready(pod) for pod in self.kube.list_pods(selector))

        if serving():
            return
        log.info("worker Service %s is ready with no ready pod; scaling revision %s from zero through its route",
                 name, revision)
        last = "no answer yet"
        while True:
            if handle.cancelled:
                raise RuntimeError(f"start of {name} cancelled")
            if serving():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"worker Service {name}: no pod of {revision} became ready after a request "
                                   f"through its route ({last})")
            pods = [p for p in self.kube.list_pods(selector) if not _terminating(p)]
            stuck = next((why for why in map(pod_is_stuck, pods) if why), None)
            handle.progress = f"scaling {name} from zero: " + (stuck or (f"{len(pods)} pod(s) starting" if pods
                                                                         else "waiting for the activator"))
            try:
                resp = httpx.get(f"{url}/health", timeout=min(remaining, self.watch_window_s))
            except httpx.TimeoutException:
                last = "the route held the request past the slice"  # the activator is still waiting for a pod
                continue
            except httpx.HTTPError as exc:
                raise RuntimeError(f"worker Service {name}: a request through {url} to scale it from zero "
                                   f"failed: {exc}") from None
            if resp.status_code in (502, 503, 504):
                last = f"the route answered {resp.status_code}"
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                continue
            if not resp.is_success:
                raise RuntimeError(f"worker Service {name}: a request through {url} to scale it from zero was "
                                   f"answered {resp.status_code}: {resp.text[:200]}")
            last = "the route answered 200"
            # The answer came from a ready pod. Its Pod object is usually ready already (the activator routes to
            # pods whose readiness the endpoints show): look before waiting. Waiting first cost a whole watch
            # slice (1 s) on every cold start whose Pod was published before the watch began.
            if serving():
                return
            self._wait_pods_change(name, min(max(0.0, deadline - time.monotonic()), 1.0))

    def stop_timeout(self, spec: ModelSpec, grace: float) -> float:
        return self.kn.release_timeout_s + self.kn.kube_timeout_s

    def stop(self, spec: ModelSpec, handle: WorkerHandle, grace: float) -> None:
        """Release: scale the worker's Revisions to zero (or delete the Service), never touching its template;
        return once its pods are gone (its memory is held until then), within ``FMA_KNATIVE_RELEASE_TIMEOUT``.

        A template change would make a new Revision, and a new Revision starts
        a pod (initial scale 1): the Revision's own annotations are what its
        PodAutoscaler follows (from Serving 1.21: ``reconcile_resources.go``
        ``syncAnnotationsForKPA``), and they are mutable. Knative removes the
        pod once no request came for the stable window (60 s) and queue-proxy
        has drained (30 s). The Service is deleted instead by policy, before
        Serving 1.21, and when a pod cannot become ready by itself
        (crash-looping, unschedulable: Knative would keep it until its
        activation times out, progress deadline + 30 s).
        """
        handle.cancel()
        with handle.lock:
            stream = handle.data.get("watch")
        if stream is not None:
            stream.close()  # a start still watching gives up now
        name = worker_service_name(spec.name)
        with self._lock:
            if self._handles.get(spec.name) is handle:
                del self._handles[spec.name]
        deadline = time.monotonic() + self.kn.release_timeout_s
        try:
            with self._model_lock(spec.name):
                if handle.stop_abandoned.is_set():
                    return  # a request took the worker back before anything was written
                deleted = self._release(name)
                handle.data["deleted"] = deleted
            how = "its Service deleted" if deleted else "released"
            self.listener.stop_pending(handle, f"{how}; Knative removes its pods (waiting up to "
                                               f"{self.kn.release_timeout_s:.0f} s)")
            self._wait_pods_gone(name, handle, deadline, deleted)
        except Exception as exc:  # never raise; Knative scales an idle Revision down by itself anyway
            log.error("could not release %s: %s", name, getattr(exc, "message", None) or exc)

    def _release(self, name: str) -> bool:
        """Scale the Service's Revisions to zero, or delete it; True if it was deleted."""
        if self.kn.release_policy == "delete" or self.ladder_refusal() is not None:
            self.kube.delete(name)
            return True
        svc = self.kube.get(name)
        if svc is None:
            return True
        if (svc["metadata"].get("annotations") or {}).get(ANNOTATION_RELEASED) != "true":
            self.kube.patch(name, {"metadata": {"annotations": {ANNOTATION_RELEASED: "true"}}})
        status = svc.get("status") or {}
        for revision in {status.get("latestReadyRevisionName"), status.get("latestCreatedRevisionName")} - {None}:
            obj = self.kube.get_revision(revision)
            patch = release_patch(obj) if obj else None
            if patch is not None:
                self.kube.patch_revision(revision, patch)
        return False

    def _wait_pods_gone(self, name: str, handle: WorkerHandle, deadline: float, deleted: bool) -> None:
        """Until no pod of the Service is left (a watch on its pods, re-listed on every change)."""
        while True:
            pods = self.kube.list_pods(f"{LABEL_SERVICE}={name}")
            if not pods:
                log.info("released worker Service %s: its pods are gone", name)
                return
            if handle.stop_abandoned.is_set() or self._closing.is_set():
                return  # taken back by a request, or the requester is shutting down: Knative finishes it
            stuck = next((why for pod in pods if not _terminating(pod) and (why := pod_is_stuck(pod))), None)
            if stuck and not deleted:
                with self._model_lock(handle.model):
                    if handle.stop_abandoned.is_set():
                        return
                    log.warning("released worker Service %s has a pod that cannot become ready (%s); Knative would "
                                "keep it until its activation times out: deleting the Service", name, stuck)
                    self.kube.delete(name)
                    deleted = handle.data["deleted"] = True
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error("released worker Service %s still has %d pod(s) after %.0f s (FMA_KNATIVE_RELEASE_TIMEOUT); "
                          "no longer counting them against the budget", name, len(pods), self.kn.release_timeout_s)
                return
            self._wait_pods_change(name, min(remaining, self.pod_wait_s))

    def _wait_pods_change(self, name: str, seconds: float) -> None:
        """Until a pod of the Service changes, or ``seconds`` pass (a bounded watch)."""
        listing = self.kube.pod_list(f"{LABEL_SERVICE}={name}")
        rv = (listing.get("metadata") or {}).get("resourceVersion")
        stream = self.kube.watch_pods(f"{LABEL_SERVICE}={name}", resource_version=rv, timeout_s=max(1.0, seconds),
                                      read_grace_s=self.watch_grace_s)
        try:
            for _ in stream:
                break
        except Exception as exc:  # an expired or broken watch: the caller lists again
            log.debug("pod watch on %s ended: %s", name, exc)
        finally:
            stream.close()

    def _pods(self, handle: WorkerHandle) -> list[str]:
        """Base URLs of the running pods of the worker's ready Revision (pod IP and the user container's port).

        Control calls go here, never through the route: the route and the
        activator forward only to pods whose readiness probe passes, and a
        sleeping worker's does not.
        """
        revision = handle.data.get("revision")
        if not revision:
            return []
        urls = []
        for pod in self.kube.list_pods(f"{LABEL_REVISION}={revision}"):
            status, meta = pod.get("status") or {}, pod.get("metadata") or {}
            if status.get("phase") != "Running" or not status.get("podIP") or meta.get("deletionTimestamp"):
                continue
            containers = (pod.get("spec") or {}).get("containers") or []
            user = next((c for c in containers if c.get("name") == CONTAINER_NAME), None) or \
                next((c for c in containers if c.get("name") != "queue-proxy"), {})
            port = ((user.get("ports") or [{}])[0]).get("containerPort", 8080)
            urls.append(f"http://{status['podIP']}:{port}")
        return urls

    def sleep(self, spec: ModelSpec, handle: WorkerHandle, level: int, timeout: float) -> None:
        """Pin the ready Revision at one pod (so Knative keeps it while it gets no traffic), then put that
        pod's worker to sleep, directly; a Revision that may run more pods than one is refused (409), and so is
        a cluster older than Serving 1.21.

        The pod stays ready to Knative while asleep (its readiness probe is
        ``/loaded``), so its PodAutoscaler stays Active: a later release scales
        it to zero like any idle pod.
        """
        refusal = self.ladder_refusal()
        if refusal is not None:
            raise EffectRefused(refusal, status=409)
        if spec.knative.max_scale != 1:
            pods = spec.knative.max_scale or "any number of"
            raise EffectRefused(f"sleep needs knative.max_scale: 1 (this model may run {pods} pods, which scale on "
                                f"their own); release it instead", status=409)
        revision = handle.data.get("revision")
        obj = self.kube.get_revision(revision) if revision else None
        if obj is None:
            raise EffectRefused("the worker's revision is gone", status=409)
        pods = self._pods(handle)
        if not pods:
            raise EffectRefused("the worker has no pod running (Knative scaled it to zero): nothing to put to "
                                "sleep; release it, or send it a request first", status=409)
        pin = pin_patch(obj, {**self._scaling(spec), MIN_SCALE: "1"})
        if pin is not None:
            self._write(handle, "sleep", lambda: self.kube.patch_revision(revision, pin))
        try:
            for url in pods:
                self._control.sleep(handle, level, timeout, url=url)
        except BaseException:
            self._unpin(spec, handle)  # it did not sleep: back to the model's own scaling
            raise

    def wake(self, spec: ModelSpec, handle: WorkerHandle, timeout: float) -> None:
        """Wake the pod directly, then give its Revision the model's own scaling back."""
        pods = self._pods(handle)
        if not pods:
            raise RuntimeError("the sleeping worker's pod is gone; it will start cold")
        for url in pods:
            self._control.wake(handle, timeout, url=url)
        self._unpin(spec, handle)

    def _scaling(self, spec: ModelSpec) -> dict[str, str]:
        """The model's own autoscaling annotations, as the template renders them."""
        return self.manifest(spec)["spec"]["template"]["metadata"]["annotations"]

    def _unpin(self, spec: ModelSpec, handle: WorkerHandle) -> None:
        if handle.cancelled:
            return  # a release is under way: its annotations, not the model's, are the ones that hold
        revision = handle.data.get("revision")
        obj = self.kube.get_revision(revision) if revision else None
        patch = pin_patch(obj, self._scaling(spec)) if obj else None
        if patch is not None:
            try:
                self._write(handle, "unpin", lambda: self.kube.patch_revision(revision, patch))
            except RuntimeError:
                pass  # released meanwhile: nothing to give back

    def probe(self, spec: ModelSpec, handle: WorkerHandle, timeout: float) -> bool:
        """The Service is there and ready, and when its Revision has pods running, one answers ``/health``.

        The pod is asked directly (a route answers for a Revision even with no
        pod, through the activator); a Revision scaled to zero by Knative is
        alive: the next request brings a pod up.
        """
        obj = self.kube.get(worker_service_name(spec.name))
        if obj is None or readiness(obj)[0] != "ready":
            return False
        pods = self._pods(handle)
        return not pods or any(self._control.alive(handle, timeout, url=url) for url in pods)

    def read_log(self, spec: ModelSpec, handle: WorkerHandle, limit: int) -> str:
        return handle.progress[:limit]

    # ---- keeping in step with the cluster -----------------------------------------------------

    def reload(self, registry: ModelRegistry) -> None:
        with self._lock:
            self.registry = registry
            self._by_service = {worker_service_name(spec.name): spec.name for spec in registry}

    def services(self) -> list[dict[str, Any]]:
        """The worker Services we manage, by label selector."""
        return list(self.kube.list(MANAGED_SELECTOR).get("items", []))

    def open(self, registry: ModelRegistry) -> None:
        self.serving_version()  # said once at start-up, in the log
        threading.Thread(target=self._watch_loop, name="kn-watch", daemon=True).start()

    def _sync(self, kind: str, obj: dict[str, Any]) -> None:
        model = self._by_service.get(obj.get("metadata", {}).get("name", ""))
        if model is None:
            return
        with self._lock:
            handle = self._handles.get(model)
        if kind == "DELETED":
            uid = obj.get("metadata", {}).get("uid")
            if handle is not None and handle.data.get("uid") not in (None, uid):
                return  # an older Service of that name (deleted by a release) whose event arrives late
            self.listener.worker_gone(handle, model)
            return
        verdict, text = readiness(obj)
        if verdict == "failed" and handle is not None:
            waiting = self._unschedulable(obj)
            if waiting is not None:
                log.warning("worker Service for %s is waiting for a node: %s", model, waiting)
                return
            self.listener.worker_exited(handle, f"worker Service failed: {text}")
        elif verdict == "ready" and handle is None and kind == "ADDED":
            self._adopt(model, obj)

    def _adopt(self, model: str, obj: dict[str, Any]) -> None:
        """A ready worker Service found at start-up (a requester restart), offered in its true state: asleep
        or awake as its pod says (``/is_sleeping``), releasing while a released one's pods are still there,
        not at all when Knative has scaled it to zero (the next start re-pins it, no new Revision)."""
        name = obj["metadata"]["name"]
        found = WorkerHandle(model)
        found.url = _address(obj)
        found.data["service"] = name
        found.data["revision"] = (obj.get("status") or {}).get("latestReadyRevisionName")
        if (obj["metadata"].get("annotations") or {}).get(ANNOTATION_RELEASED) == "true":
            if self.kube.list_pods(f"{LABEL_SERVICE}={name}"):
                self.listener.worker_found(model, found, "releasing")
            return
        pods = self._pods(found)
        if not pods:
            return
        answers = [self._control.is_sleeping(url, 10.0) for url in pods]
        if None in answers:
            log.warning("worker Service %s: a pod did not say whether it sleeps; not adopting it", name)
            return
        with self._lock:
            if self._handles.setdefault(model, found) is not found:
                return
        self.listener.worker_found(model, found, "sleeping" if any(answers) else "ready")

    def _watch_loop(self) -> None:
        from kubernetes.client.exceptions import ApiException

        rv: str | None = None
        while not self._closing.is_set():
            try:
                if rv is None:
                    listing = self.kube.list(MANAGED_SELECTOR)
                    for item in listing.get("items", []):
                        self._sync("ADDED", item)
                    rv = listing.get("metadata", {}).get("resourceVersion")
                stream = self.kube.watch(label_selector=MANAGED_SELECTOR, resource_version=rv, timeout_s=60,
                                         read_grace_s=self.watch_grace_s)
                self._watch = stream
                for event in stream:
                    if self._closing.is_set():
                        break
                    rv = event["object"].get("metadata", {}).get("resourceVersion", rv)
                    self._sync(event["type"], event["object"])
                stream.close()
            except ApiException as exc:
                if exc.status == 410:
                    rv = None  # expired: re-list
                    continue
                log.warning("watching worker Services failed (%s); retrying in 5 s", exc.status)
                self._closing.wait(5)
            except ApiError as exc:
                log.warning("watching worker Services failed: %s; retrying in 5 s", exc.message)
                self._closing.wait(5)
            except Exception as exc:  # transport errors, a half-open watch: keep watching
                log.warning("watching worker Services failed: %s; retrying in 5 s", exc)
                self._closing.wait(5)

    def close(self) -> None:
        self._closing.set()
        if self._watch is not None:
            self._watch.close()
        self._control.close()


class KnativeActuator(Lifecycle):
    """The state machine driving one Knative Service per model."""

    def __init__(self, registry: ModelRegistry, metrics: RequesterMetrics, kn: KnativeSettings, *,
                 api: Any = None, emit: EventSink | None = None, config: LifecycleConfig | None = None,
                 token: str | None = None, hub_cache_dir: Path | None = None) -> None:
        config = config or LifecycleConfig()
        check_models(registry, kn)
        self.kn = kn
        self.kn_effects = KnativeEffects(registry, kn, api=api, control_timeout_s=config.control_timeout_s,
                                         token=token, hub_cache_dir=hub_cache_dir)
        super().__init__(registry, metrics, self.kn_effects, emit=emit, config=config)

    def services(self) -> list[dict[str, Any]]:
        return self.kn_effects.services()

    def reload(self, registry: ModelRegistry) -> list[str]:
        """A new models file, and the worker template beside it (the same ConfigMap): both checked first."""
        kn = KnativeSettings.from_env()
        check_models(registry, kn)
        self.kn = self.kn_effects.kn = kn
        return super().reload(registry)

    def manifest(self, spec: ModelSpec) -> dict[str, Any]:
        return self.kn_effects.manifest(spec)

