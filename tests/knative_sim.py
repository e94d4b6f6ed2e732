"""A simulator of Knative Serving (and the kubelet under it), over the fake API server.

It answers to Knative's source, not to the requester: every behaviour below
names the file and function of knative/serving (``knative-v1.23.0`` unless a
version is given) or of kubernetes/kubernetes it mirrors, and
``docs/knative-conformance.md`` lists them with the tests that exercise them.

Serving
* **Revisions** - one per template generation, named ``<service>-0000N``
  (``pkg/reconciler/configuration/resources/revision.go``, ``MakeRevision``),
  carrying the template's annotations and its defaulted spec; a change of the
  Service's metadata makes none (``pkg/reconciler/configuration/configuration.go``,
  ``ReconcileKind``), whose generation moves with the template only.
  ``latestReadyRevisionName`` only moves forward: a ready revision that later
  fails stays the latest ready one, the Configuration goes ``Ready=False``
  (``configuration.go``: ``MarkLatestCreatedFailed``, "LatestReadyFailed") and
  the route keeps sending its traffic there (``pkg/reconciler/route/route.go``,
  ``configureTraffic``: a bad target is marked, the route is not reprogrammed).
  The Service's ``Ready`` is knative.dev/pkg's condition set over
  ConfigurationsReady then RoutesReady (``service.go``): the route's
  ``RevisionMissing`` message wins when both failed. A host with no route yet
  is a 404.
* **The PodAutoscaler** (``pkg/reconciler/autoscaling/kpa/kpa.go`` and
  ``scaler.go``) - scale bounds from the Revision's annotations, which reach
  the PA on every reconcile from v1.21 (``reconcile_resources.go``,
  ``syncAnnotationsForKPA``), and are ignored while the Revision is
  unreachable (``resources/pa.go`` ``reachability``: a failed container or
  resources with no pod ready, or a Revision the route no longer uses;
  ``pa_lifecycle.go`` ``ScaleBounds``); before v1.21 the PA keeps the annotations it was
  created with (``resources/pa.go``, ``MakePA``; ``reconcilePA`` compares only
  the spec) and every Revision annotation is copied into the Deployment's pod
  template (``resources/meta.go``, ``makeAnnotations``), so an annotation change
  rolls the Deployment: a surge pod first, then the old one goes. The decider
  (``pkg/autoscaler/scaling/autoscaler.go``, ``Scale``) wants a pod while any
  request was seen within the stable window. ``computeActiveCondition``: the
  PA is ``Active`` with enough ready pods, ``Activating`` (Unknown) while it
  wants pods that are not ready, ``Inactive`` at zero. ``handleScaleToZero``: an
  activating PA is not scaled to zero before ``CanFailActivation`` (progress
  deadline + 30 s since activation began, ``pa_lifecycle.go``); an active one
  only once it has been active for the stable window (then it is marked
  inactive, and the next reconcile, which its own status update triggers,
  takes the fast path to zero once the retention period has passed: the
  activator is always in the path with ``target-burst-capacity: -1``). A new
  revision starts at ``initial-scale`` (``resources/deploy.go``;
  ``kpa/resources/decider.go``); it is initialized once it has that many
  ready pods (0: at once).
* **Revision conditions** - ``reconcile_resources.go`` ``reconcileDeployment``:
  while replicas > 0 and none available, a ``PodScheduled=False`` pod marks
  ``ResourcesAvailable=False`` (its reason and message), and a user container
  with a ``lastState.terminated`` marks ``ContainerHealthy=False``
  (``ExitCode<n>``, "Container failed with: ...") - which only
  ``ReadyReplicas > 0`` clears, so it sticks while the pod lives and after the
  revision scaled to zero. ``revision_lifecycle.go`` ``PropagateAutoscalerStatus``:
  a PA that went inactive before its scale target ever initialized marks
  ``ResourcesAvailable=False`` "Initial scale was never achieved". A Deployment
  with no available pod within its progress deadline is ``ProgressDeadlineExceeded``.
* **Readiness gating** - the route and the activator forward only to ready pods;
  a pod is probed on its readiness path every period (queue-proxy runs the
  user container's probe: ``pkg/queue/readiness``), with the defaulted
  success/failure thresholds.
* **The activator** buffers requests while a revision has no ready pod (up to
  10,000: ``pkg/activator/net/throttler.go``); its timeout handler
  (``cmd/activator/main.go``, ``pkg/http/handler/timeout.go``), timed from the
  request's arrival, caps it at ``timeoutSeconds`` in total and
  ``responseStartTimeoutSeconds`` to the first byte: a 504 before the
  headers, after them the text ``activator request timeout`` ends the body
  normally (queue-proxy's own handler, ``pkg/queue/sharedmain/handlers.go``,
  starts later and never fires first).
* **Terminating pods** keep running (and holding their memory) through
  queue-proxy's drain: the user container's preStop waits for it
  (``resources/deploy.go``), which ends 30 s after the last request arrived
  (``pkg/queue/sharedmain/main.go`` ``drainSleepDuration``;
  ``knative.dev/pkg/network/handlers/drain.go`` ``Drain``); requests still in
  flight then get the termination grace period, ``timeoutSeconds``.
* **The webhook** - ``knative_webhook.KnativeWebhook``: objects are stored as
  the defaulting webhook leaves them, then validated.

Kubernetes
* **The kubelet** resolves ``env[].valueFrom.secretKeyRef`` from Secrets; a
  missing Secret or key leaves the container waiting with
  ``CreateContainerConfigError`` (``pkg/kubelet/kubelet_pods.go``,
  ``makeEnvironmentVariables``). A container that exits is restarted
  (``restartPolicy: Always``) at once the first time, then after 10 s doubling
  to 5 min (``CrashLoopBackOff``: ``pkg/kubelet/kuberuntime/kuberuntime_manager.go``
  ``doBackOff``; ``pkg/kubelet/kubelet.go`` ``backOffPeriod``, ``MaxContainerBackOff``;
  forgotten after a long run), in the same pod, at the same address, with
  ``restartCount`` and ``lastState.terminated`` (``OOMKilled`` or ``Error``; its
  message what the container wrote to its termination log, else the log's tail with
  ``terminationMessagePolicy: FallbackToLogsOnError``: ``kuberuntime_container.go``
  ``getTerminationMessage``). A pod is ``Pending``
  until its container first started.
* Pods are published as Pod objects (labels, IP, port, conditions, container
  statuses, ``deletionTimestamp`` while terminating) so the requester sees
  what it would see on a cluster.

Its clock can run faster than wall time (``speed``), so stable windows and
timeouts pass quickly in tests. A pod's container is a stand-in
(``StandInWorker``: the worker's HTTP surface, the sleep API and the token
check included), a real local worker process (``process``), or a server the
test runs (``upstream:URL``).
What is *not* simulated: the activator's load balancing and panic mode, the
decider's target utilisation, window and scale-down-delay annotations, multiple
containers, DomainMappings, tags and traffic splits (and the defaults traffic
targets get), TLS, resource quantities' canonical forms, Revision garbage
collection, the webhook's check that creator and lastModifier are not changed by
hand.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import os
import queue
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from knative_webhook import AUTOSCALING, ClusterConfig, KnativeWebhook, go_duration
from kube_fake import CLUSTER, CRDS, FakeKube

from fma_common.procs import WORKER_APP, WORKER_CONFIG, free_port, start_gunicorn, stop_process_group

ACTIVATOR_CAPACITY = 10_000  # pkg/activator/net/throttler.go
ACTIVATION_BUFFER_S = 30.0  # kpa/scaler.go activationTimeoutBuffer
# kpa/scaler.go re-enqueues a PA it marks inactive after 3 s, but that is a fallback: the PA's own status update
# enqueues it at once (kpa/controller.go, HandleAll(impl.Enqueue)), so the fast path follows in the next reconcile.
PA_REENQUEUE_S = 0.0
DRAIN_S = 30.0  # pkg/queue/sharedmain/main.go drainSleepDuration (the preStop waits for it)
CRASH_BACKOFF_S, CRASH_BACKOFF_MAX_S = 10.0, 300.0  # pkg/kubelet/kubelet.go backOffPeriod, MaxContainerBackOff
# k8s.io/client-go util/flowcontrol Backoff: an entry unused for twice the cap is forgotten (a container that ran that
# long starts its backoff over).
CRASH_BACKOFF_RESET_S = 2 * CRASH_BACKOFF_MAX_S
MANAGED = "app.kubernetes.io/managed-by"
# resources/meta.go: annotations the controller never copies onto what it makes
EXCLUDED_ANNOTATIONS = ("serving.knative.dev/lastPinned", "serving.knative.dev/preserve",
                        "serving.knative.dev/routingStateModified", "serving.knative.dev/routes")


def _cond(kind: str, status: str, reason: str | None = None, message: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": kind, "status": status,
                           "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if reason:
        out["reason"] = reason
    if message:
        out["message"] = message
    return out


def _rfc3339(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def _log_tail(path: Path, limit: int = 2048) -> str:
    """The end of a container's log, as FallbackToLogsOnError reports it (the last 2 KiB or 80 lines)."""
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-80:])


def version_tuple(text: str) -> tuple[int, int]:
    """``"1.23.0"`` -> (1, 23); anything else (``devel``) counts as the newest."""
    parts = text.lstrip("v").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (99, 0)


def _condition_set(happy: str, marks: list[tuple[str, str, str, str]]) -> list[dict[str, Any]]:
    """knative.dev/pkg ``apis/condition_set.go`` for a living condition set: each dependent marked in order;
    ``MarkFalse`` sets the happy condition False with its reason and message, ``MarkUnknown`` leaves an already
    False one alone (a False dependent trumps it) and otherwise makes it Unknown with its own, ``MarkTrue`` makes it
    True once every dependent is."""
    state = {kind: ("Unknown", "", "") for kind, *_ in marks}
    top = ("Unknown", "", "")
    for kind, status, reason, message in marks:
        state[kind] = (status, reason, message)
        if status == "False":
            top = (status, reason, message)
        elif status == "Unknown":
            if any(v[0] == "False" for v in state.values()):
                if top[0] != "False":
                    top = ("False", reason, message)
            else:
                top = (status, reason, message)
        elif all(v[0] == "True" for v in state.values()):
            top = ("True", "", "")
    return [_cond(happy, top[0], top[1] or None, top[2] or None)] + \
        [_cond(kind, v[0], v[1] or None, v[2] or None) for kind, v in state.items()]


class SimClock:
    """Simulated seconds; ``speed`` of them pass per real second, and tests may jump ahead."""

    def __init__(self, speed: float = 1.0) -> None:
        self.speed = speed
        self._real0 = time.monotonic()
        self._offset = 0.0

    def now(self) -> float:
        return self._offset + (time.monotonic() - self._real0) * self.speed

    def advance(self, seconds: float) -> None:
        self._offset += seconds

    def real(self, sim_seconds: float) -> float:
        return max(0.0, sim_seconds) / self.speed


@dataclass(eq=False)
class Pod:
    """One pod and its user container, as the kubelet runs and reports it."""

    name: str
    revision: str
    created: float
    mode: str
    rollout: int = 0  # which pod template (pre-1.21 annotation rollouts) it was made from
    scheduled: bool = True
    ready: bool = False
    state: str = "waiting"  # the user container: waiting | running | terminated
    reason: str = "ContainerCreating"  # while waiting
    message: str = ""
    started_at: float | None = None
    restarts: int = 0
    last_exit: tuple[int, str, str] | None = None  # lastState.terminated (exit code, reason, message)
    ever_started: bool = False
    log_tail: str = ""  # what the container last wrote (FallbackToLogsOnError makes it the termination message)
    restart_at: float | None = None  # CrashLoopBackOff: when the kubelet starts it again
    backoff: float = 0.0
    crashing: bool = False  # every start of its container exits soon after (a crash loop)
    deleting_since: float | None = None
    deleting_at: float = 0.0  # wall clock, for deletionTimestamp
    ready_at: float | None = None
    proc: subprocess.Popen | None = None
    termination_file: Path | None = None  # the host file mounted at terminationMessagePath (process pods)
    port: int | None = None  # a real container keeps its pod's address across restarts
    url: str | None = None
    in_flight: int = 0
    published: tuple | None = None
    standin: StandInWorker | None = None
    probe_ok: int = 0
    probe_failed: int = 0
    gone: bool = False

    @property
    def deleting(self) -> bool:
        return self.deleting_since is not None

    @property
    def exited(self) -> bool:
        return self.state != "running"


@dataclass(eq=False)
class Revision:
    name: str
    service: str
    namespace: str
    generation: int
    created: float
    mode: str
    pods: list[Pod] = field(default_factory=list)
    replicas: int = 1  # the Deployment's spec.replicas, as the KPA sets it
    initialized_at: float | None = None  # PA ScaleTargetInitialized
    ever_ready: bool = False
    last_traffic: float | None = None
    waiting: int = 0  # requests buffered in the activator
    pa: str = "Unknown"  # the PA's Active condition: Unknown (activating) | True | False
    pa_since: float = 0.0
    pa_reason: str = "Queued"
    health: tuple[str, str, str] = ("Unknown", "Deploying", "")  # ContainerHealthy (status, reason, message)
    pa_annotations: dict[str, str] = field(default_factory=dict)  # what MakePA copied at creation (pre-1.21)
    pod_annotations: dict[str, str] | None = None  # the pod template's (pre-1.21 rollouts)
    rollout: int = 0
    progress_since: float = 0.0  # the Deployment's progress clock: creation, or the last scale-up from zero
    resources_failed: bool = False  # ResourcesAvailable=False at the last status
    last_request: float | None = None  # the last request's arrival (queue-proxy's drain counts from it)
    status_written: dict[str, Any] | None = None


class SimulatedKnative:
    """Reconciles Services into Revisions and pods, scales them, and serves their routes."""

    def __init__(self, kube: FakeKube, workdir: Path, cache_dir: Path | None = None, default: str = "ready", *,
                 speed: float = 1.0, config: ClusterConfig | None = None, pod_start_s: float = 2.0,
                 webhook: bool = True, tick_s: float = 0.02, claims: dict[str, Path] | None = None) -> None:
        self.kube = kube
        self.workdir = workdir
        self.cache_dir = cache_dir
        # PersistentVolumeClaim name -> the host folder behind it (a bound claim's volume), for process pods
        self.claims = claims or {}
        self.default = default
        self.clock = SimClock(speed)
        self.config = config or ClusterConfig()
        self.legacy = version_tuple(self.config.serving_version) < (1, 21)
        self.pod_start_s = pod_start_s
        self.tick_s = tick_s
        # Service name -> ready | process | fail | unschedulable | unschedulable:S | slow:S | upstream:URL
        self.behaviour: dict[str, str] = {}
        self.revisions: dict[str, Revision] = {}  # by revision name
        self.revisions_created: dict[str, int] = {}  # per Service
        self.pods_started: dict[str, int] = {}  # per Service
        self.webhook = KnativeWebhook(self.config) if webhook else None
        if self.webhook:
            kube.admission.append(self.webhook)
        self._routes: dict[str, tuple[ThreadingHTTPServer, str]] = {}  # Service -> (server, url)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._events: queue.Queue[tuple[str, str, dict[str, Any]]] = queue.Queue()
        self._closing = False
        self._seq = itertools.count(1)
        self._templates: dict[str, tuple[int, Any]] = {}  # Service -> (Configuration generation, its template)
        self._publish_crd()
        kube.listeners.append(lambda kind, plural, obj: self._events.put((kind, plural, obj)))
        self._thread = threading.Thread(target=self._loop, name="knative-sim", daemon=True)
        self._thread.start()

    def _publish_crd(self) -> None:
        """The Serving CRD as a release installs it (``config/core/300-resources/service.yaml``, labelled with
        the release by ``hack/generate-yamls.sh``)."""
        if self.kube.get_object(CLUSTER, "services.serving.knative.dev", plural=CRDS) is None:
            self.kube.put_object({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                                  "metadata": {"name": "services.serving.knative.dev", "namespace": CLUSTER,
                                               "labels": {"app.kubernetes.io/name": "knative-serving",
                                                          "app.kubernetes.io/version": self.config.serving_version}},
                                  "spec": {"group": "serving.knative.dev"}}, plural=CRDS)

    # ---- for tests --------------------------------------------------------------------------

    def service_revisions(self, service: str) -> list[Revision]:
        with self._lock:
            return [r for r in self.revisions.values() if r.service == service]

    def live_pods(self, service: str) -> list[Pod]:
        """Pods that are not terminating."""
        with self._lock:
            return [p for r in self.service_revisions(service) for p in r.pods if not p.deleting]

    def pods(self, service: str) -> list[Pod]:
        """Every pod that exists, terminating ones included (they still hold their memory)."""
        with self._lock:
            return [p for r in self.service_revisions(service) for p in r.pods]

    def crash(self, pod: Pod, *, again: bool = False) -> None:
        """The pod's container is OOM-killed; ``again``: every restart crashes too."""
        with self._lock:
            pod.crashing = again
            pod.log_tail = "torch.OutOfMemoryError: CUDA out of memory"
            self._container_exited(pod, 137, self.clock.now())

    def wait_until(self, predicate: Any, sim_seconds: float, what: str) -> None:
        deadline = time.monotonic() + self.clock.real(sim_seconds) + 5.0
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"simulator: timed out waiting for {what}")
                self._changed.wait(min(remaining, 0.05))

    def close_route(self, service: str) -> None:
        """Take a Service's route down (connections to its address are refused)."""
        with self._lock:
            entry = self._routes.get(service)
        if entry:
            entry[0].shutdown()
            entry[0].server_close()

    def route_url(self, service: str) -> str | None:
        with self._lock:
            entry = self._routes.get(service)
            return entry[1] if entry else None

    # ---- the control loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closing:
            try:
                while True:
                    kind, plural, obj = self._events.get_nowait()
                    self._on_event(kind, plural, obj)
            except queue.Empty:
                pass
            try:
                self._tick()
            except Exception:  # a simulator bug must show, not kill the loop silently
                import traceback

                traceback.print_exc()
            time.sleep(self.tick_s)

    def _on_event(self, kind: str, plural: str, obj: dict[str, Any]) -> None:
        if plural != "services":
            return
        meta = obj["metadata"]
        if (meta.get("labels") or {}).get(MANAGED) is None:
            return  # not a worker (e.g. the requester's own Service): leave its status alone
        name, ns = meta["name"], meta["namespace"]
        if kind == "DELETED":
            self._delete_service(name, ns)
            return
        with self._lock:
            # The Configuration's generation moves with the template only (a change of the Service's traffic or
            # metadata makes no Revision); Revisions are named after it.
            template = obj["spec"].get("template")
            generation, last = self._templates.get(name, (0, None))
            if generation and template == last:
                return
            generation += 1
            self._templates[name] = (generation, template)
            self._create_revision(obj, f"{name}-{generation:05d}", generation)

    def _create_revision(self, svc: dict[str, Any], rev_name: str, generation: int) -> None:
        """configuration.go: one Revision per generation of the template (resources/revision.go)."""
        meta, template = svc["metadata"], svc["spec"]["template"]
        ns = meta["namespace"]
        annotations = dict(template.get("metadata", {}).get("annotations") or {})
        body = {"apiVersion": "serving.knative.dev/v1", "kind": "Revision",
                "metadata": {"name": rev_name, "namespace": ns,
                             "labels": {**(template.get("metadata", {}).get("labels") or {}),
                                        "serving.knative.dev/service": meta["name"],
                                        "serving.knative.dev/configuration": meta["name"],
                                        "serving.knative.dev/configurationGeneration": str(generation)},
                             "annotations": annotations,
                             "ownerReferences": [{"apiVersion": "serving.knative.dev/v1", "kind": "Configuration",
                                                  "name": meta["name"], "controller": True}]},
                "spec": template.get("spec", {})}
        self.kube.put_object(body, plural="revisions")
        mode = self.behaviour.get(meta["name"], self.default)
        now = self.clock.now()
        rev = Revision(rev_name, meta["name"], ns, generation, now, mode, pa_since=now,
                       pa_annotations=self._scaling_annotations(annotations), progress_since=now)
        rev.replicas = self._bounds(rev, body)[2]  # resources/deploy.go: the Deployment starts at initial-scale
        self.revisions[rev_name] = rev
        self.revisions_created[meta["name"]] = self.revisions_created.get(meta["name"], 0) + 1
        self._ensure_route(meta["name"])

    def _delete_service(self, name: str, ns: str) -> None:
        """Owner references: the Configuration, its Revisions and their Deployments go; pods terminate."""
        with self._lock:
            self._templates.pop(name, None)
            now = self.clock.now()
            for rev in [r for r in self.revisions.values() if r.service == name]:
                rev.replicas = 0
                for pod in rev.pods:
                    self._terminate(pod, now)
                self.kube.delete_object(ns, rev.name, plural="revisions")

    def _tick(self) -> None:
        with self._lock:
            now = self.clock.now()
            for rev in list(self.revisions.values()):
                obj = self.kube.get_object(rev.namespace, rev.name, plural="revisions")
                if obj is not None:
                    self._autoscale(rev, obj, now)
                    self._reconcile_pods(rev, obj, now)
                self._advance_pods(rev, obj, now)
                self._publish_pods(rev, obj)
                if obj is not None:
                    self._write_revision_status(rev, obj, now)
                elif not rev.pods:
                    del self.revisions[rev.name]  # collected, and its last pod is gone
                else:
                    rev.replicas = 0
            for service in {r.service for r in self.revisions.values()}:
                self._write_service_status(service)
            for service in [s for s in self._routes if s not in {r.service for r in self.revisions.values()}]:
                server, _ = self._routes.pop(service)
                threading.Thread(target=server.shutdown, daemon=True).start()
            self._changed.notify_all()

    # ---- the PodAutoscaler --------------------------------------------------------------------

    @staticmethod
    def _scaling_annotations(annotations: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in annotations.items() if k.startswith(f"{AUTOSCALING}/")}

    def _bounds(self, rev: Revision, obj: dict[str, Any]) -> tuple[int, int, int, float]:
        """min, max, initial scale and last-pod retention, as the PA sees them (``resources/pa.go``); an unreachable
        Revision has no min, no retention and no initial scale (``pa_lifecycle.go`` ``ScaleBounds``, ``scaler.go``
        ``lastPodRetention`` and ``scale``)."""
        ann = rev.pa_annotations if self.legacy else (obj["metadata"].get("annotations") or {})
        retention_key = f"{AUTOSCALING}/scale-to-zero-pod-retention-period"
        retention = go_duration(ann[retention_key]) if retention_key in ann else 0.0
        bounds = (int(ann.get(f"{AUTOSCALING}/min-scale", "0")), int(ann.get(f"{AUTOSCALING}/max-scale", "0")),
                  int(ann.get(f"{AUTOSCALING}/initial-scale", "1")), retention)
        if self._unreachable(rev):
            return 0, bounds[1], 1, 0.0
        return bounds

    def _routing_state(self, rev: Revision) -> str:
        """The labeler's ``serving.knative.dev/routingState``: active while the route sends it traffic, reserve
        once it no longer does, pending before it ever did (``pkg/reconciler/labeler``)."""
        routed = self._latest_ready(rev.service)
        if routed is rev:
            return "active"
        if routed is not None and routed.generation > rev.generation:
            return "reserve"
        return "pending"

    def _unreachable(self, rev: Revision) -> bool:
        """``resources/pa.go`` ``reachability``: an infrastructure failure (ResourcesAvailable or ContainerHealthy
        False) while it wants pods and has none ready, or a Revision the route no longer uses."""
        ready = sum(1 for p in rev.pods if p.ready and not p.deleting)
        failed = rev.health[0] == "False" or rev.resources_failed
        if failed and rev.replicas > 0 and ready == 0:
            return True
        return self._routing_state(rev) == "reserve"

    def _progress_deadline(self, obj: dict[str, Any]) -> float:
        text = (obj["metadata"].get("annotations") or {}).get("serving.knative.dev/progress-deadline")
        return go_duration(text) if text else self.config.progress_deadline_s

    def _set_pa(self, rev: Revision, status: str, reason: str, now: float) -> None:
        if rev.pa != status:
            rev.pa, rev.pa_since = status, now
        rev.pa_reason = reason

    def _autoscale(self, rev: Revision, obj: dict[str, Any], now: float) -> None:
        """kpa.go ``ReconcileKind`` -> scaler.go ``scale`` + ``handleScaleToZero`` -> ``computeActiveCondition``."""
        min_s, max_s, initial, retention = self._bounds(rev, obj)
        live = [p for p in rev.pods if not p.deleting]
        ready = sum(1 for p in live if p.ready)
        concurrency = rev.waiting + sum(p.in_flight for p in live)
        if concurrency:
            rev.last_traffic = now
        if rev.initialized_at is None and ready >= max(min_s, initial):
            rev.initialized_at = now  # computeActiveCondition: MarkScaleTargetInitialized at minReady (0 at once)
        spec = obj.get("spec", {})
        target = float((obj["metadata"].get("annotations") or {}).get(f"{AUTOSCALING}/target", 0) or 0) \
            or float(spec.get("containerConcurrency") or 0) or 100.0
        window = self.config.stable_window_s
        # autoscaler.go Scale: ceil(stable average / target); the average is above zero while any request was
        # seen within the stable window.
        if concurrency:
            desired = math.ceil(concurrency / target)
        elif rev.last_traffic is not None and now - rev.last_traffic < window:
            desired = 1
        else:
            desired = 0
        initialized = rev.initialized_at is not None
        # scale(): an initial scale above 1 is a lower bound until the target initialized; initial scale 1 is the
        # Deployment's own replicas, kept while the PA is activating (below).
        floor = max(min_s, initial) if initial > 1 and not initialized else min_s
        desired = max(desired, floor)  # applyBounds
        if max_s and desired > max_s:
            desired = max_s
        min_ready = max(min_s, 1) if initialized else max(min_s, initial)  # activeThreshold
        want, apply = desired, True
        if desired == 0:  # handleScaleToZero
            if rev.pa == "Unknown":
                deadline = self._progress_deadline(obj) + ACTIVATION_BUFFER_S
                if now - rev.pa_since > deadline:  # CanFailActivation
                    want = 0
                else:
                    want, apply = -1, False  # scaleUnknown: keep what it has
            elif rev.pa == "True":
                if now - rev.pa_since >= window:  # ActiveFor >= stable window: mark inactive first
                    want, apply = 0, False
                else:
                    want = 1
            else:  # inactive: tbc -1, the activator is in the path: the fast path, once retention has passed
                inactive_for = now - rev.pa_since
                if inactive_for >= max(self.config.scale_to_zero_grace_s, retention):
                    want = 0
                elif retention > 0 and inactive_for < retention:
                    want, apply = 0, False
                elif inactive_for >= PA_REENQUEUE_S:
                    want = 0
                else:
                    want, apply = 0, False
        if apply:
            if want > 0 and rev.replicas == 0:
                rev.progress_since = now  # a scale-up restarts the Deployment's progress clock
            rev.replicas = want
        # computeActiveCondition
        if want == 0 or min_ready == 0:
            timed_out = rev.pa == "Unknown" and min_ready > 0
            self._set_pa(rev, "False", "TimedOut" if timed_out else "NoTraffic", now)
        elif ready < min_ready:
            if want > 0 or rev.pa != "False":
                self._set_pa(rev, "Unknown", "Queued", now)
        elif want > 0 or rev.pa != "False":
            self._set_pa(rev, "True", "", now)

    # ---- the Deployment and its ReplicaSets ----------------------------------------------------

    def _reconcile_pods(self, rev: Revision, obj: dict[str, Any], now: float) -> None:
        """The Deployment at ``rev.replicas``; before v1.21 an annotation change is a rollout
        (maxSurge 1, maxUnavailable 0 for one replica: the new pod first)."""
        if self.legacy:
            template = {k: v for k, v in (obj["metadata"].get("annotations") or {}).items()
                        if k not in EXCLUDED_ANNOTATIONS}
            if rev.pod_annotations is None:
                rev.pod_annotations = template
            elif template != rev.pod_annotations:
                rev.pod_annotations = template
                rev.rollout += 1
        live = [p for p in rev.pods if not p.deleting]
        current = [p for p in live if p.rollout == rev.rollout]
        old = [p for p in live if p.rollout != rev.rollout]
        if old and rev.replicas > 0:
            if len(current) < rev.replicas and len(live) < rev.replicas + 1:
                self._start_pod(rev, now)
            if any(p.ready for p in current):
                self._terminate(old[0], now)
            return
        for p in old:
            self._terminate(p, now)
        for _ in range(rev.replicas - len(current)):
            self._start_pod(rev, now)
        surplus = len(current) - rev.replicas
        if surplus > 0:
            # A ReplicaSet scales down pods that are not ready first, then the newest.
            for pod in sorted(current, key=lambda p: (p.ready, -p.created))[:surplus]:
                self._terminate(pod, now)

    def _start_pod(self, rev: Revision, now: float) -> None:
        pod = Pod(f"{rev.name}-deployment-{next(self._seq):05d}", rev.name, now, rev.mode, rollout=rev.rollout)
        if rev.mode.startswith("unschedulable"):
            pod.scheduled = False
        pod.crashing = rev.mode == "fail"
        rev.pods.append(pod)
        self.pods_started[rev.service] = self.pods_started.get(rev.service, 0) + 1
        threading.Thread(target=self._probe_loop, args=(rev, pod), daemon=True).start()

    def _terminate(self, pod: Pod, now: float) -> None:
        """A deleted pod: out of the endpoints at once, its containers running through queue-proxy's drain."""
        if pod.deleting_since is None:
            pod.deleting_since, pod.deleting_at = now, time.time()
            pod.ready = False

    # ---- the kubelet ------------------------------------------------------------------------------

    def _container_env(self, rev: Revision, obj: dict[str, Any] | None) -> dict[str, str] | str:
        """The user container's environment, Secrets resolved; a string says why it cannot start."""
        container = ((obj or {}).get("spec", {}).get("containers") or [{}])[0]
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            ref = (item.get("valueFrom") or {}).get("secretKeyRef")
            if not ref:
                continue
            secret = self.kube.get_object(rev.namespace, ref["name"], plural="secrets")
            if secret is None:
                if ref.get("optional"):
                    continue
                return f'secret "{ref["name"]}" not found'
            data = (secret.get("data") or {}).get(ref["key"])
            if data is None:
                if ref.get("optional"):
                    continue
                return f"couldn't find key {ref['key']} in Secret {rev.namespace}/{ref['name']}"
            env[item["name"]] = base64.b64decode(data).decode()
        return env

    def _start_container(self, rev: Revision, pod: Pod, obj: dict[str, Any] | None, now: float) -> None:
        env = self._container_env(rev, obj)
        if isinstance(env, str):
            pod.state, pod.reason, pod.message = "waiting", "CreateContainerConfigError", env
            return
        mode, _, arg = pod.mode.partition(":")
        if mode == "process":
            mounts = self._claim_mounts(obj)
            if isinstance(mounts, str):
                pod.state, pod.reason, pod.message = "waiting", "ContainerCreating", mounts
                return
            self._start_process(rev, pod, env, mounts)
        elif mode == "upstream":
            pod.url = arg
        else:
            loaded_at = now + (float(arg or 10) if mode == "slow" else self.pod_start_s)
            try:
                pod.standin = StandInWorker(pod, self.clock, loaded_at, token=env.get("FMA_WORKER_TOKEN"),
                                            port=pod.port or 0)
            except OSError:  # the last container's socket is still closing: the kubelet tries again
                pod.state, pod.reason = "waiting", "ContainerCreating"
                return
            pod.port = pod.standin.port
            pod.url = pod.standin.url
        pod.state, pod.reason, pod.message, pod.started_at, pod.restart_at = "running", "", "", now, None
        pod.ever_started = True
        pod.probe_ok = pod.probe_failed = 0

    def _claim_mounts(self, obj: dict[str, Any] | None) -> dict[str, Path] | str:
        """The container's claim mounts, mountPath -> host folder; a string says why the kubelet cannot mount
        one (the claim has no volume here). The kubelet bind-mounts a bound claim's volume at the mountPath
        (pkg/volume/util/operationexecutor ``MountVolume``), read-only where the mount or the claim says so."""
        spec = (obj or {}).get("spec") or {}
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes") or []
                  if "persistentVolumeClaim" in v}
        container = (spec.get("containers") or [{}])[0]
        out: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            claim = claims.get(mount.get("name"))
            if claim is None:
                continue
            if claim not in self.claims:
                return f'persistentvolumeclaim "{claim}" not found'
            out[mount["mountPath"]] = self.claims[claim]
        return out

    def _start_process(self, rev: Revision, pod: Pod, container_env: dict[str, str],
                       mounts: dict[str, Path] | None = None) -> None:
        """The revision's pod as a local worker process with the container's environment. A process has no
        mount namespace: a path under a claim's mountPath in the environment is pointed at the claim's folder."""
        container_env = dict(container_env)
        for path, host in (mounts or {}).items():
            for key, value in container_env.items():
                if value == path or value.startswith(path.rstrip("/") + "/"):
                    container_env[key] = str(host) + value[len(path.rstrip("/")):]
        env = {**os.environ, **container_env}
        pod.port = pod.port or free_port()
        env.update(PORT=str(pod.port), FMA_HOST="127.0.0.1", K_SERVICE=rev.service, K_REVISION=rev.name)
        if self.cache_dir:
            env["FMA_CACHE_DIR"] = str(self.cache_dir)  # the image's converted model
        # The kubelet bind-mounts a fresh host file at the container's terminationMessagePath
        # (kuberuntime_container.go, startContainer/generateContainerConfig); the worker writes its last words to
        # FMA_TERMINATION_LOG (/dev/termination-log in a pod), pointed here at that host file.
        pod.termination_file = self.workdir / f"{pod.name}.{pod.restarts}.termination-log"
        pod.termination_file.write_text("")
        env["FMA_TERMINATION_LOG"] = str(pod.termination_file)
        pod.proc = start_gunicorn(WORKER_CONFIG, WORKER_APP, env,
                                  self.workdir / f"{pod.name}.{pod.restarts}.log")
        pod.url = f"http://127.0.0.1:{pod.port}"

    def _stop_container(self, pod: Pod) -> None:
        if pod.standin is not None:
            standin, pod.standin = pod.standin, None
            threading.Thread(target=standin.close, daemon=True).start()
        if pod.proc is not None and pod.proc.poll() is None:
            threading.Thread(target=stop_process_group, args=(pod.proc, 10), daemon=True).start()

    def _container_exited(self, pod: Pod, code: int, now: float, policy: str = "File") -> None:
        """restartPolicy Always: the first restart at once, then CrashLoopBackOff (10 s doubling, 5 min cap; a
        container that ran for 10 minutes starts over). ``lastState.terminated``: ``OOMKilled`` for an OOM kill,
        else ``Error``; the message is the termination log (empty here), or the log's tail when the container's
        ``terminationMessagePolicy`` is ``FallbackToLogsOnError`` (``pkg/kubelet/kuberuntime``)."""
        self._stop_container(pod)
        if pod.started_at is not None and now - pod.started_at >= CRASH_BACKOFF_RESET_S:
            pod.backoff = 0.0
        pod.ready = False
        # getTerminationMessage (kuberuntime_container.go): the file's contents (at most 4096 bytes) when there are
        # any; else, with FallbackToLogsOnError and a failed exit, the log's tail.
        written = ""
        if pod.termination_file is not None:
            try:
                written = pod.termination_file.read_bytes()[:4096].decode(errors="replace")
            except OSError:
                written = ""
        message = written or (pod.log_tail if policy == "FallbackToLogsOnError" and code != 0 else "")
        pod.last_exit = (code, "OOMKilled" if code == 137 else "Error" if code else "Completed", message)
        pod.state, pod.restarts = "waiting", pod.restarts + 1
        pod.reason = "CrashLoopBackOff"
        pod.restart_at = now + pod.backoff
        pod.backoff = CRASH_BACKOFF_S if not pod.backoff else min(pod.backoff * 2, CRASH_BACKOFF_MAX_S)
        pod.message = f"back-off {pod.backoff:.0f}s restarting failed container"

    def _advance_pods(self, rev: Revision, obj: dict[str, Any] | None, now: float) -> None:
        mode, _, arg = rev.mode.partition(":")
        container = ((obj or {}).get("spec", {}).get("containers") or [{}])[0]
        policy = container.get("terminationMessagePolicy") or "File"
        grace = float((obj or {}).get("spec", {}).get("timeoutSeconds") or self.config.revision_timeout_seconds)
        for pod in list(rev.pods):
            if pod.deleting:
                # preStop: queue-proxy's drain, 30 s with no new request (drain.go: each arrival resets it); then
                # SIGTERM, and requests still in flight finish within the grace period (timeoutSeconds: deploy.go).
                quiet_since = max(pod.deleting_since, rev.last_request or pod.deleting_since)
                drained = now - quiet_since >= DRAIN_S
                if drained and (pod.in_flight == 0 or now - pod.deleting_since >= grace):
                    self._stop_container(pod)
                    if pod.proc is None or pod.proc.poll() is not None:
                        rev.pods.remove(pod)
                        pod.gone = True
                        self.kube.delete_object(rev.namespace, pod.name, plural="pods")
                continue
            if not pod.scheduled:
                if mode == "unschedulable" and arg and now - pod.created >= float(arg):
                    pod.scheduled = True  # the node pool scaled up
                    pod.created = now
                continue
            if pod.state == "running":
                if pod.proc is not None and pod.proc.poll() is not None:
                    pod.log_tail = _log_tail(self.workdir / f"{pod.name}.{pod.restarts}.log")
                    self._container_exited(pod, pod.proc.returncode, now, policy)
                elif pod.crashing and pod.started_at is not None and now - pod.started_at >= 1.0:
                    pod.log_tail = pod.log_tail or "RuntimeError: model failed to load"
                    self._container_exited(pod, 1, now, policy)
                continue
            if pod.restart_at is None or now >= pod.restart_at:
                self._start_container(rev, pod, obj, now)

    def _probe_loop(self, rev: Revision, pod: Pod) -> None:
        """The readiness probe (queue-proxy runs the user container's httpGet): thresholds as defaulted."""
        with httpx.Client(timeout=1.0) as client:
            while not self._closing and not pod.gone:
                obj = self.kube.get_object(rev.namespace, rev.name, plural="revisions") or {"spec": {}}
                container = (obj["spec"].get("containers") or [{}])[0]
                probe = container.get("readinessProbe") or {}
                path = (probe.get("httpGet") or {}).get("path", "/")
                period = float(probe.get("periodSeconds") or 1)
                url = pod.url if pod.state == "running" and not pod.deleting else None
                ok = False
                if url:
                    try:
                        ok = client.get(f"{url}{path}").status_code == 200
                    except httpx.HTTPError:
                        ok = False
                with self._lock:
                    if pod.state != "running" or pod.deleting:
                        pod.ready = False
                    elif ok:
                        pod.probe_failed, pod.probe_ok = 0, pod.probe_ok + 1
                        if pod.probe_ok >= int(probe.get("successThreshold") or 1) and not pod.ready:
                            pod.ready, pod.ready_at = True, self.clock.now()
                    else:
                        pod.probe_ok, pod.probe_failed = 0, pod.probe_failed + 1
                        if pod.probe_failed >= int(probe.get("failureThreshold") or 3) or pod.ready_at is None:
                            pod.ready = False
                    self._changed.notify_all()
                time.sleep(max(0.02, self.clock.real(period)))

    def _publish_pods(self, rev: Revision, obj: dict[str, Any] | None) -> None:
        """The Pod objects the kubelet would report: labels from the Revision, IP, port, conditions, statuses."""
        container = ((obj or {}).get("spec", {}).get("containers") or [{}])[0]
        for pod in rev.pods:
            port = pod.port or (int(pod.url.rsplit(":", 1)[1]) if pod.url else None) or \
                (container.get("ports") or [{}])[0].get("containerPort", 8080)
            state = (pod.scheduled, pod.ready, pod.state, pod.reason, pod.restarts, port, pod.deleting_since)
            if state == pod.published:
                continue
            first = pod.published is None
            pod.published = state
            conds = [_cond("PodScheduled", "True" if pod.scheduled else "False",
                           None if pod.scheduled else "Unschedulable",
                           None if pod.scheduled else "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
                     _cond("Ready", "True" if pod.ready else "False")]
            user_state: dict[str, Any] = {"running": {}} if pod.state == "running" else \
                {"waiting": {"reason": pod.reason, **({"message": pod.message} if pod.message else {})}}
            # image and imageID are required in a ContainerStatus (core/v1 types.go; typed clients refuse a status
            # without them): the image as written, its ID once pulled ("" while waiting, as the kubelet reports).
            image = container.get("image") or "registry.example/fma-worker:latest"
            pulled = f"{image.split('@')[0]}@sha256:{hashlib.sha256(image.encode()).hexdigest()}" \
                if pod.ever_started else ""
            user = {"name": container.get("name") or "user-container", "ready": pod.ready, "image": image,
                    "imageID": pulled, "restartCount": pod.restarts, "state": user_state, "lastState": {}}
            if pod.last_exit is not None:
                code, reason, message = pod.last_exit
                user["lastState"] = {"terminated": {"exitCode": code, "reason": reason,
                                                    **({"message": message} if message else {})}}
            # Pending until every container has started once (the kubelet's getPhase).
            status: dict[str, Any] = {"phase": "Running" if pod.scheduled and pod.ever_started else "Pending",
                                      "conditions": conds}
            if pod.scheduled:
                status["podIP"] = "127.0.0.1" if pod.url else f"10.244.0.{hash(pod.name) % 200 + 2}"
                queue_image = "gcr.io/knative-releases/knative.dev/serving/cmd/queue"
                status["containerStatuses"] = [
                    user, {"name": "queue-proxy", "ready": pod.ready, "restartCount": 0, "image": queue_image,
                           "imageID": f"{queue_image}@sha256:{hashlib.sha256(queue_image.encode()).hexdigest()}",
                           "state": {"running": {}}, "lastState": {}}]
            body = {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod.name, "namespace": rev.namespace,
                                 "labels": {"serving.knative.dev/revision": rev.name,
                                            "serving.knative.dev/service": rev.service,
                                            "serving.knative.dev/configuration": rev.service,
                                            "app": rev.name},
                                 **({"deletionTimestamp": _rfc3339(pod.deleting_at)} if pod.deleting else {})},
                    "spec": {"containers": [
                        {"name": container.get("name") or "user-container", "ports": [{"containerPort": port}]},
                        {"name": "queue-proxy", "ports": [{"containerPort": 8012}]}]},
                    "status": status}
            if first:
                self.kube.put_object(body, plural="pods")
            else:
                self.kube.update_object(rev.namespace, pod.name, lambda o, b=body: o.update(
                    metadata={**o["metadata"], **b["metadata"]}, spec=b["spec"], status=b["status"]), plural="pods")

    # ---- status -----------------------------------------------------------------------------------

    def _revision_conditions(self, rev: Revision, obj: dict[str, Any], now: float) -> list[dict[str, Any]]:
        live = [p for p in rev.pods if not p.deleting]
        available = [p for p in live if p.ready]
        resources: dict[str, Any] | None = None
        # reconcileDeployment: replicas > 0 and none available - look at the first pod.
        if rev.replicas > 0 and not available and live:
            pod = live[0]
            if not pod.scheduled:
                resources = _cond("ResourcesAvailable", "False", "Unschedulable",
                                  "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
            if pod.last_exit is not None:
                code, _, message = pod.last_exit
                # RevisionContainerExitingMessage; an exit 0 with no message gets a message of its own.
                text = "container exited with no error" if code == 0 and not message else message
                rev.health = ("False", f"ExitCode{code}", f"Container failed with: {text}")
            elif pod.state == "waiting" and now - rev.progress_since > self._progress_deadline(obj):
                resources = _cond("ResourcesAvailable", "False", pod.reason, pod.message)
        if available:
            rev.health = ("True", "", "")  # ReadyReplicas > 0: MarkContainerHealthyTrue
        elif rev.initialized_at is not None and rev.health[0] != "False":
            rev.health = ("True", "", "")  # PropagateAutoscalerStatus: initialized and not unavailable
        health = _cond("ContainerHealthy", rev.health[0], rev.health[1] or None, rev.health[2] or None) \
            if rev.health[0] != "Unknown" else _cond("ContainerHealthy", "Unknown", "Deploying")
        if resources is None:
            if rev.initialized_at is not None:
                resources = _cond("ResourcesAvailable", "True")
            elif rev.pa == "False" and rev.health[0] != "False":
                # PropagateAutoscalerStatus: inactive before the scale target ever initialized.
                resources = _cond("ResourcesAvailable", "False", "ProgressDeadlineExceeded",
                                  "Initial scale was never achieved")
            elif live and now - rev.progress_since > self._progress_deadline(obj):
                resources = _cond("ResourcesAvailable", "False", "ProgressDeadlineExceeded",
                                  f'ReplicaSet "{rev.name}-deployment" has timed out progressing.')
            else:
                resources = _cond("ResourcesAvailable", "Unknown", "Deploying")
        rev.resources_failed = resources["status"] == "False"
        statuses = {resources["status"], health["status"]}
        if "False" in statuses:
            bad = resources if resources["status"] == "False" else health
            ready = _cond("Ready", "False", bad.get("reason"), bad.get("message"))
        elif statuses == {"True"}:
            ready = _cond("Ready", "True")
        else:
            ready = _cond("Ready", "Unknown", "Deploying")
        active = _cond("Active", rev.pa, rev.pa_reason or None)
        if ready["status"] == "True":
            rev.ever_ready = True
        return [ready, resources, health, active]

    def _write_revision_status(self, rev: Revision, obj: dict[str, Any], now: float) -> None:
        conds = self._revision_conditions(rev, obj, now)
        ready_pods = sum(1 for p in rev.pods if p.ready)
        status = {"observedGeneration": obj["metadata"].get("generation", 1), "conditions": conds,
                  "actualReplicas": ready_pods, "desiredReplicas": rev.replicas}
        comparable = {**status, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                               for c in conds]}
        if comparable != rev.status_written:
            rev.status_written = comparable
            self.kube.set_status(rev.namespace, rev.name, status, plural="revisions")

    def _latest_ready(self, service: str) -> Revision | None:
        """configuration.go: the latest revision that became ready (never moves back when it later fails)."""
        revs = sorted(self.service_revisions(service), key=lambda r: r.generation)
        return next((r for r in reversed(revs) if r.ever_ready), None)

    def _write_service_status(self, service: str) -> None:
        """The Service's status: ConfigurationsReady from the latest created Revision
        (``configuration_lifecycle.go``: Unknown with no reason while it is not ready, ``RevisionFailed`` when it
        failed), RoutesReady from the Revision the route sends traffic to (``route_lifecycle.go``:
        ``RevisionMissing`` with the route's own messages), propagated in that order (``service.go``) through
        knative.dev/pkg's condition set, where the last dependent marked False names the Service's Ready."""
        revs = sorted(self.service_revisions(service), key=lambda r: r.generation)
        if not revs:
            return
        ns = revs[0].namespace
        svc = self.kube.get_object(ns, service)
        if svc is None:
            return
        latest = revs[-1]

        def ready_cond(rev: Revision) -> dict[str, Any]:
            status = (self.kube.get_object(ns, rev.name, plural="revisions") or {}).get("status", {})
            return next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})

        latest_ready = self._latest_ready(service)
        lc = ready_cond(latest)
        if lc.get("status") == "True":
            config = ("True", "", "")
        elif lc.get("status") == "False":
            config = ("False", "RevisionFailed", f'Revision "{latest.name}" failed with message: {lc.get("message")}.')
        else:
            config = ("Unknown", "", "")
        if latest_ready is None:  # traffic.go addConfigurationTarget: errUnreadyConfiguration
            routes = ("False", "RevisionMissing", f'Configuration "{service}" does not have any ready Revision.') \
                if config[0] == "False" else \
                ("Unknown", "RevisionMissing", f'Configuration "{service}" is waiting for a Revision to become ready.')
        else:
            target = ready_cond(latest_ready).get("status")
            routes = ("True", "", "") if target == "True" else \
                ("False", "RevisionMissing", f'Revision "{latest_ready.name}" failed to become ready.') \
                if target == "False" else \
                ("Unknown", "RevisionMissing", f'Revision "{latest_ready.name}" is not yet ready.')
        conds = _condition_set("Ready", [("ConfigurationsReady", *config), ("RoutesReady", *routes)])
        url = f"http://{service}.{ns}.svc.cluster.local"
        status: dict[str, Any] = {
            "observedGeneration": svc["metadata"].get("generation", 1), "url": url,
            "address": {"url": self.route_url(service) or url},
            "latestCreatedRevisionName": latest.name,
            "conditions": conds}
        if latest_ready is not None:
            status["latestReadyRevisionName"] = latest_ready.name
            status["traffic"] = [{"revisionName": latest_ready.name, "latestRevision": True, "percent": 100}]
        old = svc.get("status") or {}
        strip = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in old.get("conditions", [])]
        new_strip = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status["conditions"]]
        if {**old, "conditions": strip} != {**status, "conditions": new_strip}:
            self.kube.set_status(ns, service, status)

    # ---- the route: activator and queue-proxy ------------------------------------------------------

    def _ensure_route(self, service: str) -> None:
        if service in self._routes:
            return
        sim = self

        class Route(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a: object) -> None:
                pass

            def do_GET(self) -> None:
                sim._serve(self, service, "GET")

            def do_POST(self) -> None:
                sim._serve(self, service, "POST")

        server = ThreadingHTTPServer(("127.0.0.1", 0), Route)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._routes[service] = (server, f"http://127.0.0.1:{server.server_address[1]}")

    def _serve(self, h: BaseHTTPRequestHandler, service: str, method: str) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        with self._lock:
            rev = self._latest_ready(service)
            if rev is None:  # the ingress has no route programmed for this host yet
                return _answer(h, 404, b"no route for this host\n")
            obj = self.kube.get_object(rev.namespace, rev.name, plural="revisions") or {}
            spec = obj.get("spec", {})
            timeout = float(spec.get("timeoutSeconds") or self.config.revision_timeout_seconds)
            start_timeout = float(spec.get("responseStartTimeoutSeconds") or 0)
            started = self.clock.now()
            pod = self._ready_pod(rev)
            if pod is None:
                if rev.waiting >= ACTIVATOR_CAPACITY:
                    return _answer(h, 503, b"activator overload\n")
                rev.waiting += 1  # the activator buffers it: this is traffic for the KPA
                try:
                    while pod is None:
                        left = started + timeout - self.clock.now()
                        if left <= 0 or self._closing:
                            return _answer(h, 504, b"activator request timeout")
                        self._changed.wait(min(self.clock.real(left), 0.05))
                        pod = self._ready_pod(rev)
                finally:
                    rev.waiting -= 1
            pod.in_flight += 1
            rev.last_request = self.clock.now()
        try:
            self._forward(h, pod, method, body, started, timeout, start_timeout)
        finally:
            with self._lock:
                pod.in_flight -= 1
                rev.last_traffic = self.clock.now()

    @staticmethod
    def _ready_pod(rev: Revision) -> Pod | None:
        ready = [p for p in rev.pods if p.ready and not p.deleting]
        return min(ready, key=lambda p: p.in_flight) if ready else None

    def _forward(self, h: BaseHTTPRequestHandler, pod: Pod, method: str, body: bytes, started: float,
                 timeout: float, start_timeout: float) -> None:
        """The activator's timeout handler (always in the path here), timed from the request's arrival, buffering
        included: ``timeoutSeconds`` in total, ``responseStartTimeoutSeconds`` to the first byte. Past it, before
        the headers a 504; after them the text goes into the body and the response ends normally
        (``pkg/http/handler/timeout.go``, ``timeoutAndWriteError``; ``cmd/activator/main.go``)."""
        left = started + timeout - self.clock.now()
        first = min(left, started + start_timeout - self.clock.now()) if start_timeout else left
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        try:
            with httpx.Client(timeout=httpx.Timeout(self.clock.real(first), connect=5.0)) as client, \
                    client.stream(method, f"{pod.url}{h.path}", content=body, headers=headers) as resp:
                h.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        h.send_header(k, v)
                h.send_header("Transfer-Encoding", "chunked")
                h.end_headers()
                for chunk in resp.iter_raw():
                    if self.clock.now() - started >= timeout:
                        text = b"activator request timeout"  # the headers are gone: the text ends the body
                        h.wfile.write(f"{len(text):x}\r\n".encode() + text + b"\r\n0\r\n\r\n")
                        return
                    if chunk:
                        h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                        h.wfile.flush()
                h.wfile.write(b"0\r\n\r\n")
        except httpx.TimeoutException:
            if self.clock.now() - started >= timeout or start_timeout:
                try:
                    _answer(h, 504, b"activator request timeout")
                except OSError:
                    h.close_connection = True
        except httpx.HTTPError:
            try:
                _answer(h, 502, b"upstream connect error")
            except OSError:
                h.close_connection = True

    # ---- shutting down ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop reconciling, then every pod's container and route."""
        with self._lock:
            self._closing = True
            pods = [p for r in self.revisions.values() for p in r.pods]
            routes = list(self._routes.values())
            self._routes.clear()
            self._changed.notify_all()
        self._thread.join(10)
        for pod in pods:
            pod.gone = True
            if pod.proc is not None:
                stop_process_group(pod.proc, 10)
            if pod.standin is not None:
                pod.standin.close()
        for server, _ in routes:
            server.shutdown()
            server.server_close()
        if self.webhook in self.kube.admission:
            self.kube.admission.remove(self.webhook)


class StandInWorker:
    """A pod's container when no real worker runs: the worker's HTTP surface, minus the model.

    Like the worker (``fma_worker/app.py``): ``/health`` always, ``/loaded``
    once "loaded" (after the pod's start time) awake or asleep, ``/ready`` only
    awake; everything else needs the worker token when the container has one
    (``FMA_WORKER_TOKEN``), else 401; ``/sleep``, ``/wake_up`` and
    ``/is_sleeping`` are the sleep API; a completion while asleep is a 503
    ``worker_sleeping``; completions answer with the pod's name, so tests can
    see where a request went.
    """

    OPEN = ("/health", "/ready", "/loaded", "/metrics", "/openapi.json")

    def __init__(self, pod: Pod, clock: SimClock, loaded_at: float, *, token: str | None = None,
                 port: int = 0) -> None:
        self.pod, self.clock, self.loaded_at, self.token = pod, clock, loaded_at, token
        self.asleep = False
        self.calls: list[str] = []
        self.refused: list[str] = []  # calls answered 401 (no token, or a wrong one)
        self._connections: set[Any] = set()
        worker = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                worker._connections.add(self.connection)

            def finish(self) -> None:
                worker._connections.discard(self.connection)
                super().finish()

            def log_message(self, *_a: object) -> None:
                pass

            def _authorized(self) -> bool:
                path = self.path.split("?")[0]
                if worker.token is None or path in StandInWorker.OPEN:
                    return True
                if self.headers.get("Authorization") == f"Bearer {worker.token}":
                    return True
                worker.refused.append(f"{self.command} {self.path}")
                _answer(self, 401, json.dumps({"error": {
                    "message": "this worker answers only its requester (a valid worker token)",
                    "type": "authentication_error", "code": "invalid_api_key", "param": None}}).encode(),
                    "application/json")
                return False

            def do_GET(self) -> None:
                worker.calls.append(f"GET {self.path}")
                if not self._authorized():
                    return
                path = self.path.split("?")[0]
                loaded = worker.clock.now() >= worker.loaded_at
                if path == "/health":
                    return _answer(self, 200, b'{"status": "ok"}', "application/json")
                if path == "/is_sleeping":
                    return _answer(self, 200, json.dumps({"is_sleeping": worker.asleep}).encode(),
                                   "application/json")
                ok = loaded if path == "/loaded" else loaded and not worker.asleep
                return _answer(self, 200 if ok else 503, b"OK\n" if ok else b'{"status": "loading"}')

            def do_POST(self) -> None:
                worker.calls.append(f"POST {self.path}")
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not self._authorized():
                    return
                path = self.path.split("?")[0]
                if path == "/sleep":
                    worker.asleep = True
                    return _answer(self, 200, b'{"is_sleeping": true}', "application/json")
                if path == "/wake_up":
                    worker.asleep = False
                    return _answer(self, 200, b'{"is_sleeping": false}', "application/json")
                if worker.asleep:
                    return _answer(self, 503, json.dumps({"error": {
                        "message": "model is sleeping; POST /wake_up first", "type": "service_unavailable_error",
                        "code": "worker_sleeping", "param": None}}).encode(), "application/json")
                return _answer(self, 200, json.dumps({"pod": worker.pod.name, "path": self.path}).encode(),
                               "application/json")

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        # A short poll, so a crash frees the port at once (a restarted container binds it again).
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        """The container is gone: no new connection is accepted and the open ones are reset."""
        self.server.shutdown()
        self.server.server_close()
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _answer(h: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str = "text/plain") -> None:
    h.send_response(code)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)
