"""Every Knative object we deploy or create validates against Knative Serving's own CRD schema
(vendored from knative/serving knative-v1.23.0) and passes the simulator's webhook rules."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from crd_schema import errors
from knative_webhook import ClusterConfig, KnativeWebhook

from conftest import REPO
from fma_requester.knative import KnativeSettings
from fma_requester.knative_spec import WorkerTemplate, render_worker_service
from fma_requester.registry import ModelRegistry

# Every kustomization that deploys a Knative Service (knative/monitoring deploys none).
KUSTOMIZATIONS = sorted(str(p.parent.relative_to(REPO)) for p in (REPO / "knative").rglob("kustomization.yaml")
                        if "knative/monitoring" not in str(p))
# What the deployments need enabled in config-features: knative/cluster/config-features.yaml.
CLUSTER = yaml.safe_load((REPO / "knative" / "cluster" / "config-features.yaml").read_text())["data"]
# The requester: its NODE_NAME (fieldref) and the model cache it fills (a claim, mounted read-write).
PVC = {"kubernetes.podspec-persistent-volume-claim": "enabled"}
FLAGS = {path: {"kubernetes.podspec-fieldref": "enabled", **PVC,
                "kubernetes.podspec-persistent-volume-write": "enabled"} for path in KUSTOMIZATIONS}
SHARED = {"kubernetes.podspec-affinity": "enabled", "kubernetes.podspec-tolerations": "enabled",
          "kubernetes.podspec-runtimeclassname": "enabled"}  # knative/cluster/config-features.yaml

MODELS = """
models:
  - {name: smollm2-135m-instruct, source: 'embedded:smollm2-135m-instruct'}
  - name: org/Big-Model_v2.5
    source: hf:org/Big-Model_v2.5
    env: {FMA_MAX_BATCH: '8'}
    knative: {min_scale: 1, max_scale: 4, gpus: 2, container_concurrency: 16, target: 8,
              scale_to_zero_retention: 10m, image: 'registry.local/worker:2',
              resources: {limits: {memory: 40Gi}, requests: {cpu: '8'}}}
  - name: shared-one
    source: hf:org/shared
    knative: {gpu_binding: shared, max_scale: 0}
"""


def kustomize(path: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(REPO / path)], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def worker_services() -> list[tuple[str, dict]]:
    reg = ModelRegistry.from_text(MODELS, "models.yaml")
    base = KnativeSettings.from_env({"FMA_NAMESPACE": "llm",
                                     "FMA_WORKER_TEMPLATE": str(REPO / "knative" / "base" / "worker-template.yaml")})
    templates = {"default": WorkerTemplate(namespace="llm"), "knative/base": base.template}
    owner = {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "fma-requester", "uid": "u-1"}
    out = []
    for tname, tmpl in templates.items():
        for spec in reg:
            shared = spec.knative.gpu_binding == "shared"
            svc = render_worker_service(spec, tmpl, owner=owner, gpu_uuids=["GPU-1"] if shared else None,
                                        node_name="node-1" if shared else None)
            out.append((f"{tname}:{spec.name}", svc))
    return out


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_deployed_knative_services_validate_against_the_crd_and_the_webhook(path: str):
    services = [d for d in kustomize(path) if d["kind"] == "Service" and d["apiVersion"] == "serving.knative.dev/v1"]
    assert services
    webhook = KnativeWebhook(ClusterConfig(features=FLAGS.get(path, {})))
    for svc in services:
        assert errors(svc) == [], svc["metadata"]["name"]
        assert webhook.validate_service(svc) == [], svc["metadata"]["name"]
        if svc["metadata"]["name"] == "fma-requester":  # without its flags Knative refuses it, as the README warns
            assert KnativeWebhook().validate_service(svc), svc["metadata"]["name"]


@pytest.mark.parametrize("label, svc", worker_services(), ids=[label for label, _ in worker_services()])
def test_every_worker_service_the_requester_creates_validates(label: str, svc: dict):
    assert errors(svc) == []
    pod = svc["spec"]["template"]["spec"]
    shared = "affinity" in pod
    claim = any("persistentVolumeClaim" in v for v in pod["volumes"])
    needed = {**(SHARED if shared else {}), **(PVC if claim else {})}
    assert KnativeWebhook(ClusterConfig(features=needed)).validate_service(svc) == []
    assert KnativeWebhook(ClusterConfig(features=CLUSTER)).validate_service(svc) == [], "the shipped flags suffice"
    if shared or claim:  # without the flags, the webhook refuses it: the README names them
        assert KnativeWebhook().validate_service(svc)
    if claim:  # read-only, so the -write flag is not needed, and mounted read-only, as the webhook wants
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "models"]
        assert mount["readOnly"] is True
        assert any("podspec-persistent-volume-claim" in e or "persistent volume claim" in e
                   for e in KnativeWebhook(ClusterConfig(features=SHARED)).validate_service(svc))


def test_the_schema_check_catches_a_misspelled_field():
    _, svc = worker_services()[0]
    svc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    svc["spec"]["template"]["spec"]["timeoutSeconds"] = "600"
    found = errors(svc)
    assert any("readinesProbe" in e for e in found) and any("timeoutSeconds" in e for e in found)


def test_the_simulators_revisions_validate_against_the_revision_crd(tmp_path: Path):
    from knative_sim import SimulatedKnative
    from kube_fake import FakeKube

    kube = FakeKube().start()
    sim = SimulatedKnative(kube, tmp_path, speed=50.0)
    try:
        _, svc = worker_services()[0]
        svc["metadata"].pop("ownerReferences")
        kube.put_object({**svc, "metadata": {**svc["metadata"], "namespace": "llm"}})
        sim.wait_until(lambda: kube.get_object("llm", f"{svc['metadata']['name']}-00001", plural="revisions")
                       is not None, 10, "the revision")
        rev = kube.get_object("llm", f"{svc['metadata']['name']}-00001", plural="revisions")
        assert errors(rev, "revision") == []
    finally:
        sim.stop()
        kube.stop()


def test_a_claim_is_refused_without_its_flag_a_writable_one_without_the_write_flag_and_a_read_only_one_mounted_rw():
    """k8s_validation.go validatePersistentVolumeClaims and validateVolumeMounts, as the simulated webhook has them."""
    def svc(read_only_claim: bool, read_only_mount: bool) -> dict:
        _, base = worker_services()[0]
        out = json.loads(json.dumps(base))
        pod = out["spec"]["template"]["spec"]
        pod["volumes"] = [{"name": "tmp", "emptyDir": {}},
                          {"name": "models", "persistentVolumeClaim": {"claimName": "fma-models",
                                                                       "readOnly": read_only_claim}}]
        pod["containers"][0]["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"},
                                                {"name": "models", "mountPath": "/m", "readOnly": read_only_mount}]
        return out

    write = {"kubernetes.podspec-persistent-volume-write": "enabled"}
    assert KnativeWebhook(ClusterConfig(features=PVC)).validate_service(svc(True, True)) == []
    off = KnativeWebhook().validate_service(svc(True, True))
    assert any("Persistent volume claim support is disabled, but found persistent volume claim fma-models" in e
               for e in off) and any("volumes[1].persistentVolumeClaim" in e for e in off)
    rw = KnativeWebhook(ClusterConfig(features=PVC)).validate_service(svc(False, False))
    assert any("Persistent volume write support is disabled" in e for e in rw)
    assert KnativeWebhook(ClusterConfig(features={**PVC, **write})).validate_service(svc(False, False)) == []
    mixed = KnativeWebhook(ClusterConfig(features=PVC)).validate_service(svc(True, False))
    assert any("volume is readOnly but volume mount is not" in e for e in mixed)
