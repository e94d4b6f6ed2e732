"""``fma doctor``: what a live cluster lacks for this deployment, one line per check, each failure with its fix.

Read-only: it reads through the kubeconfig (GETs and lists, and one
SelfSubjectAccessReview per access the requester uses, asked as the
requester's ServiceAccount by impersonation) and changes nothing. Each check
says ``pass``, ``warn`` (works, with a caveat worth knowing) or ``fail``
(something the deployment needs is missing or wrong), and every ``fail``
carries the command that fixes it. The exit code is 1 when any check fails.

What each check reads, and why it matters here:

* Knative Serving's and Eventing's CRDs, and Serving's release (their
  ``app.kubernetes.io/version`` label): sleep needs Serving 1.21+.
* ``config-features``: each PodSpec flag the rendered worker and requester
  Services need (the webhook refuses the fields otherwise).
* ``config-autoscaler``: scale to zero enabled; the stable window and
  retention, which say when an idle worker's pod goes.
* ``config-defaults``: ``max-revision-timeout-seconds`` at least the
  requester's and the workers' ``timeoutSeconds``.
* The requester's RBAC, as ``fma_requester.kube.REQUESTER_ACCESS`` lists it.
* The Broker (ready, its channel asynchronous) and the SinkBinding (ready;
  with OIDC on, its token Secret made and mounted in the requester).
* GPU nodes: the GPU Operator's ClusterPolicy (CDI on or off, the runtime made
  default or not) against the worker template's ``gpu_runtime_class``, that
  RuntimeClass existing, nodes offering ``nvidia.com/gpu``.
* The requester Service ready, and no pod failing to pull its image or the
  workers' image.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import yaml

PASS, WARN, FAIL = "pass", "warn", "fail"
SERVING_NS, EVENTING_NS = "knative-serving", "knative-eventing"
SERVING_CRD, BROKER_CRD = "services.serving.knative.dev", "brokers.eventing.knative.dev"
REQUESTER, CONFIG_MAP, BROKER, BINDING = "fma-requester", "fma-requester-config", "fma", "fma-requester-events"
ASYNC_ANNOTATION = "messaging.knative.dev/async-handler"
SLEEP_SINCE = (1, 21)


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str | None = None


class Forbidden(Exception):
    pass


class Cluster:
    """Reads through the kubernetes client (kubeconfig or in-cluster), generic over API groups."""

    def __init__(self, configuration: Any, timeout_s: float = 15.0) -> None:
        from kubernetes import client

        configuration.retries = False
        self.api = client.ApiClient(configuration)
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
              query: list[tuple[str, str]] | None = None) -> Any:
        """One request; the decoded JSON, or None for a 404. Raises Forbidden for a 403, RuntimeError otherwise."""
        method_, url, all_headers, payload, _ = self.api.param_serialize(
            method, path, query_params=query or [], body=body, auth_settings=["BearerToken"],
            header_params={"Accept": "application/json", "Content-Type": "application/json", **(headers or {})})
        resp = self.api.call_api(method_, url, header_params=all_headers, body=payload,
                                 _request_timeout=self.timeout_s)
        resp.read()
        if resp.status == 404:
            return None
        if resp.status == 403:
            raise Forbidden(f"{method} {path}: forbidden")
        if resp.status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {resp.data[:200]!r}")
        return json.loads(resp.data or b"null")

    @staticmethod
    def path(group: str, version: str, plural: str, name: str | None = None, namespace: str | None = None) -> str:
        base = f"/apis/{group}/{version}" if group else "/api/v1"
        scope = f"/namespaces/{namespace}" if namespace else ""
        return f"{base}{scope}/{plural}" + (f"/{name}" if name else "")

    def get(self, group: str, version: str, plural: str, name: str, namespace: str | None = None) -> dict | None:
        return self._call("GET", self.path(group, version, plural, name, namespace))

    def list(self, group: str, version: str, plural: str, namespace: str | None = None,
             selector: str | None = None) -> list[dict]:
        path = self.path(group, version, plural, None, namespace)
        found = self._call("GET", path, query=[("labelSelector", selector)] if selector else None) or {}
        return list(found.get("items") or [])

    def can(self, user: str, attributes: dict[str, Any]) -> tuple[bool, str]:
        """A SelfSubjectAccessReview asked as ``user`` (impersonated, as ``kubectl auth can-i --as`` does): may it
        do this? The user's groups are not impersonated (the client sends one header per name): what is bound to
        every ServiceAccount is not counted, so a grant that only comes from there reads as missing."""
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": attributes}}
        headers = {"Impersonate-User": user}
        answer = self._call("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review, headers) or {}
        status = answer.get("status") or {}
        return bool(status.get("allowed")), status.get("reason") or status.get("evaluationError") or ""


# ---- helpers ----------------------------------------------------------------------------------------------

def _version(obj: dict | None) -> str | None:
    return (((obj or {}).get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/version")


def _version_tuple(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    parts = text.lstrip("v").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return None


def _ready(obj: dict | None) -> tuple[bool, str]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            ok = cond.get("status") == "True"
            return ok, "" if ok else f"{cond.get('reason') or 'NotReady'}: {cond.get('message') or ''}".rstrip(": ")
    return False, "no Ready condition yet"


def _data(cm: dict | None) -> dict[str, str]:
    return dict((cm or {}).get("data") or {})


def _patch_cm(name: str, namespace: str, key: str, value: str) -> str:
    return (f"kubectl patch configmap {name} -n {namespace} --type merge "
            f"-p '{json.dumps({'data': {key: value}})}'")


# ---- the checks ---------------------------------------------------------------------------------------------

@dataclass
class Deployment:
    """What this deployment needs, from its own ConfigMap (models, worker template) and requester Service."""

    namespace: str
    requester: dict | None
    models: Any  # a ModelRegistry, or None when the ConfigMap is missing or unreadable
    template: Any  # a WorkerTemplate, or None
    problem: str | None = None
    image_set: bool = False  # the worker template names an image (else workers follow the requester's)

    @property
    def shared_gpu(self) -> bool:
        return self.models is not None and any(s.knative.gpu_binding == "shared" and s.knative.gpus
                                               for s in self.models)

    def requester_spec(self) -> dict:
        return (((self.requester or {}).get("spec") or {}).get("template") or {}).get("spec") or {}


def load_deployment(cluster: Cluster, namespace: str) -> Deployment:
    from fma_requester.knative_spec import WorkerTemplate
    from fma_requester.registry import ModelRegistry

    requester = cluster.get("serving.knative.dev", "v1", "services", REQUESTER, namespace)
    cm = cluster.get("", "v1", "configmaps", CONFIG_MAP, namespace)
    if cm is None:
        return Deployment(namespace, requester, None, None, f"ConfigMap {CONFIG_MAP} not found in {namespace}")
    data = _data(cm)
    try:
        models = ModelRegistry.from_text(data.get("models.yaml", ""), f"{CONFIG_MAP}/models.yaml")
        fields = yaml.safe_load(data.get("worker-template.yaml") or "") or {}
        template = WorkerTemplate(namespace=namespace, **fields)
    except Exception as exc:  # a bad file is what this check reports, whatever it raised
        return Deployment(namespace, requester, None, None, f"{CONFIG_MAP} does not parse: {exc}")
    return Deployment(namespace, requester, models, template, image_set="image" in fields)


def check_serving(cluster: Cluster) -> list[Check]:
    crd = cluster.get("apiextensions.k8s.io", "v1", "customresourcedefinitions", SERVING_CRD)
    if crd is None:
        return [Check("serving", FAIL, "Knative Serving is not installed (no services.serving.knative.dev CRD)",
                      "kubectl apply -f https://github.com/knative/serving/releases/latest/download/serving-crds.yaml"
                      " -f https://github.com/knative/serving/releases/latest/download/serving-core.yaml")]
    text = _version(crd)
    version = _version_tuple(text)
    if version is None:
        return [Check("serving", WARN, f"Knative Serving installed, release unknown ({text!r}); sleep needs 1.21+")]
    if version < SLEEP_SINCE:
        return [Check("serving", WARN, f"Knative Serving {text}: below 1.21 a sleeping worker's pod cannot stay "
                      "ready, so sleep is refused (409) and a release deletes the worker Service",
                      "upgrade Knative Serving to 1.21 or later")]
    return [Check("serving", PASS, f"Knative Serving {text} (sleep needs 1.21+)")]


def check_eventing(cluster: Cluster) -> list[Check]:
    crd = cluster.get("apiextensions.k8s.io", "v1", "customresourcedefinitions", BROKER_CRD)
    if crd is None:
        return [Check("eventing", FAIL, "Knative Eventing is not installed (no brokers.eventing.knative.dev CRD)",
                      "kubectl apply -f https://github.com/knative/eventing/releases/latest/download/eventing-crds.yaml"
                      " -f https://github.com/knative/eventing/releases/latest/download/eventing-core.yaml"
                      " -f https://github.com/knative/eventing/releases/latest/download/in-memory-channel.yaml"
                      " -f https://github.com/knative/eventing/releases/latest/download/mt-channel-broker.yaml"
                      "  (or run with --no-eventing: make deploy EVENTING=false)")]
    return [Check("eventing", PASS, f"Knative Eventing {_version(crd) or '(release unknown)'}")]


def needed_flags(dep: Deployment) -> dict[str, str]:
    """config-features flag -> why this deployment needs it (from the Services it renders)."""
    from fma_requester.knative_spec import render_worker_service

    needs: dict[str, str] = {}
    for env in (dep.requester_spec().get("containers") or [{}])[0].get("env") or []:
        if "fieldRef" in (env.get("valueFrom") or {}):
            needs["kubernetes.podspec-fieldref"] = f"the requester's {env['name']} (downward API)"
    flags = {"affinity": "kubernetes.podspec-affinity", "tolerations": "kubernetes.podspec-tolerations",
             "runtimeClassName": "kubernetes.podspec-runtimeclassname",
             "nodeSelector": "kubernetes.podspec-nodeselector"}
    for vol in dep.requester_spec().get("volumes") or []:
        claim = vol.get("persistentVolumeClaim")
        if claim is not None:
            needs.setdefault("kubernetes.podspec-persistent-volume-claim",
                             f"the requester's claim {claim.get('claimName')} (the model cache)")
            if not claim.get("readOnly"):
                needs["kubernetes.podspec-persistent-volume-write"] = \
                    f"the requester's read-write claim {claim.get('claimName')} (it fills the model cache)"
    for spec in dep.models or []:
        svc = render_worker_service(spec, dep.template, gpu_uuids=["GPU-0"], node_name="node")
        pod = svc["spec"]["template"]["spec"]
        for key, flag in flags.items():
            if key in pod:
                needs.setdefault(flag, f"model {spec.name}'s worker ({key})")
        if any("persistentVolumeClaim" in v for v in pod.get("volumes") or []):
            needs.setdefault("kubernetes.podspec-persistent-volume-claim",
                             f"model {spec.name}'s worker (the model cache claim, read-only)")
    return needs


def check_model_cache(cluster: Cluster, dep: Deployment) -> list[Check]:
    """The claim hub models are fetched into: listed hub models need it, it must exist and be bound, and the
    requester must mount it read-write where FMA_HUB_CACHE_DIR points."""
    from fma_common.sources import parse_source

    hub = [s.name for s in dep.models or [] if parse_source(s.source).kind == "hf"]
    claim = getattr(dep.template, "model_cache_claim", None)
    if not claim:
        if hub:
            return [Check("model-cache", FAIL, f"hub models ({', '.join(hub)}) but the worker template names no "
                          "model_cache_claim: their workers have no model cache to load from",
                          "set model_cache_claim in worker-template.yaml (knative/base/models-pvc.yaml)")]
        return [Check("model-cache", PASS, "no hub models, no model cache needed")]
    pvc = cluster.get("", "v1", "persistentvolumeclaims", claim, dep.namespace)
    if pvc is None:
        return [Check("model-cache", FAIL, f"PersistentVolumeClaim {claim} not found in {dep.namespace}: workers "
                      "of hub models cannot start", "kubectl apply -k knative/overlays/examples/fma-requester/")]
    phase = (pvc.get("status") or {}).get("phase", "Pending")
    size = (((pvc.get("status") or {}).get("capacity") or {}).get("storage")
            or (((pvc.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage", "?"))
    mounts = [v for v in dep.requester_spec().get("volumes") or []
              if (v.get("persistentVolumeClaim") or {}).get("claimName") == claim]
    if not mounts or mounts[0]["persistentVolumeClaim"].get("readOnly"):
        return [Check("model-cache", FAIL, f"the requester does not mount {claim} read-write: it cannot fetch hub "
                      "models into it", "mount the claim in the requester (knative/base/requester.yaml)")]
    if phase != "Bound":
        return [Check("model-cache", WARN, f"PersistentVolumeClaim {claim} is {phase} (a WaitForFirstConsumer "
                      "class binds it when the requester's pod is scheduled)",
                      f"kubectl describe pvc {claim} -n {dep.namespace}")]
    return [Check("model-cache", PASS, f"PersistentVolumeClaim {claim} bound ({size}); hub models: "
                  f"{', '.join(hub) or 'none'} (`fma models` shows which are cached)")]


def check_features(cluster: Cluster, dep: Deployment) -> list[Check]:
    data = _data(cluster.get("", "v1", "configmaps", "config-features", SERVING_NS))
    out = []
    for flag, why in sorted(needed_flags(dep).items()):
        value = data.get(flag, "disabled")
        if value.lower() in ("enabled", "allowed"):
            out.append(Check(f"features/{flag}", PASS, f"{value}: {why}"))
        else:
            out.append(Check(f"features/{flag}", FAIL, f"{value}: {why} needs it (the webhook refuses the field)",
                             _patch_cm("config-features", SERVING_NS, flag, "enabled")))
    return out or [Check("features", PASS, "no gated PodSpec field is used")]


def check_autoscaler(cluster: Cluster, dep: Deployment | None = None) -> list[Check]:
    data = _data(cluster.get("", "v1", "configmaps", "config-autoscaler", SERVING_NS))
    if data.get("enable-scale-to-zero", "true").lower() == "false":
        return [Check("autoscaler", FAIL, "enable-scale-to-zero is false: idle workers keep their pods (and GPUs)",
                      _patch_cm("config-autoscaler", SERVING_NS, "enable-scale-to-zero", "true"))]
    window = data.get("stable-window", "60s")
    retention = data.get("scale-to-zero-pod-retention-period", "0s")
    grace = data.get("scale-to-zero-grace-period", "30s")
    own = dep.template.scale_to_zero_retention if dep is not None and dep.template is not None else None
    kept = f"the workers' retention ({own}; the cluster default is {retention})" if own else \
        f"the retention ({retention})"
    return [Check("autoscaler", PASS, f"scale to zero on; an idle worker's pod goes after the stable window "
                  f"({window}) and {kept}, then the scale-to-zero grace period ({grace})")]


def check_defaults(cluster: Cluster, dep: Deployment) -> list[Check]:
    data = _data(cluster.get("", "v1", "configmaps", "config-defaults", SERVING_NS))
    cap = int(data.get("max-revision-timeout-seconds", "600"))
    wanted = {"the requester": int(dep.requester_spec().get("timeoutSeconds") or 300)}
    if dep.template is not None:
        wanted["the workers"] = dep.template.timeout_seconds
    worst = max(wanted.values())
    detail = ", ".join(f"{who} {s} s" for who, s in wanted.items())
    if cap < worst:
        return [Check("defaults", FAIL, f"max-revision-timeout-seconds is {cap}, below the timeoutSeconds of "
                      f"{detail}: the webhook refuses those Services",
                      _patch_cm("config-defaults", SERVING_NS, "max-revision-timeout-seconds", str(worst)))]
    if dep.models is not None and dep.template is not None:
        slow = [s.name for s in dep.models if (s.queue_timeout or 0) >= dep.template.timeout_seconds]
        if slow:
            return [Check("defaults", FAIL, f"queue_timeout of {', '.join(slow)} is not below the workers' "
                          f"timeoutSeconds ({dep.template.timeout_seconds}): a client waiting for a start would get "
                          "Knative's 504 before our 503", f"lower queue_timeout in the {CONFIG_MAP} ConfigMap")]
    return [Check("defaults", PASS, f"max-revision-timeout-seconds {cap} covers {detail}")]


def check_rbac(cluster: Cluster, namespace: str) -> list[Check]:
    from fma_requester.kube import REQUESTER_ACCESS

    user = f"system:serviceaccount:{namespace}:{REQUESTER}"
    missing, allowed = [], 0
    for access in REQUESTER_ACCESS:
        attrs: dict[str, Any] = {"group": access.group, "resource": access.resource, "verb": access.verb}
        if access.namespaced:
            attrs["namespace"] = namespace
        if access.name:
            attrs["name"] = access.name
        ok, _reason = cluster.can(user, attrs)
        if ok:
            allowed += 1
        else:
            missing.append(str(access))
    if missing:
        return [Check("rbac", FAIL, f"the requester's ServiceAccount may not: {'; '.join(missing)}",
                      f"make deploy NAMESPACE={namespace} (applies knative/base's Role, ClusterRoles and bindings)")]
    return [Check("rbac", PASS, f"the requester's ServiceAccount may do all {allowed} things it does")]


def check_broker(cluster: Cluster, namespace: str) -> list[Check]:
    broker = cluster.get("eventing.knative.dev", "v1", "brokers", BROKER, namespace)
    if broker is None:
        return [Check("broker", FAIL, f"Broker {BROKER} not found in {namespace}",
                      f"make deploy NAMESPACE={namespace} (EVENTING=true applies knative/eventing first)")]
    ok, why = _ready(broker)
    if not ok:
        return [Check("broker", FAIL, f"Broker {BROKER} is not ready: {why}",
                      f"kubectl describe broker {BROKER} -n {namespace}")]
    annotations = (broker.get("metadata") or {}).get("annotations") or {}
    if (annotations.get(ASYNC_ANNOTATION) or "").lower() not in ("true", "1", "t"):
        return [Check("broker", WARN, f"Broker {BROKER} is ready but its channel is synchronous: a producer waits "
                      "for every subscriber (a cold event log, a whole completion)",
                      f"kubectl annotate broker {BROKER} -n {namespace} {ASYNC_ANNOTATION}=true && "
                      f"kubectl rollout restart deployment imc-dispatcher -n {EVENTING_NS}")]
    return [Check("broker", PASS, f"Broker {BROKER} ready, its channel asynchronous")]


def check_sinkbinding(cluster: Cluster, dep: Deployment) -> list[Check]:
    ns = dep.namespace
    binding = cluster.get("sources.knative.dev", "v1", "sinkbindings", BINDING, ns)
    if binding is None:
        return [Check("sinkbinding", FAIL, f"SinkBinding {BINDING} not found in {ns}: the requester sends no "
                      "lifecycle events", f"make deploy NAMESPACE={ns}")]
    ok, why = _ready(binding)
    if not ok:
        return [Check("sinkbinding", FAIL, f"SinkBinding {BINDING} is not ready: {why}",
                      f"kubectl describe sinkbinding {BINDING} -n {ns}")]
    oidc = _data(cluster.get("", "v1", "configmaps", "config-features", EVENTING_NS)).get("authentication-oidc")
    if (oidc or "").lower() != "enabled":
        return [Check("sinkbinding", PASS, f"SinkBinding {BINDING} ready (authentication-oidc off)")]
    secret = (binding.get("status") or {}).get("oidcTokenSecretName")
    if not secret:
        return [Check("sinkbinding", FAIL, f"SinkBinding {BINDING} has no OIDC token Secret yet: the requester "
                      "would get /oidc in a second Revision", "make wait-sinkbinding, then make deploy")]
    volumes = [v.get("name") for v in dep.requester_spec().get("volumes") or []]
    if "oidc-token" not in volumes:
        return [Check("sinkbinding", FAIL, f"SinkBinding {BINDING} made {secret} but the requester has no oidc-token "
                      "volume: its events carry no token", f"kubectl describe sinkbinding {BINDING} -n {ns}")]
    return [Check("sinkbinding", PASS, f"SinkBinding {BINDING} ready; its OIDC token ({secret}) is mounted")]


def check_gpu(cluster: Cluster, dep: Deployment) -> list[Check]:
    nodes = [n for n in cluster.list("", "v1", "nodes")
             if int(((n.get("status") or {}).get("allocatable") or {}).get("nvidia.com/gpu", "0") or 0) > 0]
    out = []
    if not nodes:
        out.append(Check("gpu/nodes", WARN, "no node offers nvidia.com/gpu (a GPU node pool at zero, or no device "
                         "plugin): the requester's pod waits for one"))
    else:
        strategies = sorted({((n.get("metadata") or {}).get("labels") or {}).get("nvidia.com/mig.strategy", "none")
                             for n in nodes})
        out.append(Check("gpu/nodes", PASS, f"{len(nodes)} node(s) offer nvidia.com/gpu (MIG strategy: "
                         f"{', '.join(strategies)})"))
    if not dep.shared_gpu:
        return out
    runtime_class = dep.template.gpu_runtime_class if dep.template else None
    policies = cluster.list("nvidia.com", "v1", "clusterpolicies")
    template_fix = f"set gpu_runtime_class in worker-template.yaml of the {CONFIG_MAP} ConfigMap"
    if runtime_class:
        if cluster.get("node.k8s.io", "v1", "runtimeclasses", runtime_class) is None:
            out.append(Check("gpu/runtime-class", FAIL, f"RuntimeClass {runtime_class} (the worker template's "
                             "gpu_runtime_class) does not exist: shared workers' pods are refused",
                             f"{template_fix} to one of: kubectl get runtimeclass; or null where the NVIDIA runtime "
                             "is the nodes' default"))
        else:
            out.append(Check("gpu/runtime-class", PASS, f"RuntimeClass {runtime_class} exists"))
    if not policies:
        out.append(Check("gpu/runtime-mode", WARN, "no GPU Operator ClusterPolicy: the nodes' runtime mode cannot be "
                         "read here; a shared worker that sees no GPU refuses to start and says why"))
        return out
    spec = policies[0].get("spec") or {}
    cdi = spec.get("cdi") or {}
    toolkit_env = {e.get("name"): str(e.get("value")) for e in ((spec.get("toolkit") or {}).get("env") or [])}
    cdi_on = cdi.get("enabled") is not False  # unset: on, the CRD default since v25.10
    default_runtime = toolkit_env.get("NVIDIA_RUNTIME_SET_AS_DEFAULT", "false" if cdi_on else "true").lower() == "true"
    mode = toolkit_env.get("NVIDIA_CONTAINER_RUNTIME_MODE", "cdi" if cdi_on else "auto")
    described = (f"GPU Operator: CDI {'on' if cdi_on else 'off'}, NVIDIA runtime "
                 f"{'the default' if default_runtime else 'not the default'}, mode {mode}")
    if cdi.get("nriPluginEnabled"):
        out.append(Check("gpu/runtime-mode", FAIL, f"{described}, NRI plugin on: no RuntimeClass is made and "
                         "NVIDIA_VISIBLE_DEVICES is not read; shared workers would see no GPU",
                         "use gpu_binding: dedicated for these models, or turn cdi.nriPluginEnabled off"))
    elif runtime_class is None and not (default_runtime and mode in ("legacy", "auto")):
        out.append(Check("gpu/runtime-mode", FAIL, f"{described}: a shared worker under the default runtime "
                         "would see no GPU", f"{template_fix}: nvidia-legacy"))
    elif runtime_class == "nvidia" and mode == "cdi" and not (dep.template and dep.template.gpu_device_kind):
        out.append(Check("gpu/runtime-mode", FAIL, f"{described}: RuntimeClass nvidia resolves a bare device UUID "
                         "against the management CDI kind and fails the container",
                         f"{template_fix}: nvidia-legacy (or set gpu_device_kind: k8s.device-plugin.nvidia.com/gpu)"))
    else:
        out.append(Check("gpu/runtime-mode", PASS, f"{described}; shared workers run under "
                         f"{runtime_class or 'the default runtime'}"))
    return out


def check_requester(cluster: Cluster, dep: Deployment) -> list[Check]:
    ns = dep.namespace
    if dep.requester is None:
        return [Check("requester", FAIL, f"Service {REQUESTER} not found in {ns}", f"make deploy NAMESPACE={ns}")]
    out = []
    ok, why = _ready(dep.requester)
    out.append(Check("requester", PASS, f"Service {REQUESTER} ready") if ok else
               Check("requester", FAIL, f"Service {REQUESTER} is not ready: {why}",
                     f"kubectl describe ksvc {REQUESTER} -n {ns}"))
    if dep.problem:
        out.append(Check("config", FAIL, dep.problem, f"make deploy NAMESPACE={ns}"))
    return out


def check_images(cluster: Cluster, dep: Deployment) -> list[Check]:
    from fma_requester.knative import worker_image_for

    containers = dep.requester_spec().get("containers") or [{}]
    image = containers[0].get("image") or "?"
    worker_image = dep.template.image if dep.template and dep.image_set else worker_image_for(image)
    failing = []
    for selector in (f"serving.knative.dev/service={REQUESTER}", "app.kubernetes.io/managed-by=fma-requester"):
        for pod in cluster.list("", "v1", "pods", dep.namespace, selector):
            for status in (pod.get("status") or {}).get("containerStatuses") or []:
                waiting = (status.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
                    failing.append(f"{pod['metadata']['name']}: {waiting['reason']} {status.get('image', '')}: "
                                   f"{waiting.get('message', '')}".strip())
    if failing:
        return [Check("images", FAIL, "; ".join(failing),
                      "push the images (make images REGISTRY=...) and deploy with the same REGISTRY and TAG, or add "
                      "an imagePullSecret to the fma-requester ServiceAccount")]
    return [Check("images", PASS, f"requester {image}, workers {worker_image}: no pod failing to pull them")]


def run_checks(cluster: Cluster, namespace: str, eventing: bool = True) -> list[Check]:
    """Every check, in order; one that cannot read what it needs fails with why, the others still run."""
    try:
        dep = load_deployment(cluster, namespace)
    except Forbidden as exc:
        dep = Deployment(namespace, None, None, None, f"cannot read the deployment: {exc}")
    except Exception as exc:  # nothing else can work either: one line that says where it tried
        host = getattr(cluster.api.configuration, "host", "?")
        return [Check("cluster", FAIL, f"cannot reach the API server at {host}: {type(exc).__name__}: "
                      f"{str(exc)[:200]}", "kubectl cluster-info (check KUBECONFIG and the current context)")]
    steps: list[tuple[str, Callable[[], list[Check]]]] = [
        ("serving", lambda: check_serving(cluster)),
        ("eventing", lambda: check_eventing(cluster) if eventing else []),
        ("requester", lambda: check_requester(cluster, dep)),
        ("features", lambda: check_features(cluster, dep)),
        ("autoscaler", lambda: check_autoscaler(cluster, dep)),
        ("defaults", lambda: check_defaults(cluster, dep)),
        ("rbac", lambda: check_rbac(cluster, namespace)),
        ("broker", lambda: check_broker(cluster, namespace) if eventing else []),
        ("sinkbinding", lambda: check_sinkbinding(cluster, dep) if eventing else []),
        ("gpu", lambda: check_gpu(cluster, dep)),
        ("model-cache", lambda: check_model_cache(cluster, dep)),
        ("images", lambda: check_images(cluster, dep)),
    ]
    out: list[Check] = []
    for name, step in steps:
        try:
            out += step()
        except Forbidden as exc:
            out.append(Check(name, FAIL, f"cannot read what this check needs: {exc}",
                             "run fma doctor as a user who may read cluster configuration (e.g. cluster-admin)"))
        except Exception as exc:  # an unreachable API server or a surprise: reported as this check's failure
            out.append(Check(name, FAIL, f"{type(exc).__name__}: {str(exc)[:300]}"))
    return out


def render_text(checks: Iterable[Check], colour: bool = False) -> str:
    marks = {PASS: ("PASS", "32"), WARN: ("WARN", "33"), FAIL: ("FAIL", "31")}
    lines = []
    for c in checks:
        word, code = marks[c.status]
        mark = f"\033[{code}m{word}\033[0m" if colour else word
        lines.append(f"{mark}  {c.name:<46} {c.detail}")
        if c.fix and c.status != PASS:
            lines.append(f"      fix: {c.fix}")
    return "\n".join(lines)


def render_json(checks: list[Check]) -> str:
    return json.dumps({"ok": not any(c.status == FAIL for c in checks), "checks": [asdict(c) for c in checks]},
                      indent=2)
