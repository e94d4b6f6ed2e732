"""Knative Serving's validating webhook, for the rules the requester's objects meet.

Mirrors knative/serving at ``knative-v1.23.0`` (paths below are in that
repository). A Service is defaulted first, as the defaulting webhook does
(``pkg/apis/serving/v1/revision_defaults.go``: ``timeoutSeconds`` from
``config-defaults``, readiness probe thresholds), then validated; errors are
rendered as ``knative.dev/pkg/apis.FieldError`` renders them (``message:
path``), joined as the webhook joins them, and answered like the webhook
answers (``validation failed: ...``, HTTP 400 through the API server).

What is checked, with its source:

* autoscaling annotations on the Service's own metadata
  (``pkg/apis/serving/metadata_validation.go``, ``ValidateHasNoAutoscalingAnnotation``);
* the revision template's autoscaling annotations: min/max scale as
  non-negative int32 with ``max >= min`` unless max is 0, retention and
  scale-down delay as Go durations within 0..1h, ``initial-scale`` (0 only
  with ``allow-zero-initial-scale``), ``target`` >= 0.01, ``target-burst-capacity``
  >= 0 or -1 (``pkg/apis/autoscaling/annotation_validation.go``); the
  progress deadline as a positive Go duration at second precision
  (``pkg/apis/serving/v1/revision_validation.go``);
* ``timeoutSeconds`` within 0..``max-revision-timeout-seconds``
  (``revision_validation.go``, ``validateTimeoutSeconds``), ``containerConcurrency``
  within 0..1000 (``metadata_validation.go``, ``ValidateContainerConcurrency``);
* PodSpec fields behind ``config-features`` flags (``pkg/apis/serving/fieldmask.go``,
  ``PodSpecMask``; defaults in ``pkg/apis/config/features.go``): ``nodeSelector``,
  ``affinity``, ``tolerations``, pod ``securityContext``...; only
  ``automountServiceAccountToken: false``; env ``valueFrom.fieldRef`` behind
  ``kubernetes.podspec-fieldref`` (``EnvVarSourceMask``); ``emptyDir`` volumes
  enabled by default (``VolumeSourceMask``); ``persistentVolumeClaim`` volumes
  behind ``kubernetes.podspec-persistent-volume-claim``, and one not read-only
  behind ``kubernetes.podspec-persistent-volume-write`` too
  (``validatePersistentVolumeClaims``); a mount of a secret or configMap, or
  of a read-only claim, must be readOnly (``validateVolumeMounts``);
* reserved env names ``PORT``, ``K_SERVICE``, ``K_CONFIGURATION``,
  ``K_REVISION``; one user port named ``''``/``h2c``/``http1`` that is not
  reserved (8012, 8013, 8022, 9090, 9091, 8008); a probe's named port must
  be the container's (``pkg/apis/serving/k8s_validation.go``);
* on a Revision: ``spec`` is immutable, metadata (its autoscaling
  annotations) is not, and is validated like a template's
  (``revision_validation.go``, ``Revision.Validate``).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from kube_fake import Rejected

WEBHOOK = "validation.webhook.serving.knative.dev"
AUTOSCALING = "autoscaling.knative.dev"
MAX_INT32 = 2**31 - 1
WINDOW_MAX_S = 3600.0  # pkg/apis/autoscaling/register.go: WindowMax = 1h
RESERVED_ENV = ("PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION")
RESERVED_PORTS = (8012, 8013, 8022, 9090, 9091, 8008)
VALID_PORT_NAMES = ("", "h2c", "http1")

# pkg/apis/config/features.go defaults (Disabled unless said otherwise).
FEATURE_FIELDS = {
    "affinity": "kubernetes.podspec-affinity",
    "topologySpreadConstraints": "kubernetes.podspec-topologyspreadconstraints",
    "hostAliases": "kubernetes.podspec-hostaliases",
    "nodeSelector": "kubernetes.podspec-nodeselector",
    "runtimeClassName": "kubernetes.podspec-runtimeclassname",
    "tolerations": "kubernetes.podspec-tolerations",
    "securityContext": "kubernetes.podspec-securitycontext",
    "shareProcessNamespace": "kubernetes.podspec-shareprocessnamespace",
    "priorityClassName": "kubernetes.podspec-priorityclassname",
    "schedulerName": "kubernetes.podspec-schedulername",
    "initContainers": "kubernetes.podspec-init-containers",
    "dnsPolicy": "kubernetes.podspec-dnspolicy",
    "dnsConfig": "kubernetes.podspec-dnsconfig",
    "hostIPC": "kubernetes.podspec-hostipc",
    "hostPID": "kubernetes.podspec-hostpid",
    "hostNetwork": "kubernetes.podspec-hostnetwork",
}
ALWAYS_ALLOWED_POD_FIELDS = {"serviceAccountName", "containers", "volumes", "imagePullSecrets", "enableServiceLinks",
                             "automountServiceAccountToken",
                             # Knative's own RevisionSpec fields, inlined beside the PodSpec
                             "containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds",
                             "idleTimeoutSeconds"}
CONTAINER_FIELDS = {"name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy",
                    "livenessProbe", "ports", "readinessProbe", "resources", "securityContext", "startupProbe",
                    "terminationMessagePath", "terminationMessagePolicy", "volumeMounts"}
SECURITY_CONTEXT_FIELDS = {"capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup", "runAsNonRoot",
                           "allowPrivilegeEscalation", "seccompProfile", "privileged"}

_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str) -> float:
    """Go's ``time.ParseDuration`` ("1h30m", "300ms", "0"), in seconds; ValueError where Go refuses."""
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
        raise ValueError(f"time: invalid duration {text!r}")
    return sign * total


@dataclass
class ClusterConfig:
    """The cluster's ConfigMaps and release, as far as the webhook and the controller read them."""

    features: dict[str, str] = field(default_factory=dict)  # config-features: flag -> enabled | disabled
    max_revision_timeout_seconds: int = 600  # config-defaults (config/core/configmaps/defaults.yaml)
    revision_timeout_seconds: int = 300
    revision_response_start_timeout_seconds: int = 0  # 0: not defaulted (revision_defaults.go)
    container_concurrency: int = 0  # config-defaults container-concurrency
    container_concurrency_max_limit: int = 1000
    enable_service_links: bool | None = False  # config-defaults enable-service-links ("false" by default)
    revision_ephemeral_storage_request: str | None = None  # config-defaults revision-ephemeral-storage-request
    user_container_name: str = "user-container"  # config-defaults container-name-template
    allow_zero_initial_scale: bool = False  # config-autoscaler
    stable_window_s: float = 60.0  # config-autoscaler stable-window (pkg/autoscaler/config/config.go)
    scale_to_zero_grace_s: float = 30.0  # config-autoscaler scale-to-zero-grace-period
    progress_deadline_s: float = 600.0  # config-deployment progress-deadline
    # The release the cluster runs, as the Serving CRDs' app.kubernetes.io/version label says it
    # (hack/generate-yamls.sh writes the tag there). Below 1.21 the controller behaves as it did then.
    serving_version: str = "1.23.0"

    def enabled(self, flag: str) -> bool:
        return self.features.get(flag, "disabled").lower() in ("enabled", "allowed")


class KnativeWebhook:
    """An admission hook for ``kube_fake.FakeKube``."""

    def __init__(self, config: ClusterConfig | None = None) -> None:
        self.config = config or ClusterConfig()
        self.rejections: list[str] = []

    def __call__(self, verb: str, plural: str, old: dict[str, Any] | None,
                 new: dict[str, Any]) -> dict[str, Any] | None:
        """Default (a Service is stored as the defaulting webhook leaves it), then validate."""
        stored = self.defaulted(new, creating=verb == "create", old=old) if plural == "services" else None
        if plural == "services":
            errors = self.validate_service(stored or new)
        elif plural == "revisions" and old is not None:
            errors = self.validate_revision_update(old, new)
        else:
            errors = []
        if errors:
            message = "validation failed: " + "\n".join(errors)
            self.rejections.append(message)
            raise Rejected(WEBHOOK, message)
        return stored

    # ---- Service -------------------------------------------------------------------------------

    def defaulted(self, svc: dict[str, Any], *, creating: bool = True, old: dict[str, Any] | None = None,
                  user: str = "system:serviceaccount:llm:fma-requester") -> dict[str, Any]:
        """The Service as the defaulting webhook leaves it, which is what the API server stores.

        ``pkg/apis/serving/v1/revision_defaults.go`` (``RevisionSpec.SetDefaults``): ``timeoutSeconds``,
        ``responseStartTimeoutSeconds`` (when the default is set and below the timeout) and
        ``containerConcurrency`` from ``config-defaults``; the user container's name; readiness-probe
        defaults (``successThreshold`` 1; with a period, ``failureThreshold`` 3 and ``timeoutSeconds`` 1); a
        mount of a volume that is not an emptyDir/PVC/ephemeral made ``readOnly``; ``enableServiceLinks`` on
        create only. ``service_defaults.go`` / ``route_defaults.go``: ``traffic`` = 100 % to the latest
        revision. ``pkg/apis/serving/metadata_validation.go`` (``SetUserInfo``): the creator and last
        modifier annotations (the modifier only when the spec changed).
        """
        out = copy.deepcopy(svc)
        spec = out.setdefault("spec", {}).setdefault("template", {}).setdefault("spec", {})
        cfg = self.config
        if not spec.get("timeoutSeconds"):
            spec["timeoutSeconds"] = cfg.revision_timeout_seconds
        if "responseStartTimeoutSeconds" not in spec and \
                0 < cfg.revision_response_start_timeout_seconds < spec["timeoutSeconds"]:
            spec["responseStartTimeoutSeconds"] = cfg.revision_response_start_timeout_seconds
        if spec.get("containerConcurrency") is None:
            spec["containerConcurrency"] = cfg.container_concurrency
        containers = spec.get("containers") or []
        taken = {c.get("name") for c in containers if c.get("name")}
        for c in containers:
            if not c.get("name"):
                name = cfg.user_container_name if len(containers) == 1 else f"{cfg.user_container_name}-0"
                c["name"] = name if name not in taken else f"{name}-x"
            # Resource defaults from config-defaults; Go's omitempty keeps empty maps out of what is stored.
            if cfg.revision_ephemeral_storage_request and "ephemeral-storage" not in \
                    (c.get("resources") or {}).get("requests", {}):
                c.setdefault("resources", {}).setdefault("requests", {})["ephemeral-storage"] = \
                    cfg.revision_ephemeral_storage_request
            probe = c.get("readinessProbe")
            if probe is None and (len(containers) == 1 or c.get("ports")):
                probe = c["readinessProbe"] = {}
            if probe is not None:
                if not any(k in probe for k in ("tcpSocket", "httpGet", "exec", "grpc")):
                    probe["tcpSocket"] = {"port": 0}
                probe.setdefault("successThreshold", 1)
                if probe.get("periodSeconds"):
                    probe.setdefault("failureThreshold", 3)
                    probe.setdefault("timeoutSeconds", 1)
            writable = {v["name"] for v in spec.get("volumes") or []
                        if any(k in v for k in ("emptyDir", "persistentVolumeClaim", "ephemeral"))}
            for mount in c.get("volumeMounts") or []:
                if mount.get("name") not in writable:
                    mount["readOnly"] = True
        if creating and "enableServiceLinks" not in spec and cfg.enable_service_links is not None:
            spec["enableServiceLinks"] = cfg.enable_service_links
        if not out["spec"].get("traffic"):
            out["spec"]["traffic"] = [{"latestRevision": True, "percent": 100}]
        annotations = out.setdefault("metadata", {}).setdefault("annotations", {})
        if creating:
            annotations["serving.knative.dev/creator"] = user
            annotations["serving.knative.dev/lastModifier"] = user
        elif old is not None and old.get("spec") != out.get("spec"):
            annotations["serving.knative.dev/lastModifier"] = user
        return out

    def validate_service(self, svc: dict[str, Any]) -> list[str]:
        svc = self.defaulted(svc)
        errors = [f'invalid key name "{k}": metadata.annotations\nautoscaling annotations must be put under '
                  f'"spec.template.metadata.annotations" to work'
                  for k in (svc.get("metadata", {}).get("annotations") or {}) if k.startswith(AUTOSCALING)]
        template = svc.get("spec", {}).get("template", {})
        errors += self.validate_annotations(template.get("metadata", {}).get("annotations") or {},
                                            "spec.template.metadata.annotations")
        errors += self.validate_pod_spec(template.get("spec", {}), "spec.template.spec")
        return errors

    def validate_annotations(self, ann: dict[str, str], where: str) -> list[str]:
        errors: list[str] = []

        def int_ge0(key: str) -> int:
            if key not in ann:
                return 0
            value = ann[key]
            try:
                number = int(value, 10)
            except ValueError:
                errors.append(f"invalid value: {value}: {where}.{key}")
                return 0
            if number < 0 or number > MAX_INT32:
                errors.append(f"expected 0 <= {value} <= {MAX_INT32}: {where}.{key}")
                return 0
            return number

        lo, hi = int_ge0(f"{AUTOSCALING}/min-scale"), int_ge0(f"{AUTOSCALING}/max-scale")
        if hi != 0 and hi < lo:
            errors.append(f"max-scale={hi} is less than min-scale={lo}: {AUTOSCALING}/max-scale, "
                          f"{AUTOSCALING}/min-scale")
        for key in ("scale-to-zero-pod-retention-period", "scale-down-delay"):
            full = f"{AUTOSCALING}/{key}"
            if full in ann:
                try:
                    seconds = go_duration(ann[full])
                except ValueError:
                    errors.append(f"invalid value: {ann[full]}: {full}")
                    continue
                if seconds < 0 or seconds > WINDOW_MAX_S:
                    errors.append(f"expected 0s <= {ann[full]} <= 1h0m0s: {full}")
        key = f"{AUTOSCALING}/initial-scale"
        if key in ann:
            try:
                initial = int(ann[key])
            except ValueError:
                errors.append(f"invalid value: {ann[key]}: {key}")
            else:
                if initial < 0:
                    errors.append(f"invalid value: {ann[key]}: {key} must be greater than 0")
                elif initial == 0 and not self.config.allow_zero_initial_scale:
                    errors.append(f"invalid value: {ann[key]}: {key}=0 not allowed by cluster")
        key = f"{AUTOSCALING}/target"
        if key in ann:
            try:
                if float(ann[key]) < 0.01:
                    errors.append(f"target {ann[key]} should be at least 0.01: {key}")
            except ValueError:
                errors.append(f"invalid value: {ann[key]}: {key}")
        key = f"{AUTOSCALING}/target-burst-capacity"
        if key in ann:
            try:
                tbc = float(ann[key])
                if tbc < 0 and tbc != -1:
                    raise ValueError
            except ValueError:
                errors.append(f"invalid value: {ann[key]}: {key}")
        key = "serving.knative.dev/progress-deadline"
        if key in ann:
            try:
                seconds = go_duration(ann[key])
            except ValueError:
                errors.append(f"invalid value: {ann[key]}: {key}")
            else:
                if round(seconds) != seconds:
                    errors.append(f"progress-deadline={ann[key]} is not at second precision: {key}")
                elif seconds < 0:
                    errors.append(f"progress-deadline={ann[key]} must be positive: {key}")
        return errors

    def validate_pod_spec(self, spec: dict[str, Any], where: str) -> list[str]:
        errors: list[str] = []
        for key in spec:
            if key in ALWAYS_ALLOWED_POD_FIELDS:
                continue
            flag = FEATURE_FIELDS.get(key)
            if flag is None or not self.config.enabled(flag):
                errors.append(f"must not set the field(s): {where}.{key}")
        if spec.get("automountServiceAccountToken") is True:
            errors.append(f"must not set the field(s): {where}.automountServiceAccountToken")
        timeout = spec.get("timeoutSeconds")
        if timeout is not None and timeout != 0 and not 0 <= timeout <= self.config.max_revision_timeout_seconds:
            errors.append(f"expected 0 <= {timeout} <= {self.config.max_revision_timeout_seconds}: "
                          f"{where}.timeoutSeconds")
        cc = spec.get("containerConcurrency")
        if cc is not None and not 0 <= cc <= self.config.container_concurrency_max_limit:
            errors.append(f"expected 0 <= {cc} <= {self.config.container_concurrency_max_limit}: "
                          f"{where}.containerConcurrency")
        volumes = {vol.get("name"): vol for vol in spec.get("volumes") or []}
        for i, vol in enumerate(spec.get("volumes") or []):
            errors += self._volume(vol, f"{where}.volumes[{i}]")
        containers = spec.get("containers") or []
        for i, c in enumerate(containers):
            errors += self._container(c, f"{where}.containers[{i}]")
            errors += self._volume_mounts(c, volumes, f"{where}.containers[{i}]")
        return errors

    def _volume(self, vol: dict[str, Any], where: str) -> list[str]:
        """``k8s_validation.go`` ``validateVolume``: PVCs behind two flags (``validatePersistentVolumeClaims``:
        the claim at all, and one that is not read-only), then the sources ``VolumeSourceMask`` (fieldmask.go)
        lets through: secret, configMap, projected always; emptyDir unless disabled (enabled by default);
        persistentVolumeClaim with its flag."""
        errors: list[str] = []
        claim = vol.get("persistentVolumeClaim")
        if claim is not None:
            name = claim.get("claimName")
            if not self.config.enabled("kubernetes.podspec-persistent-volume-claim"):
                errors.append(f"Persistent volume claim support is disabled, but found persistent volume claim "
                              f"{name}")
            if not claim.get("readOnly") and not self.config.enabled("kubernetes.podspec-persistent-volume-write"):
                errors.append(f"Persistent volume write support is disabled, but found persistent volume claim "
                              f"{name} that is not read-only")
        allowed = {"secret", "configMap", "projected", "emptyDir"}
        if self.config.enabled("kubernetes.podspec-persistent-volume-claim"):
            allowed.add("persistentVolumeClaim")
        for source in vol:
            if source != "name" and source not in allowed:
                errors.append(f"must not set the field(s): {where}.{source}")
        return errors

    def _volume_mounts(self, c: dict[str, Any], volumes: dict[str, dict[str, Any]], where: str) -> list[str]:
        """``k8s_validation.go`` ``validateVolumeMounts``: a mount of anything but an emptyDir, a PVC or an
        ephemeral volume must be readOnly; a mount of a read-only PVC must be readOnly too."""
        errors: list[str] = []
        for j, vm in enumerate(c.get("volumeMounts") or []):
            vol = volumes.get(vm.get("name"))
            if vol is None:
                errors.append(f"volumeMount has no matching volume: {where}.volumeMounts[{j}].name")
                continue
            writable_kind = any(k in vol for k in ("emptyDir", "persistentVolumeClaim", "ephemeral"))
            if not writable_kind and not vm.get("readOnly"):
                errors.append(f"volume mount should be readOnly for this type of volume: "
                              f"{where}.volumeMounts[{j}].readOnly")
            claim = vol.get("persistentVolumeClaim")
            if claim is not None and claim.get("readOnly") and not vm.get("readOnly"):
                errors.append(f"volume is readOnly but volume mount is not: {where}.volumeMounts[{j}].readOnly")
        return errors

    def _container(self, c: dict[str, Any], where: str) -> list[str]:
        errors = [f"must not set the field(s): {where}.{k}" for k in c if k not in CONTAINER_FIELDS]
        for k in (c.get("securityContext") or {}):
            if k not in SECURITY_CONTEXT_FIELDS or (k == "privileged" and c["securityContext"][k]):
                errors.append(f"must not set the field(s): {where}.securityContext.{k}")
        if (c.get("securityContext") or {}).get("capabilities", {}).get("add") and \
                not self.config.enabled("kubernetes.containerspec-addcapabilities"):
            errors.append(f"must not set the field(s): {where}.securityContext.capabilities.add")
        for j, env in enumerate(c.get("env") or []):
            if env.get("name") in RESERVED_ENV:
                errors.append(f'"{env["name"]}" is a reserved environment variable: {where}.env[{j}].name')
            source = env.get("valueFrom") or {}
            for k in ("fieldRef", "resourceFieldRef"):
                if k in source and not self.config.enabled("kubernetes.podspec-fieldref"):
                    errors.append(f"must not set the field(s): {where}.env[{j}].valueFrom.{k}")
        ports = c.get("ports") or []
        if len(ports) > 1:
            errors.append(f"more than one container port is set: {where}.ports\nOnly a single port is allowed")
        port = ports[0] if ports else {}
        if port:
            if port.get("containerPort") in RESERVED_PORTS:
                errors.append(f"invalid value: {port['containerPort']} is a reserved port: "
                              f"{where}.ports.containerPort")
            if port.get("name", "") not in VALID_PORT_NAMES:
                errors.append(f"Port name {port.get('name')} is not allowed: {where}.ports")
        for probe_name in ("readinessProbe", "livenessProbe"):
            probe = c.get(probe_name) or {}
            get_port = (probe.get("httpGet") or {}).get("port")
            if isinstance(get_port, str) and get_port != port.get("name"):
                errors.append(f"invalid value: {get_port}: {where}.{probe_name}.httpGet.port\n"
                              f"Probe port must match container port")
        return errors

    # ---- Revision ------------------------------------------------------------------------------

    def validate_revision_update(self, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
        if old.get("spec") != new.get("spec"):
            return ["Immutable fields changed (-old +new): spec"]
        return self.validate_annotations(new.get("metadata", {}).get("annotations") or {}, "metadata.annotations")
