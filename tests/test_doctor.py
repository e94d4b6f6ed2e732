"""``fma doctor`` against the fake API server: a healthy cluster passes, each broken variant fails its check.

The healthy cluster is built from what a working install has: the example's
own rendered manifests (knative/overlays/examples/fma-requester and
knative/eventing, as make deploy applies them), Knative's CRDs labelled with
their release and its config maps as shipped with the flags
knative/cluster/config-features.yaml enables, the objects' status as their
controllers write it (Ready), the GPU Operator's ClusterPolicy and
RuntimeClasses (gpu-operator v25.10+, CDI on: assets/pre-requisites
runtime classes), a GPU node. RBAC answers come from the manifests' own Role
and ClusterRoles, bound to the requester's ServiceAccount. Each broken variant
changes one thing; the test asserts that check fails with its fix and the exit
code is 1 (the command runs as a user would run it: a process with a
kubeconfig).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_fake import CLUSTER, CRDS, FakeKube, load_role, write_kubeconfig
from test_manifests import by_kind, render

from conftest import REPO

NS = "fma-example"
SA = f"system:serviceaccount:{NS}:fma-requester"
READY = {"conditions": [{"type": "Ready", "status": "True"}]}


def crd(name: str, version: str) -> dict[str, Any]:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": name, "namespace": CLUSTER, "labels": {"app.kubernetes.io/version": version}}}


def cm(name: str, ns: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns}, "data": data}


class Cluster:
    """The fake API server holding a healthy install; ``break_*`` helpers make one thing wrong."""

    def __init__(self, tmp_path: Path) -> None:
        self.kube = FakeKube().start()
        self.kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(self.kubeconfig, self.kube.url, namespace=NS, token="admin-token", user="admin")
        self.install()

    def install(self) -> None:
        k = self.kube
        example = render("knative/overlays/examples/fma-requester")
        eventing = render("knative/eventing")
        k.put_object(crd("services.serving.knative.dev", "1.21.1"), plural=CRDS)
        k.put_object(crd("brokers.eventing.knative.dev", "1.21.0"), plural=CRDS)
        flags = yaml.safe_load((REPO / "knative/cluster/config-features.yaml").read_text())["data"]
        k.put_object(cm("config-features", "knative-serving", flags), plural="configmaps")
        k.put_object(cm("config-autoscaler", "knative-serving", {}), plural="configmaps")
        k.put_object(cm("config-defaults", "knative-serving", {}), plural="configmaps")
        k.put_object(cm("config-features", "knative-eventing", {"authentication-oidc": "enabled"}), plural="configmaps")
        (config,) = by_kind(example, "ConfigMap", "fma-requester-config")
        k.put_object(config, plural="configmaps")
        (claim,) = by_kind(example, "PersistentVolumeClaim", "fma-models")
        k.put_object({**claim, "metadata": {**claim["metadata"], "namespace": NS},
                      "status": {"phase": "Bound", "capacity": {"storage": "50Gi"}}}, plural="persistentvolumeclaims")
        (requester,) = by_kind(example, "Service", "fma-requester")
        requester = copy.deepcopy(requester)
        spec = requester["spec"]["template"]["spec"]
        # What the SinkBinding's webhook adds once its token Secret exists (sinkbinding_lifecycle.go, Do).
        spec.setdefault("volumes", []).append({"name": "oidc-token", "projected": {"sources": [
            {"secret": {"name": "fma-requester-events-oidc-token"}}]}})
        requester["status"] = READY
        k.put_object(requester)
        (broker,) = by_kind(eventing, "Broker")
        k.put_generic({**broker, "status": READY}, "eventing.knative.dev", "brokers")
        (binding,) = by_kind(eventing, "SinkBinding")
        k.put_generic({**binding, "status": {**READY, "oidcTokenSecretName": "fma-requester-events-oidc-token"}},
                      "sources.knative.dev", "sinkbindings")
        # gpu-operator v25.10+: cdi.enabled defaults to true (left unset here); its RuntimeClasses.
        k.put_generic({"apiVersion": "nvidia.com/v1", "kind": "ClusterPolicy", "metadata": {"name": "cluster-policy"},
                       "spec": {"toolkit": {"enabled": True}, "devicePlugin": {"enabled": True}}},
                      "nvidia.com", "clusterpolicies")
        for name in ("nvidia", "nvidia-legacy", "nvidia-cdi"):
            k.put_generic({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": name},
                           "handler": name}, "node.k8s.io", "runtimeclasses")
        k.put_generic({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-node-1", "labels": {
            "nvidia.com/gpu.present": "true", "nvidia.com/mig.strategy": "single"}},
            "status": {"allocatable": {"nvidia.com/gpu": "1", "cpu": "16"}}}, "", "nodes")
        k.subject_rules[SA] = load_role(REPO / "knative/base/role.yaml", REPO / "knative/base/tokenreview-rbac.yaml",
                                        REPO / "knative/base/knative-version-rbac.yaml")

    def doctor(self, *args: str) -> tuple[int, str]:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        out = subprocess.run([sys.executable, "-m", "fma_cli.main", "doctor", *args], env=env, capture_output=True,
                             text=True, timeout=120)
        return out.returncode, out.stdout + out.stderr


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.kube.stop()


def checks(output: str) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in json.loads(output)["checks"]}


def test_a_healthy_cluster_passes_every_check(cluster: Cluster):
    code, out = cluster.doctor("-o", "json")
    assert code == 0, out
    got = checks(out)
    assert {c["status"] for c in got.values()} == {"pass"}, out
    assert {"serving", "eventing", "requester", "autoscaler", "defaults", "rbac", "broker", "sinkbinding",
            "gpu/nodes", "gpu/runtime-class", "gpu/runtime-mode", "images", "model-cache",
            "features/kubernetes.podspec-persistent-volume-claim",
            "features/kubernetes.podspec-persistent-volume-write",
            "features/kubernetes.podspec-runtimeclassname", "features/kubernetes.podspec-fieldref"} <= set(got)
    code, text = cluster.doctor()
    print(text)
    assert code == 0 and all(line.startswith(("PASS", "      ")) for line in text.splitlines())


def _set(obj_path: tuple[str, ...]) -> Callable[[dict], None]:
    def change(obj: dict) -> None:
        *head, last = obj_path
        for key in head:
            obj = obj.setdefault(key, {})
        obj[last] = None
    return change


def break_serving_old(c: Cluster) -> None:
    c.kube.put_object(crd("services.serving.knative.dev", "1.20.2"), plural=CRDS)


def break_no_eventing(c: Cluster) -> None:
    c.kube.delete_object(CLUSTER, "brokers.eventing.knative.dev", plural=CRDS)


def break_flag(c: Cluster) -> None:
    flags = yaml.safe_load((REPO / "knative/cluster/config-features.yaml").read_text())["data"]
    flags.pop("kubernetes.podspec-runtimeclassname")
    c.kube.put_object(cm("config-features", "knative-serving", flags), plural="configmaps")


def break_scale_to_zero(c: Cluster) -> None:
    c.kube.put_object(cm("config-autoscaler", "knative-serving", {"enable-scale-to-zero": "false"}),
                      plural="configmaps")


def break_max_timeout(c: Cluster) -> None:
    c.kube.put_object(cm("config-defaults", "knative-serving", {"max-revision-timeout-seconds": "300"}),
                      plural="configmaps")


def break_rbac(c: Cluster) -> None:
    c.kube.subject_rules[SA] = load_role(REPO / "knative/base/role.yaml")  # the ClusterRoles never bound


def break_broker(c: Cluster) -> None:
    broker = c.kube.objects[("eventing.knative.dev/brokers", NS, "fma")]
    broker["status"] = {"conditions": [{"type": "Ready", "status": "False", "reason": "ChannelNotReady",
                                        "message": "channel fma-kne-trigger is not ready"}]}


def break_broker_sync(c: Cluster) -> None:
    broker = c.kube.objects[("eventing.knative.dev/brokers", NS, "fma")]
    broker["metadata"]["annotations"].pop("messaging.knative.dev/async-handler")


def break_sinkbinding(c: Cluster) -> None:
    binding = c.kube.objects[("sources.knative.dev/sinkbindings", NS, "fma-requester-events")]
    binding["status"].pop("oidcTokenSecretName")


def break_runtime_class(c: Cluster) -> None:
    del c.kube.objects[("node.k8s.io/runtimeclasses", CLUSTER, "nvidia-legacy")]


def break_runtime_mode(c: Cluster) -> None:
    """A template without a RuntimeClass on CDI nodes (the shipped template before issue 22)."""
    config = c.kube.get_object(NS, "fma-requester-config", plural="configmaps")
    template = yaml.safe_load(config["data"]["worker-template.yaml"])
    template.pop("gpu_runtime_class")
    config["data"]["worker-template.yaml"] = yaml.safe_dump(template)
    c.kube.put_object(config, plural="configmaps")


def break_requester(c: Cluster) -> None:
    c.kube.set_status(NS, "fma-requester", {"conditions": [{"type": "Ready", "status": "False",
                                                            "reason": "RevisionFailed", "message": "no GPU"}]})


def break_image(c: Cluster) -> None:
    c.kube.put_object({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "fma-worker-smollm2-135m-instruct-00001-deployment-abc", "namespace": NS,
        "labels": {"app.kubernetes.io/managed-by": "fma-requester"}},
        "status": {"containerStatuses": [{"name": "worker", "image": "registry.example.com/me/fma-worker:1.0",
                                          "state": {"waiting": {"reason": "ImagePullBackOff",
                                                                "message": "Back-off pulling image"}}}]}},
        plural="pods")


def break_claim_missing(c: Cluster) -> None:
    c.kube.delete_object(NS, "fma-models", plural="persistentvolumeclaims")


def break_claim_pending(c: Cluster) -> None:
    c.kube.objects[("persistentvolumeclaims", NS, "fma-models")]["status"] = {"phase": "Pending"}


def break_write_flag(c: Cluster) -> None:
    flags = yaml.safe_load((REPO / "knative/cluster/config-features.yaml").read_text())["data"]
    flags.pop("kubernetes.podspec-persistent-volume-write")
    c.kube.put_object(cm("config-features", "knative-serving", flags), plural="configmaps")


BROKEN: dict[str, tuple[Callable[[Cluster], None], str, str, str]] = {
    # variant: (break it, the check, its status, a word of its fix)
    "serving-before-1.21": (break_serving_old, "serving", "warn", "upgrade"),
    "no-eventing": (break_no_eventing, "eventing", "fail", "eventing-core.yaml"),
    "a-flag-off": (break_flag, "features/kubernetes.podspec-runtimeclassname", "fail", "kubectl patch configmap"),
    "no-scale-to-zero": (break_scale_to_zero, "autoscaler", "fail", "enable-scale-to-zero"),
    "max-timeout-too-low": (break_max_timeout, "defaults", "fail", "max-revision-timeout-seconds"),
    "rbac-missing": (break_rbac, "rbac", "fail", "make deploy"),
    "broker-not-ready": (break_broker, "broker", "fail", "kubectl describe broker"),
    "broker-synchronous": (break_broker_sync, "broker", "warn", "async-handler=true"),
    "sinkbinding-no-token": (break_sinkbinding, "sinkbinding", "fail", "wait-sinkbinding"),
    "runtime-class-missing": (break_runtime_class, "gpu/runtime-class", "fail", "gpu_runtime_class"),
    "runtime-mode-mismatch": (break_runtime_mode, "gpu/runtime-mode", "fail", "nvidia-legacy"),
    "requester-not-ready": (break_requester, "requester", "fail", "kubectl describe ksvc"),
    "image-pull": (break_image, "images", "fail", "make images"),
    "model-cache-claim-missing": (break_claim_missing, "model-cache", "fail", "kubectl apply -k"),
    "model-cache-claim-pending": (break_claim_pending, "model-cache", "warn", "kubectl describe pvc"),
    "model-cache-write-flag-off": (break_write_flag, "features/kubernetes.podspec-persistent-volume-write", "fail",
                                   "kubectl patch configmap"),
}


@pytest.mark.parametrize("variant", sorted(BROKEN))
def test_each_broken_variant_fails_its_check_with_the_fix(cluster: Cluster, variant: str):
    breaker, name, status, fix = BROKEN[variant]
    breaker(cluster)
    code, out = cluster.doctor("-o", "json")
    got = checks(out)
    assert got[name]["status"] == status, got[name]
    assert fix in (got[name]["fix"] or ""), got[name]
    others = [c for n, c in got.items() if n != name and c["status"] != "pass"]
    assert not others, f"only {name} should change: {others}"
    assert code == (1 if status == "fail" else 0)
    print(f"{variant}: {status.upper()} {name}: {got[name]['detail']}\n  fix: {got[name]['fix']}")


def test_no_eventing_skips_the_eventing_checks(cluster: Cluster):
    break_no_eventing(cluster)
    code, out = cluster.doctor("-o", "json", "--no-eventing")
    assert code == 0 and not {"eventing", "broker", "sinkbinding"} & set(checks(out))


def test_an_unreachable_cluster_is_a_clear_failure_not_a_traceback(tmp_path: Path):
    kubeconfig = tmp_path / "kubeconfig"
    write_kubeconfig(kubeconfig, "http://127.0.0.1:9", token="t", user="u")
    out = subprocess.run([sys.executable, "-m", "fma_cli.main", "doctor"], capture_output=True, text=True,
                         env={**os.environ, "KUBECONFIG": str(kubeconfig)}, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "FAIL  cluster" in out.stdout and "127.0.0.1:9" in out.stdout and "kubectl cluster-info" in out.stdout
