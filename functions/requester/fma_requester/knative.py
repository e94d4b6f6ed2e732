"""KnativeActuator: one scale-to-zero Knative Service per model, through the Kubernetes API.

Concurrency model: like the local actuator, per-model state lives in slots
guarded by one condition variable; ``ensure_ready`` makes the start-or-join
decision under it (single flight) and an activation thread does the API
work outside it. A background watch on the managed label selector keeps the
slots in step with the cluster (a worker Service deleted or failed behind our
back is noticed at once); it re-lists on 410 Gone.

Kubernetes API use (``serving.knative.dev/v1`` ``services`` in our namespace):

* create-or-adopt: ``create``; on 409, ``get`` - a Service not labelled
  ``app.kubernetes.io/managed-by=fma-requester`` (or serving another model)
  is never touched; ours is adopted with a merge patch of labels, annotations,
  owner reference and spec;
* readiness: a watch (``fieldSelector=metadata.name=...`` from the object's
  resourceVersion, not a sleep loop) until ``Ready=True`` with
  ``observedGeneration >= generation``; ``Ready=False`` at that generation
  fails at once with Knative's reason and message (``RevisionFailed``,
  ``ProgressDeadlineExceeded``, an unschedulable GPU ...); the deadline
  reports the last condition seen;
* every call keeps ``ApiException.status``: 403 becomes an error naming the
  missing RBAC verb, 5xx/429 and transport errors are retried with bounded
  backoff, anything else is reported as it is.

Requests then go to ``status.address.url`` (cluster-local); Knative's
activator buffers them while a pod scales up from zero.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from fma_common.errors import ApiError, InternalError, WorkerFailed, WorkerNotReady
from fma_common.settings import SettingsError, env_choice, env_int

from .actuator import Actuation, WorkerStatus
from .gpus import gpu_uuids
from .knative_spec import (
    ANNOTATION_MODEL,
    GROUP,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    MANAGED_SELECTOR,
    PLURAL,
    VERSION,
    WorkerTemplate,
    render_worker_service,
    worker_service_name,
)
from .metrics import RequesterMetrics
from .policy import backoff_delay
from .registry import ModelRegistry, ModelSpec
from .slots import Slot, SlotActuator

log = logging.getLogger("fma.requester.knative")

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

KNATIVE_ENV: dict[str, tuple[str, str]] = {
    "FMA_NAMESPACE": ("the pod's namespace, else `default`", "namespace of the requester and its worker Services"),
    "FMA_WORKER_IMAGE": ("ghcr.io/llm-d-incubation/fma-worker:latest", "worker container image"),
    "FMA_WORKER_TEMPLATE": ("unset", "YAML file with worker template defaults (image, cpu, memory, timeouts, env)"),
    "FMA_OWNER_SERVICE": ("fma-requester", "Knative Service that owns the workers (garbage collection); empty: none"),
    "FMA_RELEASE_POLICY": ("scale-to-zero", "`scale-to-zero` (keep the Service, no pods) or `delete` on release"),
    "FMA_KUBE_RETRIES": ("4", "attempts for an API call that fails with 5xx, 429 or a transport error"),
    "NODE_NAME": ("unset", "the requester's node, for `gpu_binding: shared` (downward API)"),
}


class KnativeError(ApiError):
    status = 503
    type = "service_unavailable_error"
    code = "knative_error"


@dataclass(frozen=True)
class KnativeSettings:
    namespace: str
    template: WorkerTemplate
    owner_service: str | None
    release_policy: str
    retries: int
    node_name: str | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KnativeSettings:
        env = os.environ if environ is None else environ
        namespace = env.get("FMA_NAMESPACE") or (
            SA_NAMESPACE_FILE.read_text().strip() if SA_NAMESPACE_FILE.is_file() else "default")
        fields_: dict[str, Any] = {}
        template_file = env.get("FMA_WORKER_TEMPLATE")
        if template_file:
            try:
                data = yaml.safe_load(Path(template_file).read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise SettingsError(f"FMA_WORKER_TEMPLATE: cannot read {template_file}: {exc}") from None
            allowed = set(WorkerTemplate.__dataclass_fields__) - {"namespace"}
            unknown = set(data) - allowed
            if unknown:
                raise SettingsError(f"FMA_WORKER_TEMPLATE: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
            fields_.update(data)
        if env.get("FMA_WORKER_IMAGE"):
            fields_["image"] = env["FMA_WORKER_IMAGE"]
        owner = env.get("FMA_OWNER_SERVICE", "fma-requester")  # set but empty: no owner reference
        return cls(
            namespace=namespace,
            template=WorkerTemplate(namespace=namespace, **fields_),
            owner_service=owner or None,
            release_policy=env_choice(env, "FMA_RELEASE_POLICY", "scale-to-zero", ("scale-to-zero", "delete")),
            retries=env_int(env, "FMA_KUBE_RETRIES", 4, minimum=1, maximum=20),
            node_name=env.get("NODE_NAME") or None,
        )


def load_api() -> Any:
    """The CustomObjectsApi: in-cluster config first, kubeconfig as the fallback."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


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


@dataclass
class _Slot(Slot):
    name: str = ""  # the worker Service
    started: float = 0.0
    last_condition: str = "not created yet"


class KnativeActuator(SlotActuator):
    backend = "knative"

    def __init__(self, registry: ModelRegistry, metrics: RequesterMetrics, kn: KnativeSettings, *,
                 api: Any = None, emit: Callable[[str, dict[str, Any]], None] | None = None,
                 backoff_base_s: float = 2.0, backoff_max_s: float = 60.0) -> None:
        super().__init__(registry, metrics,
                         {s.name: _Slot(s, name=worker_service_name(s.name)) for s in registry}, emit=emit)
        self.kn = kn
        self.api = api if api is not None else load_api()
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._by_service = {slot.name: slot for slot in self._slots.values()}  # type: ignore[attr-defined]
        self._owner: dict[str, Any] | None = None

    # ---- API calls ---------------------------------------------------------------

    def _call(self, verb: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One API call with RBAC errors named and transient failures retried."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError as TransportError

        kwargs.setdefault("_request_timeout", 30)  # a hung API server is a transient failure, not a hang
        delay = 0.25
        for attempt in range(1, self.kn.retries + 1):
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                if exc.status == 403:
                    raise KnativeError(
                        f"RBAC: the requester's ServiceAccount may not {verb} services.serving.knative.dev in "
                        f"namespace {self.kn.namespace} (403 Forbidden); grant the verb {verb!r} in the "
                        f"fma-requester Role", code="forbidden") from None
                if (exc.status or 0) >= 500 or exc.status == 429:
                    if attempt < self.kn.retries:
                        log.warning("kube %s failed with %s (attempt %d); retrying in %.2f s", verb, exc.status,
                                    attempt, delay)
                        time.sleep(delay)
                        delay = min(delay * 2, 5.0)
                        continue
                raise
            except TransportError as exc:
                if attempt < self.kn.retries:
                    log.warning("kube %s transport error (attempt %d): %s", verb, attempt, exc)
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                raise KnativeError(f"the Kubernetes API is unreachable: {exc}") from None
        raise InternalError("unreachable")  # the loop always returns or raises

    def _get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._call("get", self.api.get_namespaced_custom_object, GROUP, VERSION, self.kn.namespace,
                              PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def owner_reference(self) -> dict[str, Any] | None:
        """The requester's own Service as owner, so deleting it collects the workers."""
        if self._owner is not None or not self.kn.owner_service:
            return self._owner
        obj = self._get(self.kn.owner_service)
        if obj is None:
            log.warning("owner Service %s not found; workers get no ownerReference", self.kn.owner_service)
            return None
        self._owner = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Service", "name": obj["metadata"]["name"],
                       "uid": obj["metadata"]["uid"]}
        return self._owner

    def manifest(self, spec: ModelSpec) -> dict[str, Any]:
        shared = spec.knative.gpu_binding == "shared"
        return render_worker_service(spec, self.kn.template, owner=self.owner_reference(),
                                     gpu_uuids=gpu_uuids() if shared else None,
                                     node_name=self.kn.node_name if shared else None)

    def _create_or_adopt(self, spec: ModelSpec) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        body = self.manifest(spec)
        name = body["metadata"]["name"]
        try:
            return self._call("create", self.api.create_namespaced_custom_object, GROUP, VERSION,
                              self.kn.namespace, PLURAL, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = self._get(name)
        if existing is None:  # deleted between our create and get: try once more
            return self._call("create", self.api.create_namespaced_custom_object, GROUP, VERSION,
                              self.kn.namespace, PLURAL, body)
        meta = existing.get("metadata", {})
        if (meta.get("labels") or {}).get(LABEL_MANAGED_BY) != MANAGED_BY:
            raise KnativeError(f"a Service named {name} already exists in namespace {self.kn.namespace} and is "
                               f"not managed by {MANAGED_BY}; refusing to touch it (rename or delete it)",
                               code="foreign_service")
        other = (meta.get("annotations") or {}).get(ANNOTATION_MODEL)
        if other and other != spec.name:
            raise KnativeError(f"Service {name} serves model {other!r}, not {spec.name!r}: the two names map to "
                               f"the same Service name; rename one of the models", code="name_collision")
        patch = {"metadata": {"labels": body["metadata"]["labels"], "annotations": body["metadata"]["annotations"]},
                 "spec": body["spec"]}
        if "ownerReferences" in body["metadata"]:
            patch["metadata"]["ownerReferences"] = body["metadata"]["ownerReferences"]
        log.info("adopting existing worker Service %s for %s", name, spec.name)
        return self._call("patch", self.api.patch_namespaced_custom_object, GROUP, VERSION, self.kn.namespace,
                          PLURAL, name, patch)

    def _wait_ready(self, slot: _Slot, obj: dict[str, Any], deadline: float) -> dict[str, Any]:
        """Follow the Service with a watch until it is ready at its generation."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        generation = obj["metadata"].get("generation", 0)
        while True:
            verdict, text = readiness(obj)
            with self._cond:
                slot.last_condition = text
            if verdict == "ready" and obj["metadata"].get("generation", 0) >= generation:
                return obj
            if verdict == "failed":
                raise WorkerFailed(f"worker Service {slot.name} failed: {text}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerNotReady(f"worker Service {slot.name} not ready after the deadline; last condition: "
                                     f"{text}", headers={"Retry-After": "10"})
            rv = obj["metadata"].get("resourceVersion")
            w = watch.Watch()
            try:
                for event in w.stream(self.api.list_namespaced_custom_object, GROUP, VERSION, self.kn.namespace,
                                      PLURAL, field_selector=f"metadata.name={slot.name}", resource_version=rv,
                                      timeout_seconds=max(1, int(min(remaining, 60)))):
                    if event["type"] == "DELETED":
                        raise WorkerFailed(f"worker Service {slot.name} was deleted while starting")
                    obj = event["object"]
                    if readiness(obj)[0] != "pending" or time.monotonic() >= deadline:
                        break
            except ApiException as exc:
                if exc.status == 410:  # our resourceVersion expired: re-read and watch again
                    log.info("watch on %s expired (410); re-reading", slot.name)
                    fresh = self._get(slot.name)
                    if fresh is None:
                        raise WorkerFailed(f"worker Service {slot.name} disappeared while starting") from None
                    obj = fresh
                    continue
                if exc.status == 403:
                    raise KnativeError(f"RBAC: the requester's ServiceAccount may not watch "
                                       f"services.serving.knative.dev in namespace {self.kn.namespace} (403)",
                                       code="forbidden") from None
                raise
            finally:
                w.stop()

    # ---- status ---------------------------------------------------------------------

    def services(self) -> list[dict[str, Any]]:
        """The worker Services we manage, by label selector."""
        result = self._call("list", self.api.list_namespaced_custom_object, GROUP, VERSION, self.kn.namespace,
                            PLURAL, label_selector=MANAGED_SELECTOR)
        return list(result.get("items", []))

    # ---- actuation ---------------------------------------------------------------

    def _begin_actuation(self, slot: Slot) -> bool:
        assert isinstance(slot, _Slot)
        slot.attempt += 1
        slot.started = time.monotonic()
        path = "wake" if slot.state == "sleeping" else "cold"
        self._set_state(slot, "starting")
        target = self._wake if path == "wake" else self._activate
        threading.Thread(target=target, args=(slot, slot.attempt), daemon=True, name=f"kn-{path}-{slot.name}").start()
        return True

    def _waiting_on(self, slot: Slot) -> str:
        return f"last condition: {getattr(slot, 'last_condition', slot.state)}"

    def _activate(self, slot: _Slot, attempt: int) -> None:
        spec = slot.spec
        try:
            obj = self._create_or_adopt(spec)
            obj = self._wait_ready(slot, obj, slot.started + (spec.start_timeout or 600.0))
        except ApiError as exc:
            self._failed(slot, attempt, exc.message)
            return
        except Exception as exc:  # ApiException and friends: keep the status in the message
            status = getattr(exc, "status", None)
            self._failed(slot, attempt, f"Kubernetes API error{f' {status}' if status else ''}: "
                                        f"{getattr(exc, 'reason', None) or exc}")
            return
        url = (obj.get("status", {}).get("address") or {}).get("url") or obj.get("status", {}).get("url")
        secs = time.monotonic() - slot.started
        with self._cond:
            if slot.attempt != attempt:
                return
            slot.url = url
            slot.error = None
            slot.failures = 0
            slot.last_actuation = Actuation("cold", secs)
            self._set_state(slot, "ready")
            status = self._status(slot)
        self.metrics.actuation.labels(spec.name, "cold").observe(secs)
        log.info("worker Service %s for %s ready in %.2f s at %s", slot.name, spec.name, secs, url)
        self.emit("ai.llm-d.fma.worker.started", status.as_dict())

    def _failed(self, slot: _Slot, attempt: int, reason: str) -> None:
        with self._cond:
            if slot.attempt != attempt:
                return
            slot.failures += 1
            slot.retry_at = time.monotonic() + backoff_delay(slot.failures, self.backoff_base_s, self.backoff_max_s)
            slot.error = reason
            self._set_state(slot, "failed")
            status = self._status(slot)
        log.warning("worker for %s failed: %s", slot.spec.name, reason)
        self.emit("ai.llm-d.fma.worker.failed", status.as_dict())

    # ---- sleep / wake / release ---------------------------------------------------------

    def _wake(self, slot: _Slot, attempt: int) -> None:
        try:
            self._http.post(f"{slot.url}/wake_up").raise_for_status()
        except httpx.HTTPError as exc:
            self._failed(slot, attempt, f"wake failed: {exc}")
            return
        secs = time.monotonic() - slot.started
        with self._cond:
            if slot.attempt != attempt:
                return
            slot.last_actuation = Actuation("wake", secs)
            self._set_state(slot, "ready")
            status = self._status(slot)
        self.metrics.actuation.labels(slot.spec.name, "wake").observe(secs)
        self.emit("ai.llm-d.fma.worker.ready", status.as_dict())

    def release(self, model: str) -> WorkerStatus:
        from kubernetes.client.exceptions import ApiException

        with self._cond:
            slot = self._slot(model)
            slot.attempt += 1  # an activation in progress is now stale
        try:
            if self.kn.release_policy == "delete":
                try:
                    self._call("delete", self.api.delete_namespaced_custom_object, GROUP, VERSION,
                               self.kn.namespace, PLURAL, slot.name)
                except ApiException as exc:
                    if exc.status != 404:
                        raise
            elif self._get(slot.name) is not None:
                # No pods from now on: the next ensure_ready re-applies the model's own template.
                self._call("patch", self.api.patch_namespaced_custom_object, GROUP, VERSION, self.kn.namespace,
                           PLURAL, slot.name, {"spec": {"template": {"metadata": {"annotations": {
                               "autoscaling.knative.dev/min-scale": "0",
                               "autoscaling.knative.dev/scale-to-zero-pod-retention-period": "0s",
                               "autoscaling.knative.dev/scale-down-delay": "0s"}}}}})
        except ApiException as exc:
            raise KnativeError(f"could not release {slot.name}: Kubernetes API error {exc.status}: "
                               f"{exc.reason}") from None
        with self._cond:
            slot.url = None
            slot.error = None
            self._set_state(slot, "cold")
            status = self._status(slot)
        self.emit("ai.llm-d.fma.worker.released", status.as_dict())
        return status

    # ---- keeping in step with the cluster ---------------------------------------------

    def start(self) -> None:
        threading.Thread(target=self._watch_loop, name="kn-watch", daemon=True).start()

    def _sync(self, kind: str, obj: dict[str, Any]) -> None:
        slot = self._by_service.get(obj.get("metadata", {}).get("name", ""))
        if slot is None:
            return
        with self._cond:
            if slot.state == "starting":
                return  # the activation thread owns this slot until it publishes
            if kind == "DELETED":
                if slot.state != "cold":
                    log.info("worker Service %s was deleted; %s is cold", slot.name, slot.spec.name)
                    slot.url = None
                    self._set_state(slot, "cold")
                return
            verdict, text = readiness(obj)
            slot.last_condition = text
            if verdict == "failed" and slot.state in ("ready", "sleeping"):
                slot.error = f"worker Service {slot.name} failed: {text}"
                slot.retry_at = time.monotonic()
                self._set_state(slot, "failed")
            elif verdict == "ready" and slot.state == "cold" and kind == "ADDED":
                # Found at start-up (e.g. after a requester restart): adopt it as ready.
                slot.url = (obj.get("status", {}).get("address") or {}).get("url")
                if slot.url:
                    self._set_state(slot, "ready")

    def _watch_loop(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        rv: str | None = None
        while not self._closing:
            try:
                if rv is None:
                    listing = self._call("list", self.api.list_namespaced_custom_object, GROUP, VERSION,
                                         self.kn.namespace, PLURAL, label_selector=MANAGED_SELECTOR)
                    for item in listing.get("items", []):
                        self._sync("ADDED", item)
                    rv = listing.get("metadata", {}).get("resourceVersion")
                w = watch.Watch()
                for event in w.stream(self.api.list_namespaced_custom_object, GROUP, VERSION, self.kn.namespace,
                                      PLURAL, label_selector=MANAGED_SELECTOR, resource_version=rv,
                                      timeout_seconds=60):
                    if self._closing:
                        w.stop()
                        break
                    rv = event["object"].get("metadata", {}).get("resourceVersion", rv)
                    self._sync(event["type"], event["object"])
            except ApiException as exc:
                if exc.status == 410:
                    rv = None  # expired: re-list
                    continue
                log.warning("watching worker Services failed (%s); retrying in 5 s", exc.status)
                time.sleep(5)
            except ApiError as exc:
                log.warning("watching worker Services failed: %s; retrying in 5 s", exc.message)
                time.sleep(5)
            except Exception as exc:  # transport errors: keep watching
                log.warning("watching worker Services failed: %s; retrying in 5 s", exc)
                time.sleep(5)

    def shutdown(self, timeout: float = 30.0) -> None:
        # Workers are Knative's to scale down; they are owned by the requester's
        # Service, so deleting it collects them.
        self._closing = True
        self._http.close()

