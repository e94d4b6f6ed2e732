"""Render every kustomization with `kubectl kustomize` and check the objects."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from fma_requester.knative import KnativeSettings
from fma_requester.registry import ModelRegistry

KUSTOMIZATIONS = sorted(str(p.parent.relative_to(REPO)) for p in (REPO / "knative").rglob("kustomization.yaml"))
# Those that deploy the requester (knative/eventing and knative/monitoring are applied beside them:
# tests/test_eventing.py, tests/test_monitoring.py).
REQUESTER = [k for k in KUSTOMIZATIONS if not k.startswith(("knative/eventing", "knative/monitoring"))]
KUBECTL = shutil.which("kubectl")


def render(path: str) -> list[dict]:
    # kubectl ships with this machine image (`kubectl kustomize` renders offline); without it these
    # tests fail with this reason rather than skip and hide it.
    assert KUBECTL is not None, "kubectl is not on PATH: it is needed to render the kustomizations"
    out = subprocess.run([KUBECTL, "kustomize", str(REPO / path)], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


def test_there_is_a_base_and_the_example_overlay():
    assert "knative/base" in KUSTOMIZATIONS
    assert "knative/overlays/examples/fma-requester" in KUSTOMIZATIONS


@pytest.mark.parametrize("path", REQUESTER)
def test_decode_deployment_is_kept_at_zero(path: str):
    (decode,) = by_kind(render(path), "Deployment", "modelservice-decode")
    assert decode["spec"]["replicas"] == 0


@pytest.mark.parametrize("path", REQUESTER)
def test_requester_is_pinned_with_its_gpu(path: str):
    (svc,) = by_kind(render(path), "Service", "fma-requester")
    assert svc["apiVersion"] == "serving.knative.dev/v1"
    template = svc["spec"]["template"]
    ann = template["metadata"]["annotations"]
    assert ann["autoscaling.knative.dev/min-scale"] == "1" and ann["autoscaling.knative.dev/max-scale"] == "1"
    assert template["metadata"]["labels"]["llm-d.ai/component"] == "fma-requester"
    (c,) = containers(svc)
    gpu = {} if path == "knative/overlays/cpu" else {"nvidia.com/gpu": "1"}  # the CPU overlay holds none
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "512Mi", **gpu}
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["env"][0] == {"name": "FMA_ACTUATOR", "value": "knative"}


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_autoscaling_annotations_only_on_templates_and_one_port(path: str):
    for doc in render(path):
        meta_ann = doc["metadata"].get("annotations") or {}
        assert not [k for k in meta_ann if k.startswith("autoscaling.knative.dev/")], doc["metadata"]["name"]
        if doc["kind"] == "Service" and doc["apiVersion"].startswith("serving.knative.dev"):
            ports = [p for c in containers(doc) for p in c.get("ports", [])]
            assert len(ports) == 1, "Knative allows exactly one container port"


@pytest.mark.parametrize("path", REQUESTER)
def test_role_grants_only_what_the_requester_uses(path: str):
    docs = render(path)
    (role,) = by_kind(docs, "Role", "fma-requester")
    # The verbs are checked against what the code does in tests/test_knative.py (the fake enforces this Role).
    assert role["rules"] == [{"apiGroups": ["serving.knative.dev"], "resources": ["services"],
                              "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
                             {"apiGroups": ["serving.knative.dev"], "resources": ["revisions"],
                              "verbs": ["get", "patch"]},
                             {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]
    # Cluster-wide, two grants: TokenReviews, to check Knative Eventing's OIDC tokens (tests/test_event_senders.py),
    # and get on the one CRD whose label says the Serving release (tests/test_knative.py).
    cluster_roles = {r["metadata"]["name"]: r for r in by_kind(docs, "ClusterRole")}
    assert cluster_roles["fma-requester-tokenreview"]["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}]
    assert cluster_roles["fma-requester-knative-version"]["rules"] == [
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
         "resourceNames": ["services.serving.knative.dev"], "verbs": ["get"]}]
    assert len(cluster_roles) == 2
    bindings = by_kind(docs, "ClusterRoleBinding")
    assert sorted(b["roleRef"]["name"] for b in bindings) == sorted(cluster_roles)
    for cluster_binding in bindings:
        assert [(s["kind"], s["name"]) for s in cluster_binding["subjects"]] == [("ServiceAccount", "fma-requester")]
    (binding,) = by_kind(docs, "RoleBinding", "fma-requester")
    assert binding["subjects"][0]["name"] == "fma-requester"
    (svc,) = by_kind(docs, "Service", "fma-requester")
    assert svc["spec"]["template"]["spec"]["serviceAccountName"] == "fma-requester"


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_container_runs_locked_down(path: str):
    for doc in render(path):
        if doc["kind"] not in ("Deployment", "Service") or "template" not in doc.get("spec", {}):
            continue
        pod = doc["spec"]["template"]["spec"]
        pod_sc = pod.get("securityContext") or {}
        for c in pod["containers"]:
            sc = {**pod_sc, **(c.get("securityContext") or {})}
            assert sc.get("runAsNonRoot") is True, c["name"]
            assert sc.get("allowPrivilegeEscalation") is False, c["name"]
            assert sc.get("readOnlyRootFilesystem") is True, c["name"]
            assert sc.get("capabilities") == {"drop": ["ALL"]}, c["name"]
            assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, c["name"]


@pytest.mark.parametrize("path", REQUESTER)
def test_config_map_is_mounted_and_parses(path: str, tmp_path: Path):
    docs = render(path)
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("fma-requester-config")]
    (svc,) = by_kind(docs, "Service", "fma-requester")
    volumes = {v["name"]: v for v in svc["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"], "the generated name is referenced"
    registry = ModelRegistry.from_text(cm["data"]["models.yaml"], "models.yaml")
    assert "smollm2-135m-instruct" in registry.names()
    template = tmp_path / "worker-template.yaml"
    template.write_text(cm["data"]["worker-template.yaml"])
    kn = KnativeSettings.from_env({"FMA_NAMESPACE": "x", "FMA_WORKER_TEMPLATE": str(template)})
    assert kn.template.progress_deadline == "1800s"


def test_example_overlay_deploys_into_its_namespace():
    docs = render("knative/overlays/examples/fma-requester")
    assert by_kind(docs, "Namespace", "fma-example")
    cluster_scoped = ("Namespace", "ClusterRole", "ClusterRoleBinding")
    assert all(d["metadata"].get("namespace") == "fma-example" for d in docs if d["kind"] not in cluster_scoped)
    for binding in by_kind(docs, "ClusterRoleBinding"):
        assert binding["subjects"][0]["namespace"] == "fma-example", "the grant goes to this namespace's requester"


@pytest.mark.parametrize("path", REQUESTER)
def test_the_requester_knows_its_node_so_shared_workers_run_beside_it(path: str):
    (svc,) = by_kind(render(path), "Service", "fma-requester")
    env = {e["name"]: e for e in containers(svc)[0]["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_the_example_shares_the_requesters_gpu_and_the_dedicated_overlay_does_not(tmp_path: Path):
    def models(path: str) -> ModelRegistry:
        (cm,) = [d for d in by_kind(render(path), "ConfigMap") if d["metadata"]["name"] == "fma-requester-config"]
        return ModelRegistry.from_text(cm["data"]["models.yaml"], path)

    example = models("knative/overlays/examples/fma-requester")
    assert all(s.knative.gpu_binding == "shared" for s in example)
    assert example.budget.memory_mib, "the budget is the shared GPU's memory"
    assert all(s.knative.gpu_binding == "dedicated" for s in models("knative/overlays/dedicated-gpu"))


@pytest.mark.parametrize("path", REQUESTER)
def test_the_config_map_has_no_name_hash_so_a_models_edit_rolls_out_nothing(path: str):
    docs = render(path)
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("fma-requester-config")]
    assert cm["metadata"]["name"] == "fma-requester-config"


def test_the_cluster_flags_file_enables_what_the_example_needs():
    """Every flag the example's rendered workers need (the simulated webhook's field mask decides), and no other."""
    from knative_webhook import ClusterConfig, KnativeWebhook

    from fma_requester.knative_spec import WorkerTemplate, render_worker_service
    from fma_requester.registry import ModelRegistry

    data = yaml.safe_load((REPO / "knative" / "cluster" / "config-features.yaml").read_text())["data"]
    docs = render("knative/overlays/examples/fma-requester")
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == "fma-requester-config"]
    template = WorkerTemplate(**yaml.safe_load(cm["data"]["worker-template.yaml"]))
    workers = [render_worker_service(spec, template, gpu_uuids=["GPU-aaa"], node_name="n1")
               for spec in ModelRegistry.from_text(cm["data"]["models.yaml"])]

    def refusals(flags: dict[str, str]) -> list[str]:
        hook = KnativeWebhook(ClusterConfig(features=flags))
        return [e for w in workers for e in hook.validate_service(hook.defaulted(w))]

    assert refusals(data) == []
    requester_only = {"kubernetes.podspec-fieldref",  # the requester's own NODE_NAME
                      "kubernetes.podspec-persistent-volume-write"}  # its read-write mount of the model cache
    for flag in data:
        if flag not in requester_only:
            assert refusals({k: v for k, v in data.items() if k != flag}), f"{flag} is needed by a worker"
    (requester,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "fma-requester"]
    hook = KnativeWebhook(ClusterConfig(features=data))
    assert hook.validate_service(hook.defaulted(requester)) == []
    for flag in requester_only:
        hook = KnativeWebhook(ClusterConfig(features={k: v for k, v in data.items() if k != flag}))
        assert hook.validate_service(hook.defaulted(requester)), f"{flag} is needed by the requester"
    assert set(data) == {"kubernetes.podspec-fieldref", "kubernetes.podspec-affinity",
                         "kubernetes.podspec-tolerations", "kubernetes.podspec-runtimeclassname",
                         "kubernetes.podspec-persistent-volume-claim", "kubernetes.podspec-persistent-volume-write"}


@pytest.mark.parametrize("overlay", ["knative/overlays/examples/fma-requester", "knative/overlays/dedicated-gpu",
                                     "knative/eventing"])
def test_a_custom_registry_leaves_no_ghcr_image_anywhere(overlay: str):
    import subprocess

    out = subprocess.run(["make", "-s", "deploy-manifests", "REGISTRY=registry.example.com/me", "TAG=1.2.3",
                          f"OVERLAY={overlay}"],
                         cwd=REPO, capture_output=True, text=True, check=True, timeout=120).stdout
    assert "ghcr.io" not in out, "the worker template included"
    docs = [d for d in yaml.safe_load_all(out) if d]
    if overlay == "knative/eventing":
        (log,) = by_kind(docs, "Service", "fma-event-log")
        assert containers(log)[0]["image"] == "registry.example.com/me/fma-requester:1.2.3"
        return
    (svc,) = by_kind(docs, "Service", "fma-requester")
    assert containers(svc)[0]["image"] == "registry.example.com/me/fma-requester:1.2.3"
    (cm,) = by_kind(docs, "ConfigMap", "fma-requester-config")
    assert "image:" not in "".join(line.split("#")[0] for line in cm["data"]["worker-template.yaml"].splitlines()), \
        "the worker image follows the requester's own"


@pytest.mark.parametrize("path", REQUESTER)
def test_the_requester_reads_its_keys_and_the_workers_token_from_the_secret(path: str):
    docs = render(path)
    (req,) = by_kind(docs, "Service", "fma-requester")
    pod = req["spec"]["template"]["spec"]
    env = {e["name"]: e for e in containers(req)[0]["env"]}
    mounts = {m["name"]: m for m in containers(req)[0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_volume = next(name for name, v in volumes.items() if v.get("secret", {}).get("secretName") == "fma-keys")
    folder = mounts[secret_volume]["mountPath"]
    assert mounts[secret_volume]["readOnly"] is True
    assert env["FMA_API_KEYS_FILE"]["value"] == f"{folder}/api-keys"
    assert env["FMA_ADMIN_KEYS_FILE"]["value"] == f"{folder}/admin-keys"
    assert env["FMA_WORKER_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "fma-keys", "key": "worker-token"}}
    for role in by_kind(docs, "Role"):  # the kubelet mounts the Secret: the requester itself never reads one
        assert not any("secrets" in rule.get("resources", []) for rule in role["rules"]), role


@pytest.mark.parametrize("path", REQUESTER)
def test_only_the_requester_knative_and_prometheus_reach_the_workers(path: str, tmp_path: Path):
    from fma_requester.knative_spec import render_worker_service

    docs = render(path)
    (policy,) = by_kind(docs, "NetworkPolicy", "fma-workers")
    (req,) = by_kind(docs, "Service", "fma-requester")
    (config,) = by_kind(docs, "ConfigMap", "fma-requester-config")
    template = tmp_path / "worker-template.yaml"
    template.write_text(config["data"]["worker-template.yaml"])
    settings = KnativeSettings.from_env({"FMA_WORKER_TEMPLATE": str(template), "FMA_NAMESPACE": "ns"})
    spec = next(iter(ModelRegistry.from_text(config["data"]["models.yaml"])))
    worker = render_worker_service(spec, settings.template)
    pod_labels = worker["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_labels.items(), "the policy selects the worker pods the requester creates"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    peers = rule["from"]
    requester_labels = req["spec"]["template"]["metadata"]["labels"]
    assert any(p.get("podSelector", {}).get("matchLabels", {}).items() <= requester_labels.items()
               and "podSelector" in p for p in peers), "the requester's pods"
    namespaces = {p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                  for p in peers if "namespaceSelector" in p}
    assert {"knative-serving", "monitoring"} <= namespaces, "the activator, and Prometheus"
    # Each worker gets the token the requester sends, from the same Secret key.
    env = {e["name"]: e for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FMA_WORKER_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "fma-keys", "key": "worker-token"}}


@pytest.mark.parametrize("how", ["knative/base", "knative/overlays/examples/fma-requester",
                                 "knative/overlays/dedicated-gpu", "make deploy NAMESPACE=team-a"])
def test_every_binding_names_its_service_account_where_that_account_is_deployed(how: str):
    """Issue 22: tokenreview-rbac.yaml named `default`, right only once an overlay moved it; the base alone and
    `make deploy NAMESPACE=...` bound a ServiceAccount that was not there."""
    import subprocess

    if how.startswith("make"):
        out = subprocess.run(["make", "-s", "deploy-manifests", "REGISTRY=r.example.com/me", "TAG=1",
                              "NAMESPACE=team-a", "OVERLAY=knative/overlays/examples/fma-requester"],
                             cwd=REPO, capture_output=True, text=True, check=True, timeout=120).stdout
        docs = [d for d in yaml.safe_load_all(out) if d]
    else:
        docs = render(how)
    accounts = {d["metadata"]["name"]: d["metadata"].get("namespace") for d in by_kind(docs, "ServiceAccount")}
    assert accounts and all(accounts.values())
    if how.startswith("make"):
        assert set(accounts.values()) == {"team-a"}
    bindings = by_kind(docs, "RoleBinding") + by_kind(docs, "ClusterRoleBinding")
    assert len(bindings) >= 3
    for binding in bindings:
        for subject in binding["subjects"]:
            if subject["kind"] == "ServiceAccount" and subject["name"] in accounts:
                assert subject["namespace"] == accounts[subject["name"]], binding["metadata"]["name"]


def test_the_shipped_rbac_grants_exactly_the_access_the_requester_declares():
    """fma_requester.kube.REQUESTER_ACCESS is what `fma doctor` asks the cluster about: the same list."""
    from fma_requester.kube import REQUESTER_ACCESS

    docs = render("knative/overlays/examples/fma-requester")
    granted = set()
    for role in by_kind(docs, "Role") + by_kind(docs, "ClusterRole"):
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or [None]:
                            granted.add((group, resource, verb, role["kind"] == "Role", name))
    assert granted == {(a.group, a.resource, a.verb, a.namespaced, a.name) for a in REQUESTER_ACCESS}


def test_the_cpu_overlay_asks_for_no_gpu_anywhere_it_runs():
    """For kind, minikube and the simulated cluster of make e2e: no GPU limit, no GPU binding, no RuntimeClass."""
    from fma_requester.knative_spec import WorkerTemplate, render_worker_service
    from fma_requester.registry import ModelRegistry

    docs = render("knative/overlays/cpu")
    (svc,) = by_kind(docs, "Service", "fma-requester")
    assert "nvidia.com/gpu" not in containers(svc)[0]["resources"]["limits"]
    (cm,) = by_kind(docs, "ConfigMap", "fma-requester-config")
    template = WorkerTemplate(**yaml.safe_load(cm["data"]["worker-template.yaml"]))
    assert template.gpu_runtime_class is None
    for spec in ModelRegistry.from_text(cm["data"]["models.yaml"]):
        pod = render_worker_service(spec, template)["spec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"] and "runtimeClassName" not in pod
        assert "FMA_GPUS" not in {e["name"] for e in pod["containers"][0]["env"]}


def test_the_fma_examples_own_path_renders_the_same_objects_as_our_overlay():
    """Issue 26: the FMA example deploys with `kubectl apply -k kustomize/overlays/examples/fma-requester/`, a path
    this project did not have. It is a thin alias to knative/overlays/examples/fma-requester: same objects."""
    alias = render("kustomize/overlays/examples/fma-requester")
    ours = render("knative/overlays/examples/fma-requester")
    assert alias == ours and any(o["kind"] == "Service" and o["metadata"]["name"] == "fma-requester" for o in ours)
