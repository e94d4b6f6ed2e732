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
  (0 GPUs, pinned to the requester's node, the requester's GPU UUIDs in
  ``NVIDIA_VISIBLE_DEVICES``; needs ``kubernetes.podspec-nodeselector``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from .registry import ModelSpec

GROUP, VERSION, PLURAL = "serving.knative.dev", "v1", "services"
MANAGED_BY = "fma-requester"
LABEL_ROLE = "llm-d.ai/role"
LABEL_MODEL = "llm-d.ai/model"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_VISIBILITY = "networking.knative.dev/visibility"
ANNOTATION_MODEL = "fma.llm-d.ai/model"
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_ROLE}=decode"

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
        "FMA_DTYPE": spec.dtype,
        "FMA_DEVICE": spec.device,
        # The image carries the converted model (FMA_CACHE_DIR is set there);
        # anything else a library wants to write goes to the /tmp emptyDir.
        "HF_HOME": "/tmp/hf",
        "HF_HUB_OFFLINE": "1",
        **tmpl.env,
        **spec.env,
    }
    limits: dict[str, str] = {"cpu": tmpl.cpu, "memory": tmpl.memory}
    requests: dict[str, str] = {"cpu": tmpl.cpu, "memory": tmpl.memory}
    pod_extra: dict[str, Any] = {}
    if kn.gpu_binding == "dedicated":
        if kn.gpus:
            limits["nvidia.com/gpu"] = str(kn.gpus)
    else:
        # llm-d dual-pods style: the requester holds the GPU in the scheduler's
        # books; the worker runs beside it on the same node with 0 GPUs and is
        # pointed at the requester's devices.
        if gpu_uuids:
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(gpu_uuids)
        if node_name:
            pod_extra["nodeSelector"] = {"kubernetes.io/hostname": node_name}
    if kn.resources:
        limits.update(kn.resources.get("limits", {}))
        requests.update(kn.resources.get("requests", {}))

    container: dict[str, Any] = {
        "name": "worker",
        "image": kn.image or tmpl.image,
        "ports": [{"containerPort": tmpl.port}],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "readinessProbe": {"httpGet": {"path": "/ready"}, "initialDelaySeconds": 1, "periodSeconds": 1},
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
    pod_spec: dict[str, Any] = {
        "containerConcurrency": kn.container_concurrency,
        "timeoutSeconds": tmpl.timeout_seconds,
        "responseStartTimeoutSeconds": tmpl.response_start_timeout_seconds,
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
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
