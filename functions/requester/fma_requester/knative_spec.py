"""The worker Knative Service a requester creates for a model: names and the manifest.

Pure functions of plain data (no Kubernetes client), so ``fma manifests``
prints exactly what the KnativeActuator would create, and tests assert on it.
Rules followed (design.md, notes/knative.md):

* name ``fma-worker-<slug>``: DNS-1035, at most 50 characters, with a short
  hash when the model name had to be shortened (or changed) to fit;
* labels ``llm-d.ai/role=decode``, ``llm-d.ai/model=<slug>``,
  ``app.kubernetes.io/managed-by=fma-requester`` and the cluster-local
  visibility label on the Service's own metadata;
* autoscaling and progress-deadline annotations only on the revision
  template (the Knative webhook rejects them on the Service);
* one container port, an httpGet readiness probe on ``/ready`` (a TCP probe
  would pass before the model is loaded), timeouts sized for a cold GPU start;
* GPU binding ``dedicated`` (its own ``nvidia.com/gpu``) or ``shared``
  (0 GPUs, on the requester's node by ``nodeAffinity`` on the Node's
  ``metadata.name``, tolerating the ``nvidia.com/gpu`` taint, the requester's
  GPU UUIDs in ``NVIDIA_VISIBLE_DEVICES``, under the template's ``gpu_runtime_class``;
  needs the ``kubernetes.podspec-affinity``, ``kubernetes.podspec-tolerations``
  and, with a RuntimeClass, ``kubernetes.podspec-runtimeclassname`` flags).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the registry validates with this module's bounds
    from .registry import ModelSpec

GROUP, VERSION, PLURAL = "serving.knative.dev", "v1", "services"
MANAGED_BY = "fma-requester"
LABEL_ROLE = "llm-d.ai/role"
LABEL_MODEL = "llm-d.ai/model"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_VISIBILITY = "networking.knative.dev/visibility"
ANNOTATION_MODEL = "fma.llm-d.ai/model"
# On the Service's own metadata (which makes no new Revision): the worker was released by the requester,
# so a requester that restarts and lists Services must not adopt it as ready.
ANNOTATION_RELEASED = "fma.llm-d.ai/released"
# On the revision template: when the requester last started a new Revision to recover a wedged one (a Revision that
# failed and has no pod left to recover it keeps its Service Ready=False for good). Kept on adoption.
ANNOTATION_RESTARTED = "fma.llm-d.ai/restarted-at"
LABEL_SERVICE = "serving.knative.dev/service"  # Knative labels every pod of a Service's Revisions with it
# The worker path Knative probes: the model is loaded, awake or asleep (fma_worker's /loaded). A sleeping worker
# stays ready, so its PodAutoscaler stays Active: a release then removes its pod after the stable window, where a
# not-ready pod would keep the PA activating until the progress deadline (kpa.go computeActiveCondition, scaler.go
# handleScaleToZero). The requester, not readiness, keeps inference off a sleeping worker.
READINESS_PATH = "/loaded"
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_ROLE}=decode"
LABEL_REVISION = "serving.knative.dev/revision"  # Knative labels a Revision's pods with it
CONTAINER_NAME = "worker"
AUTOSCALING_PREFIX = "autoscaling.knative.dev/"
MIN_SCALE = "autoscaling.knative.dev/min-scale"
RETENTION = "autoscaling.knative.dev/scale-to-zero-pod-retention-period"
# What a release writes on the Revision: no pod kept, and none kept after traffic stops.
RELEASE_ANNOTATIONS = {MIN_SCALE: "0", RETENTION: "0s"}
# Pod-spec keys the requester may render; one it rendered before and no longer does is removed on adoption.
OWNED_POD_KEYS = ("containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds", "containers", "volumes",
                  "nodeSelector", "affinity", "tolerations", "serviceAccountName", "automountServiceAccountToken",
                  "runtimeClassName")
# Knative's defaults and limits (config/core/configmaps/defaults.yaml, pkg/apis/...): see registry validation.
RESERVED_ENV = ("PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION")
CONTAINER_CONCURRENCY_MAX = 1000
RETENTION_MAX_S = 3600.0

NAME_PREFIX = "fma-worker-"
MAX_NAME = 50


def _shorten(slug: str, model: str, room: int) -> str:
    if len(slug) <= room:
        return slug
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"{slug[: room - 9].rstrip('-')}-{digest}"


def _sanitize(model: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") or "model"
    return slug if slug[0].isalpha() else f"m-{slug}"


def model_slug(model: str) -> str:
    """A label-safe, DNS-friendly form of a model name (lowercase ``[a-z0-9-]``, at most 63)."""
    return _shorten(_sanitize(model), model, 63)


def worker_service_name(model: str) -> str:
    """``fma-worker-<slug>``: a DNS-1035 label of at most 50 characters; long
    names are cut and get a short hash of the full name. Two models whose
    names sanitize alike are told apart by the model annotation (the actuator
    refuses to adopt a Service that serves another model)."""
    return NAME_PREFIX + _shorten(_sanitize(model), model, MAX_NAME - len(NAME_PREFIX))


@dataclass(frozen=True)
class WorkerTemplate:
    """Deployment-wide defaults for worker Services (from the requester's ConfigMap)."""

    image: str = "ghcr.io/llm-d-incubation/fma-worker:latest"
    namespace: str = "default"
    port: int = 8080
    cpu: str = "2"
    memory: str = "8Gi"
    timeout_seconds: int = 600
    response_start_timeout_seconds: int = 600
    progress_deadline: str = "1800s"
    scale_to_zero_retention: str = "5m"
    service_account: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    # How a worker with gpu_binding: shared gets the requester's device, which the node's NVIDIA container runtime
    # decides (README "GPU nodes"; nvidia-container-toolkit internal/config/image/cuda_image.go, gpu-operator
    # object_controls.go transformToolkitCtrForCDI): the RuntimeClass its pods run under (None: the node's default
    # runtime, right only where that is the NVIDIA runtime in legacy mode; "nvidia-legacy": the GPU Operator's
    # legacy-hook class, which applies NVIDIA_VISIBLE_DEVICES on its CDI-default nodes), and, for a runtime in CDI
    # mode, the CDI kind the device UUIDs are qualified with (e.g. "k8s.device-plugin.nvidia.com/gpu" with
    # runtimeClassName "nvidia": a bare UUID would resolve against the GPU Operator's management kind and fail).
    gpu_runtime_class: str | None = None
    gpu_device_kind: str | None = None
    # A Secret whose key ``worker-token`` every worker gets as FMA_WORKER_TOKEN (the requester reads the same
    # key): workers answer only the requester. None: workers accept anyone the NetworkPolicy lets in.
    token_secret: str | None = None
    # The model cache hub models (hf:) are loaded from: a PersistentVolumeClaim the requester fills (it mounts it
    # read-write) and every worker mounts read-only at ``model_cache_path`` (Knative's webhook wants
    # kubernetes.podspec-persistent-volume-claim for both, and -write for the requester's mount). None: workers
    # get no claim, and a hub model's worker fails its load saying so.
    model_cache_claim: str | None = None
    model_cache_path: str = "/var/cache/fma-models"


def render_worker_service(spec: ModelSpec, tmpl: WorkerTemplate, *, owner: dict[str, Any] | None = None,
                          gpu_uuids: list[str] | None = None, node_name: str | None = None) -> dict[str, Any]:
    kn = spec.knative
    name = worker_service_name(spec.name)
    labels = {
        LABEL_ROLE: "decode",
        LABEL_MODEL: model_slug(spec.name),
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_VISIBILITY: "cluster-local",
    }
    template_annotations = {
        "autoscaling.knative.dev/min-scale": str(kn.min_scale),
        "autoscaling.knative.dev/max-scale": str(kn.max_scale),
        "autoscaling.knative.dev/scale-to-zero-pod-retention-period":
            kn.scale_to_zero_retention or tmpl.scale_to_zero_retention,
        # Keep the activator in the path: avoids 503s as it enters/leaves (knative/serving#13525).
        "autoscaling.knative.dev/target-burst-capacity": "-1",
        "serving.knative.dev/progress-deadline": tmpl.progress_deadline,
    }
    if kn.target is not None:
        template_annotations["autoscaling.knative.dev/target"] = str(kn.target)

    env = {
        "FMA_MODEL": spec.name,
        "FMA_MODEL_SOURCE": spec.source,
        "FMA_MODEL_KIND": spec.model_kind,
        "FMA_DTYPE": spec.dtype,
        "FMA_DEVICE": spec.device,
        # The image carries the converted model (FMA_CACHE_DIR is set there);
        # anything else a library wants to write goes to the /tmp emptyDir.
        "HF_HOME": "/tmp/hf",
        "HF_HUB_OFFLINE": "1",
        **tmpl.env,
        **spec.admission_env(),
        **spec.env,
    }
    # The hub token is the requester's: it fetches; a worker loads from the read-only cache and never needs it,
    # and anything here is written in plain text into the Service (readable by whoever may read Services).
    env.pop("HF_TOKEN", None)
    limits: dict[str, str] = {"cpu": tmpl.cpu, "memory": tmpl.memory}
    requests: dict[str, str] = {"cpu": tmpl.cpu, "memory": tmpl.memory}
    pod_extra: dict[str, Any] = {}
    if kn.gpus:
        # What the worker checks before it loads (fma_worker/gpu_check.py): a worker given a GPU that sees none
        # exits with the reason instead of running on the CPU.
        env["FMA_GPUS"] = str(kn.gpus)
        env["FMA_GPU_BINDING"] = kn.gpu_binding
    if kn.gpu_binding == "dedicated":
        if kn.gpus:
            limits["nvidia.com/gpu"] = str(kn.gpus)
    else:
        # llm-d dual-pods style: the requester holds the GPU in the scheduler's
        # books; the worker runs beside it on the same node with 0 GPUs and is
        # pointed at the requester's devices (a MIG instance by its MIG- UUID).
        given = (gpu_uuids or [])[:kn.gpus]
        if given:
            kind = tmpl.gpu_device_kind
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(f"{kind}={u}" if kind else u for u in given)
            env["NVIDIA_DRIVER_CAPABILITIES"] = "compute,utility"
            env["FMA_GPU_UUIDS"] = ",".join(given)
        if kn.gpus and tmpl.gpu_runtime_class:
            # Behind config-features kubernetes.podspec-runtimeclassname (fieldmask.go PodSpecMask).
            pod_extra["runtimeClassName"] = tmpl.gpu_runtime_class
            env["FMA_GPU_RUNTIME_CLASS"] = tmpl.gpu_runtime_class  # named in the worker's reason if it sees no GPU
        if node_name:
            # By the Node object's name, not its hostname label: the two differ under a kubelet
            # --hostname-override, and matchFields on metadata.name cannot.
            pod_extra["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In",
                                                        "values": [node_name]}]}]}}}
        # A pod that asks for no nvidia.com/gpu gets no automatic toleration of the GPU nodes' taint
        # (ExtendedResourceToleration adds it only for pods that request the resource).
        pod_extra["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if kn.resources:
        limits.update(kn.resources.get("limits", {}))
        requests.update(kn.resources.get("requests", {}))

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": kn.image or tmpl.image,
        "ports": [{"containerPort": tmpl.port}],
        "env": [{"name": k, "value": v} for k, v in env.items()] + (
            [{"name": "FMA_WORKER_TOKEN", "valueFrom": {"secretKeyRef": {"name": tmpl.token_secret,
                                                                         "key": "worker-token"}}}]
            if tmpl.token_secret else []),
        "readinessProbe": {"httpGet": {"path": READINESS_PATH}, "initialDelaySeconds": 1, "periodSeconds": 1},
        # A worker that exits without a termination message (a failed load, an OOM kill) gets the end of its log
        # there, which Knative puts in the Revision's "Container failed with: ..." (reconcileDeployment).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {"limits": limits, "requests": requests},
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    if tmpl.model_cache_claim:
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": tmpl.model_cache_claim,
                                                                    "readOnly": True}})
        container["volumeMounts"].append({"name": "models", "mountPath": tmpl.model_cache_path, "readOnly": True})
        container["env"].append({"name": "FMA_HUB_CACHE_DIR", "value": tmpl.model_cache_path})
    pod_spec: dict[str, Any] = {
        # A worker never talks to the API server: no token in its pods.
        "automountServiceAccountToken": False,
        "containerConcurrency": kn.container_concurrency,
        "timeoutSeconds": tmpl.timeout_seconds,
        "responseStartTimeoutSeconds": tmpl.response_start_timeout_seconds,
        "containers": [container],
        "volumes": volumes,
        **pod_extra,
    }
    if tmpl.service_account:
        pod_spec["serviceAccountName"] = tmpl.service_account
    metadata: dict[str, Any] = {"name": name, "namespace": tmpl.namespace, "labels": labels,
                                "annotations": {ANNOTATION_MODEL: spec.name}}
    if owner:
        metadata["ownerReferences"] = [owner]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Service",
        "metadata": metadata,
        # The visibility label belongs on the Service only, never on the revision template.
        "spec": {"template": {"metadata": {"labels": {k: v for k, v in labels.items() if k != LABEL_VISIBILITY},
                                           "annotations": template_annotations},
                              "spec": pod_spec}},
    }


_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """Seconds in a duration as Knative reads it (Go's ``time.ParseDuration``: "5m", "1h30m", "300ms")."""
    sign = -1.0 if text[:1] == "-" else 1.0
    body = text[1:] if text[:1] in "+-" else text
    if body == "0":
        return 0.0
    total, pos = 0.0, 0
    for m in _GO_PART.finditer(body):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    if pos == 0 or pos != len(body):
        raise ValueError(f"{text!r} is not a duration Knative reads (like 30s, 5m or 1h30m)")
    return sign * total


def _with_removals(existing: dict[str, Any] | None, desired: dict[str, Any], keys: Any = None) -> dict[str, Any]:
    """``desired`` plus ``None`` for each key of ``existing`` (among ``keys``, when given) it no longer has."""
    out: dict[str, Any] = dict(desired)
    for key in existing or {}:
        if key not in desired and (keys is None or key in keys):
            out[key] = None
    return out


def adoption_patch(existing: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch that makes an existing worker Service what ``desired`` says, or None if it already is.

    RFC 7386 keeps every key a patch does not mention, so a key the requester
    set before and no longer sets is sent as ``null``: template annotations
    and labels (all the requester's own), owned pod-spec keys, and the
    release marker on the Service's metadata.
    """
    meta, tmpl = existing.get("metadata", {}), existing.get("spec", {}).get("template", {})
    want_meta, want_tmpl = desired["metadata"], desired["spec"]["template"]
    annotations = dict(want_meta.get("annotations") or {})
    if ANNOTATION_RELEASED in (meta.get("annotations") or {}):
        annotations[ANNOTATION_RELEASED] = None
    patch: dict[str, Any] = {
        "metadata": {"labels": want_meta["labels"], "annotations": annotations},
        "spec": {"template": {
            "metadata": {
                "labels": _with_removals(tmpl.get("metadata", {}).get("labels"), want_tmpl["metadata"]["labels"]),
                "annotations": _with_removals(tmpl.get("metadata", {}).get("annotations"),
                                              want_tmpl["metadata"]["annotations"])},
            "spec": _with_removals(tmpl.get("spec"), want_tmpl["spec"], OWNED_POD_KEYS)}},
    }
    if "ownerReferences" in want_meta:
        patch["metadata"]["ownerReferences"] = want_meta["ownerReferences"]
    return None if already_holds(patch, existing) else patch


def already_holds(patch: Any, existing: Any) -> bool:
    """Whether ``existing`` already is what the merge ``patch`` asks for, fields it does not name left aside.

    The API server stores an object after defaulting (Knative's webhook adds
    ``traffic``, probe thresholds, ``enableServiceLinks``, the creator
    annotations...), so the stored object has more than the requester sent;
    like Kubernetes' ``equality.Semantic.DeepDerivative``, what the patch leaves
    out is not compared, and a ``None`` (an RFC 7386 removal) holds when the key
    is absent. Lists compare element by element, at the same length.
    """
    if isinstance(patch, dict):
        if not isinstance(existing, dict):
            return False
        for key, value in patch.items():
            if value is None:
                if key in existing:
                    return False
            elif key not in existing or not already_holds(value, existing[key]):
                return False
        return True
    if isinstance(patch, list):
        return isinstance(existing, list) and len(patch) == len(existing) and \
            all(already_holds(a, b) for a, b in zip(patch, existing, strict=True))
    return bool(patch == existing)


def restart_patch(stamp: str) -> dict[str, Any]:
    """A template change that makes a new Revision (a new pod) without changing what it runs."""
    return {"spec": {"template": {"metadata": {"annotations": {ANNOTATION_RESTARTED: stamp}}}}}


def pin_patch(revision: dict[str, Any], template_annotations: dict[str, str]) -> dict[str, Any] | None:
    """The Revision annotations that restore the model's own scaling (after a release), or None.

    The Revision's autoscaling annotations are what its PodAutoscaler follows,
    so they are set to the template's, and any the template lacks are removed.
    """
    have = revision.get("metadata", {}).get("annotations") or {}
    want = {k: v for k, v in template_annotations.items() if k.startswith(AUTOSCALING_PREFIX)}
    patch: dict[str, Any] = {k: v for k, v in want.items() if have.get(k) != v}
    patch.update({k: None for k in have if k.startswith(AUTOSCALING_PREFIX) and k not in want})
    return {"metadata": {"annotations": patch}} if patch else None


def release_patch(revision: dict[str, Any]) -> dict[str, Any] | None:
    """The Revision annotations that scale it to zero and keep it there, or None if they are set."""
    have = revision.get("metadata", {}).get("annotations") or {}
    patch = {k: v for k, v in RELEASE_ANNOTATIONS.items() if have.get(k) != v}
    return {"metadata": {"annotations": patch}} if patch else None
