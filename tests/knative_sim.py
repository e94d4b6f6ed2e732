"""A simulator of Knative Serving's behaviour, over the fake API server.

Everything the requester relies on, each mirroring a file of knative/serving
at ``knative-v1.23.0`` (paths are in that repository):

* **Revisions** - one per template generation, named ``<service>-0000N``
  (``pkg/reconciler/configuration/resources/revision.go``, ``MakeRevision``:
  ``kmeta.ChildName(name, fmt.Sprintf("-%05d", generation))``), carrying the
  template's annotations; a change of the Service's metadata makes none
  (``pkg/reconciler/configuration/configuration.go``). The Service reports
  ``latestCreatedRevisionName``, ``latestReadyRevisionName`` and routes 100 %
  of traffic to the latest ready one; a failed latest revision makes the
  Service ``Ready=False`` with ``RevisionFailed: Revision "x" failed with
  message: ....`` (``pkg/apis/serving/v1/configuration_lifecycle.go``,
  ``MarkLatestCreatedFailed``).
* **Pods per revision, driven by the KPA** - a new revision's Deployment starts
  at ``initial-scale`` (1 unless annotated; 0 only with
  ``allow-zero-initial-scale``: ``pkg/reconciler/revision/resources/deploy.go``,
  ``pkg/reconciler/autoscaling/kpa/resources/decider.go``). Scale bounds are
  read from the **Revision's** annotations every tick (the PodAutoscaler is
  rebuilt from them: ``pkg/reconciler/revision/reconcile_resources.go``,
  ``syncAnnotationsForKPA``; ``resources/pa.go``). Without traffic a revision
  keeps its pods for the stable window (60 s) and then
  ``scale-to-zero-pod-retention-period``; with the activator always in the
  path (``target-burst-capacity: -1``) it then scales to zero at once
  (``pkg/reconciler/autoscaling/kpa/scaler.go``, ``handleScaleToZero``). Traffic
  is requests through the simulated route and activator.
* **Readiness gating** - the route and the activator forward only to pods
  whose readiness probe passes; a process pod is probed on ``/ready`` every
  period, so a worker that stops being ready stops getting requests.
* **The activator** buffers requests while a revision has no ready pod (up to
  10,000: ``pkg/activator/net/throttler.go``) and answers 504 ``activator
  request timeout`` past the revision's ``timeoutSeconds``
  (``cmd/activator/main.go``); **queue-proxy** caps every request at
  ``timeoutSeconds`` in total - mid-stream, the connection is cut - and
  answers 504 when no response starts within ``responseStartTimeoutSeconds``
  (``pkg/queue/sharedmain/handlers.go``, ``pkg/http/handler/timeout.go``).
* **Failures** - a pod that cannot be scheduled marks the revision
  ``ResourcesAvailable=False`` with the pod's reason (``Unschedulable``) at once
  and back once it schedules (``reconcile_resources.go``,
  ``reconcileDeployment``); a container that exits marks it
  ``ContainerHealthy=False`` (``ExitCode1``, ``Container failed with: ...``,
  ``revision_lifecycle.go``); no ready pod within the progress deadline marks
  it ``ResourcesAvailable=False`` ``ProgressDeadlineExceeded``.
* **The webhook** - ``knative_webhook.KnativeWebhook``, registered as the fake
  API server's admission hook.

Its clock can run faster than wall time (``speed``), so stable windows and
timeouts pass quickly in tests. Pods are stand-ins (``StandInWorker``: the
worker's HTTP surface with the sleep API, ready after a delay), real local
worker processes (``process``), or a server the test runs (``upstream:URL``);
each is published as a Pod object (labels, IP, port, conditions) and probed
on its readiness path.
What is *not* simulated: the activator's load balancing and panic mode,
multiple containers, DomainMappings, tags and traffic splits, TLS, and the
defaulted fields a real API server would store.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from knative_webhook import AUTOSCALING, ClusterConfig, KnativeWebhook, go_duration
from kube_fake import FakeKube

from fma_common.procs import WORKER_APP, WORKER_CONFIG, free_port, start_gunicorn, stop_process_group

STABLE_WINDOW_S = 60.0  # config-autoscaler stable-window (pkg/autoscaler/config/config.go)
ACTIVATOR_CAPACITY = 10_000
MANAGED = "app.kubernetes.io/managed-by"


def _cond(kind: str, status: str, reason: str | None = None, message: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": kind, "status": status,
                           "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if reason:
        out["reason"] = reason
    if message:
        out["message"] = message
    return out


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
    name: str
    revision: str
    created: float
    mode: str
    scheduled: bool = True
    ready: bool = False
    exited: bool = False
    ready_at: float | None = None
    proc: subprocess.Popen | None = None
    url: str | None = None  # a process pod's address
    in_flight: int = 0
    deleting: bool = False
    published: tuple | None = None  # what the Pod object last said
    standin: StandInWorker | None = None


@dataclass(eq=False)
class Revision:
    name: str
    service: str
    namespace: str
    generation: int
    created: float
    mode: str
    pods: list[Pod] = field(default_factory=list)
    initialized_at: float | None = None  # the first time a pod was ready
    last_traffic: float | None = None
    waiting: int = 0  # requests buffered in the activator
    failed: tuple[str, str] | None = None  # ContainerHealthy False (reason, message)
    status_written: dict[str, Any] | None = None


class SimulatedKnative:
    """Reconciles Services into Revisions and pods, scales them, and serves their routes."""

    def __init__(self, kube: FakeKube, workdir: Path, cache_dir: Path | None = None, default: str = "ready", *,
                 speed: float = 1.0, config: ClusterConfig | None = None, pod_start_s: float = 2.0,
                 webhook: bool = True, tick_s: float = 0.02) -> None:
        self.kube = kube
        self.workdir = workdir
        self.cache_dir = cache_dir
        self.default = default
        self.clock = SimClock(speed)
        self.config = config or ClusterConfig()
        self.pod_start_s = pod_start_s
        self.tick_s = tick_s
        # Service name -> ready | process | fail | never | unschedulable | unschedulable:S | slow:S
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
        kube.listeners.append(lambda kind, plural, obj: self._events.put((kind, plural, obj)))
        self._thread = threading.Thread(target=self._loop, name="knative-sim", daemon=True)
        self._thread.start()

    # ---- for tests --------------------------------------------------------------------------

    def service_revisions(self, service: str) -> list[Revision]:
        with self._lock:
            return [r for r in self.revisions.values() if r.service == service]

    def live_pods(self, service: str) -> list[Pod]:
        with self._lock:
            return [p for r in self.service_revisions(service) for p in r.pods if not p.deleting]

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
            generation = meta["generation"]
            rev_name = f"{name}-{generation:05d}"
            if rev_name in self.revisions:
                return  # a status or metadata write: no new revision
            self._create_revision(obj, rev_name, generation)

    def _create_revision(self, svc: dict[str, Any], rev_name: str, generation: int) -> None:
        """configuration.go: one Revision per generation of the template (resources/revision.go)."""
        meta, template = svc["metadata"], svc["spec"]["template"]
        ns = meta["namespace"]
        body = {"apiVersion": "serving.knative.dev/v1", "kind": "Revision",
                "metadata": {"name": rev_name, "namespace": ns,
                             "labels": {**(template.get("metadata", {}).get("labels") or {}),
                                        "serving.knative.dev/service": meta["name"],
                                        "serving.knative.dev/configuration": meta["name"],
                                        "serving.knative.dev/configurationGeneration": str(generation)},
                             "annotations": dict(template.get("metadata", {}).get("annotations") or {}),
                             "ownerReferences": [{"apiVersion": "serving.knative.dev/v1", "kind": "Configuration",
                                                  "name": meta["name"], "controller": True}]},
                "spec": template.get("spec", {})}
        self.kube.put_object(body, plural="revisions")
        mode = self.behaviour.get(meta["name"], self.default)
        self.revisions[rev_name] = Revision(rev_name, meta["name"], ns, generation, self.clock.now(), mode)
        self.revisions_created[meta["name"]] = self.revisions_created.get(meta["name"], 0) + 1
        self._ensure_route(meta["name"])

    def _delete_service(self, name: str, ns: str) -> None:
        with self._lock:
            doomed = [r for r in self.revisions.values() if r.service == name]
            for rev in doomed:
                for pod in rev.pods:
                    self._kill(pod)
                    self.kube.delete_object(ns, pod.name, plural="pods")
                del self.revisions[rev.name]
                self.kube.delete_object(ns, rev.name, plural="revisions")  # owner references: collected
            route = self._routes.pop(name, None)
        if route:
            threading.Thread(target=route[0].shutdown, daemon=True).start()

    def _tick(self) -> None:
        with self._lock:
            now = self.clock.now()
            for rev in list(self.revisions.values()):
                obj = self.kube.get_object(rev.namespace, rev.name, plural="revisions")
                if obj is None:
                    continue
                self._scale(rev, obj, now)
                self._advance_pods(rev, now)
                self._publish_pods(rev, obj)
                self._write_revision_status(rev, obj, now)
            for service in {r.service for r in self.revisions.values()}:
                self._write_service_status(service)
            self._changed.notify_all()

    # ---- the KPA ---------------------------------------------------------------------------------

    def _bounds(self, obj: dict[str, Any]) -> tuple[int, int, int, float]:
        ann = obj["metadata"].get("annotations") or {}
        initial = int(ann.get(f"{AUTOSCALING}/initial-scale", "1"))
        retention = go_duration(ann[f"{AUTOSCALING}/scale-to-zero-pod-retention-period"]) \
            if f"{AUTOSCALING}/scale-to-zero-pod-retention-period" in ann else 0.0
        return (int(ann.get(f"{AUTOSCALING}/min-scale", "0")), int(ann.get(f"{AUTOSCALING}/max-scale", "0")),
                initial, retention)

    def _scale(self, rev: Revision, obj: dict[str, Any], now: float) -> None:
        """kpa/scaler.go ``scale`` + ``handleScaleToZero``, with the activator always in the path."""
        min_s, max_s, initial, retention = self._bounds(obj)
        concurrency = rev.waiting + sum(p.in_flight for p in rev.pods if not p.deleting)
        if concurrency:
            rev.last_traffic = now
        spec = obj.get("spec", {})
        target = float((obj["metadata"].get("annotations") or {}).get(f"{AUTOSCALING}/target", 0) or 0) \
            or float(spec.get("containerConcurrency") or 0) or 100.0
        if rev.failed is not None:
            want = 0
        elif rev.initialized_at is None:
            # deploy.go: the Deployment starts at initial-scale and keeps it until a pod was ready.
            want = max(initial, min_s, math.ceil(concurrency / target))
            deadline = self._progress_deadline(obj)
            if now - rev.created > deadline:
                want = 0  # kpa: activation failed after the progress deadline (+ a buffer)
        else:
            active_since = max(rev.last_traffic or 0.0, rev.initialized_at)
            if concurrency:
                want = math.ceil(concurrency / target)
            elif now < active_since + STABLE_WINDOW_S + retention:
                want = 1  # inside the stable window, then the last pod's retention
            else:
                want = 0
            want = max(want, min_s)
        if max_s:
            want = min(want, max_s)
        live = [p for p in rev.pods if not p.deleting]
        for _ in range(want - len(live)):
            self._start_pod(rev, now)
        surplus = len(live) - want
        if surplus > 0:
            # A ReplicaSet scales down pods that are not ready first, then the newest.
            for pod in sorted(live, key=lambda p: (p.ready, -p.created))[:surplus]:
                self._kill(pod)

    def _progress_deadline(self, obj: dict[str, Any]) -> float:
        ann = obj["metadata"].get("annotations") or {}
        text = ann.get("serving.knative.dev/progress-deadline")
        return go_duration(text) if text else 600.0  # config-deployment progress-deadline

    # ---- pods ------------------------------------------------------------------------------------

    def _start_pod(self, rev: Revision, now: float) -> None:
        pod = Pod(f"{rev.name}-deployment-{next(self._seq):05d}", rev.name, now, rev.mode)
        if rev.mode.startswith("unschedulable"):
            pod.scheduled = False
        rev.pods.append(pod)
        self.pods_started[rev.service] = self.pods_started.get(rev.service, 0) + 1
        if rev.mode == "process":
            threading.Thread(target=self._run_process_pod, args=(rev, pod), daemon=True).start()
        elif rev.mode.startswith("upstream:"):  # a stand-in server the test runs, probed like a worker
            pod.url = rev.mode.split(":", 1)[1]
            threading.Thread(target=self._probe, args=(rev, pod), daemon=True).start()

    def _advance_pods(self, rev: Revision, now: float) -> None:
        mode, _, arg = rev.mode.partition(":")
        for pod in list(rev.pods):
            if pod.deleting:
                if pod.proc is None or pod.proc.poll() is not None:
                    rev.pods.remove(pod)
                    self.kube.delete_object(rev.namespace, pod.name, plural="pods")
                continue
            if not pod.scheduled:
                if mode == "unschedulable" and arg and now - pod.created >= float(arg):
                    pod.scheduled = True  # the node pool scaled up
                    pod.created = now
                continue
            if mode == "fail" and now - pod.created >= 1.0:
                pod.exited = True
                rev.failed = ("ExitCode1", "Container failed with: model failed to load (exit code 1)")
            elif mode in ("ready", "unschedulable", "slow") and pod.standin is None:
                loaded_at = now + (float(arg or 10) if mode == "slow" else self.pod_start_s)
                pod.standin = StandInWorker(pod, self.clock, loaded_at)
                pod.url = pod.standin.url
                threading.Thread(target=self._probe, args=(rev, pod), daemon=True).start()

    def _publish_pods(self, rev: Revision, obj: dict[str, Any]) -> None:
        """The Pod objects the kubelet would report: labels from the Revision, IP, port, conditions."""
        container = (obj.get("spec", {}).get("containers") or [{}])[0]
        for pod in rev.pods:
            if pod.deleting and (pod.proc is None or pod.proc.poll() is not None):
                continue
            port = int(pod.url.rsplit(":", 1)[1]) if pod.url else \
                (container.get("ports") or [{}])[0].get("containerPort", 8080)
            state = (pod.scheduled, pod.ready, pod.exited, port, pod.deleting)
            if state == pod.published:
                continue
            first = pod.published is None
            pod.published = state
            conds = [_cond("PodScheduled", "True" if pod.scheduled else "False",
                           None if pod.scheduled else "Unschedulable",
                           None if pod.scheduled else "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
                     _cond("Ready", "True" if pod.ready else "False")]
            status = {"phase": "Running" if pod.scheduled and not pod.exited else "Pending",
                      "conditions": conds}
            if pod.scheduled:
                status["podIP"] = "127.0.0.1" if pod.url else f"10.244.0.{hash(pod.name) % 200 + 2}"
            body = {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod.name, "namespace": rev.namespace,
                                 "labels": {"serving.knative.dev/revision": rev.name,
                                            "serving.knative.dev/service": rev.service,
                                            "serving.knative.dev/configuration": rev.service,
                                            "app": rev.name},
                                 **({"deletionTimestamp": "now"} if pod.deleting else {})},
                    "spec": {"containers": [
                        {"name": container.get("name") or "user-container", "ports": [{"containerPort": port}]},
                        {"name": "queue-proxy", "ports": [{"containerPort": 8012}]}]},
                    "status": status}
            if first:
                self.kube.put_object(body, plural="pods")
            else:
                self.kube.update_object(rev.namespace, pod.name, lambda o, b=body: o.update(
                    metadata={**o["metadata"], **b["metadata"]}, spec=b["spec"], status=b["status"]), plural="pods")

    def _mark_ready(self, rev: Revision, pod: Pod, now: float) -> None:
        if not pod.ready:
            pod.ready, pod.ready_at = True, now
        if rev.initialized_at is None:
            rev.initialized_at = now

    def _run_process_pod(self, rev: Revision, pod: Pod) -> None:
        """A revision's pod as a local worker process with the container's environment."""
        obj = self.kube.get_object(rev.namespace, rev.name, plural="revisions")
        if obj is None:
            return
        container = obj["spec"]["containers"][0]
        env = {**os.environ, **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e}}
        port = free_port()
        env.update(PORT=str(port), FMA_HOST="127.0.0.1", K_SERVICE=rev.service, K_REVISION=rev.name)
        if self.cache_dir:
            env["FMA_CACHE_DIR"] = str(self.cache_dir)  # the image's converted model
        with self._lock:
            if self._closing or pod.deleting:
                return
            pod.proc = start_gunicorn(WORKER_CONFIG, WORKER_APP, env, self.workdir / f"{pod.name}.log")
            pod.url = f"http://127.0.0.1:{port}"
        self._probe(rev, pod)

    def _probe(self, rev: Revision, pod: Pod) -> None:
        """kubelet's readiness probe: the container's httpGet path, every period; only ready pods get traffic."""
        obj = self.kube.get_object(rev.namespace, rev.name, plural="revisions") or {"spec": {"containers": [{}]}}
        container = obj["spec"]["containers"][0]
        probe = container.get("readinessProbe", {}).get("httpGet", {}).get("path", "/")
        period = float(container.get("readinessProbe", {}).get("periodSeconds") or 1)
        with httpx.Client(timeout=1.0) as client:
            while not self._closing and not pod.deleting:
                if pod.proc is not None and pod.proc.poll() is not None:
                    with self._lock:
                        pod.exited = True
                        pod.ready = False
                        if rev.initialized_at is None:
                            rev.failed = ("ExitCode1", f"Container failed with: exit code {pod.proc.returncode}")
                    return
                try:
                    ok = client.get(f"{pod.url}{probe}").status_code == 200
                except httpx.HTTPError:
                    ok = False
                with self._lock:
                    if ok:
                        self._mark_ready(rev, pod, self.clock.now())
                    else:
                        pod.ready = False
                    self._changed.notify_all()
                time.sleep(max(0.05, self.clock.real(period)))

    def _kill(self, pod: Pod) -> None:
        pod.deleting = True
        pod.ready = False
        if pod.standin is not None:
            threading.Thread(target=pod.standin.close, daemon=True).start()
        if pod.proc is not None and pod.proc.poll() is None:
            threading.Thread(target=stop_process_group, args=(pod.proc, 10), daemon=True).start()

    # ---- status -----------------------------------------------------------------------------------

    def _revision_conditions(self, rev: Revision, now: float) -> list[dict[str, Any]]:
        obj = self.kube.get_object(rev.namespace, rev.name, plural="revisions") or {}
        if rev.failed is not None:
            resources = _cond("ResourcesAvailable", "Unknown", "Deploying")
            health = _cond("ContainerHealthy", "False", *rev.failed)
        else:
            health = _cond("ContainerHealthy", "True" if rev.initialized_at is not None else "Unknown",
                           None if rev.initialized_at is not None else "Deploying")
            wants = [p for p in rev.pods if not p.deleting]
            unscheduled = [p for p in wants if not p.scheduled]
            available = [p for p in wants if p.ready]
            if wants and not available and unscheduled:
                # reconcileDeployment: a PodScheduled=False pod marks the revision at once.
                resources = _cond("ResourcesAvailable", "False", "Unschedulable",
                                  "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
            elif rev.initialized_at is None and now - rev.created > self._progress_deadline(obj):
                resources = _cond("ResourcesAvailable", "False", "ProgressDeadlineExceeded",
                                  "Initial scale was never achieved")
            elif rev.initialized_at is not None:
                resources = _cond("ResourcesAvailable", "True")
            else:
                resources = _cond("ResourcesAvailable", "Unknown", "Deploying")
        statuses = {resources["status"], health["status"]}
        if "False" in statuses:
            bad = resources if resources["status"] == "False" else health
            ready = _cond("Ready", "False", bad.get("reason"), bad.get("message"))
        elif statuses == {"True"}:
            ready = _cond("Ready", "True")
        else:
            ready = _cond("Ready", "Unknown", "Deploying")
        active = _cond("Active", "True" if any(p.ready for p in rev.pods) else "False",
                       None if any(p.ready for p in rev.pods) else "NoTraffic")
        return [ready, resources, health, active]

    def _write_revision_status(self, rev: Revision, obj: dict[str, Any], now: float) -> None:
        conds = self._revision_conditions(rev, now)
        ready_pods = sum(1 for p in rev.pods if p.ready)
        status = {"observedGeneration": obj["metadata"].get("generation", 1), "conditions": conds,
                  "actualReplicas": ready_pods, "desiredReplicas": len([p for p in rev.pods if not p.deleting])}
        comparable = {**status, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                               for c in conds]}
        if comparable != rev.status_written:
            rev.status_written = comparable
            self.kube.set_status(rev.namespace, rev.name, status, plural="revisions")

    def _write_service_status(self, service: str) -> None:
        revs = sorted(self.service_revisions(service), key=lambda r: r.generation)
        if not revs:
            return
        ns = revs[0].namespace
        svc = self.kube.get_object(ns, service)
        if svc is None:
            return
        latest = revs[-1]
        ready_of = {r.name: (self.kube.get_object(ns, r.name, plural="revisions") or {}).get("status", {})
                    for r in revs}

        def ready_cond(name: str) -> dict[str, Any]:
            return next((c for c in ready_of[name].get("conditions", []) if c["type"] == "Ready"), {})

        latest_ready = next((r.name for r in reversed(revs) if ready_cond(r.name).get("status") == "True"), None)
        lc = ready_cond(latest.name)
        if lc.get("status") == "True":
            config = _cond("ConfigurationsReady", "True")
        elif lc.get("status") == "False":
            config = _cond("ConfigurationsReady", "False", "RevisionFailed",
                           f'Revision "{latest.name}" failed with message: {lc.get("message")}.')
        else:
            config = _cond("ConfigurationsReady", "Unknown", "RevisionMissing",
                           f'Configuration "{service}" is waiting for a Revision to become ready.')
        routes = _cond("RoutesReady", "True") if latest_ready else \
            _cond("RoutesReady", "Unknown", "RevisionMissing", f'Configuration "{service}" does not have any ready '
                  f"Revision.")
        if config["status"] == "True" and routes["status"] == "True":
            ready = _cond("Ready", "True")
        elif config["status"] == "False":
            ready = _cond("Ready", "False", config["reason"], config["message"])
        else:
            ready = _cond("Ready", "Unknown", config.get("reason") or routes.get("reason"),
                          config.get("message") or routes.get("message"))
        url = f"http://{service}.{ns}.svc.cluster.local"
        status: dict[str, Any] = {
            "observedGeneration": latest.generation, "url": url,
            "address": {"url": self.route_url(service) or url},
            "latestCreatedRevisionName": latest.name,
            "conditions": [ready, config, routes]}
        if latest_ready:
            status["latestReadyRevisionName"] = latest_ready
            status["traffic"] = [{"revisionName": latest_ready, "latestRevision": True, "percent": 100}]
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

    def _routed_revision(self, service: str) -> Revision | None:
        svc = self.kube.get_object(next(iter(r.namespace for r in self.service_revisions(service)), "default"),
                                   service) or {}
        name = (svc.get("status") or {}).get("latestReadyRevisionName")
        return self.revisions.get(name) if name else None

    def _serve(self, h: BaseHTTPRequestHandler, service: str, method: str) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        with self._lock:
            rev = self._routed_revision(service)
            if rev is None:
                return _answer(h, 503, b"no ready revision for this route\n")
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
        try:
            self._forward(h, pod, method, body, started, timeout, start_timeout)
        finally:
            with self._lock:
                pod.in_flight -= 1
                rev.last_traffic = self.clock.now()

    def _ready_pod(self, rev: Revision) -> Pod | None:
        ready = [p for p in rev.pods if p.ready and not p.deleting]
        return min(ready, key=lambda p: p.in_flight) if ready else None

    def _forward(self, h: BaseHTTPRequestHandler, pod: Pod, method: str, body: bytes, started: float,
                 timeout: float, start_timeout: float) -> None:
        """queue-proxy: the request's total time is capped at timeoutSeconds, its start at responseStart."""
        left = started + timeout - self.clock.now()
        first = min(left, start_timeout) if start_timeout else left
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
                        h.close_connection = True  # timeout.go: headers already sent, so the stream is cut
                        return
                    if chunk:
                        h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                        h.wfile.flush()
                h.wfile.write(b"0\r\n\r\n")
        except httpx.TimeoutException:
            if self.clock.now() - started >= timeout or start_timeout:
                try:
                    _answer(h, 504, b"request timeout")
                except OSError:
                    h.close_connection = True
        except httpx.HTTPError:
            try:
                _answer(h, 502, b"upstream connect error")
            except OSError:
                h.close_connection = True

    # ---- shutting down ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop reconciling, then every pod process and route."""
        with self._lock:
            self._closing = True
            pods = [p for r in self.revisions.values() for p in r.pods]
            routes = list(self._routes.values())
            self._routes.clear()
            self._changed.notify_all()
        self._thread.join(10)
        for pod in pods:
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

    ``/ready`` is 200 once "loaded" (after the pod's start time) and awake,
    503 while asleep, like the worker; ``/sleep`` and ``/wake_up`` flip it;
    completions answer with the pod's name, so tests can see where a request
    went.
    """

    def __init__(self, pod: Pod, clock: SimClock, loaded_at: float) -> None:
        self.pod, self.clock, self.loaded_at = pod, clock, loaded_at
        self.asleep = False
        self.calls: list[str] = []
        worker = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a: object) -> None:
                pass

            def do_GET(self) -> None:
                worker.calls.append(f"GET {self.path}")
                path = self.path.split("?")[0]
                if path == "/health":
                    return _answer(self, 200, b'{"status": "ok"}', "application/json")
                loaded = worker.clock.now() >= worker.loaded_at
                ok = loaded and not worker.asleep
                return _answer(self, 200 if ok else 503, b"OK\n" if ok else b'{"status": "loading"}')

            def do_POST(self) -> None:
                worker.calls.append(f"POST {self.path}")
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                if path == "/sleep":
                    worker.asleep = True
                    return _answer(self, 200, b'{"is_sleeping": true}', "application/json")
                if path == "/wake_up":
                    worker.asleep = False
                    return _answer(self, 200, b'{"is_sleeping": false}', "application/json")
                if worker.asleep:
                    return _answer(self, 503, json.dumps({"error": {"message": "sleeping", "type": "x",
                                                                    "code": "worker_sleeping", "param": None}})
                                   .encode(), "application/json")
                return _answer(self, 200, json.dumps({"pod": worker.pod.name, "path": self.path}).encode(),
                               "application/json")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _answer(h: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str = "text/plain") -> None:
    h.send_response(code)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)
