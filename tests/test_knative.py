"""KnativeActuator against the fake API server and the Knative simulator (real `kubernetes` client).

The fake API server enforces the requester's own Role (knative/base/role.yaml),
and the simulator behaves like Knative (tests/knative_sim.py, with its
sources); tests count the Revisions created and the pods started, because
on a real cluster each of those is a GPU pod loading a model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from knative_sim import SimulatedKnative
from knative_webhook import ClusterConfig
from kube_fake import FakeKube, load_role, write_kubeconfig
from kubernetes import client

from conftest import EMBEDDED, REPO
from fma_common.errors import ApiError, WorkerFailed, WorkerNotReady
from fma_requester import protocol
from fma_requester.knative import KnativeActuator, KnativeSettings, pod_is_ready
from fma_requester.knative_spec import (
    MANAGED_SELECTOR,
    WorkerTemplate,
    model_slug,
    render_worker_service,
    worker_service_name,
)
from fma_requester.kube import custom_objects_api
from fma_requester.lifecycle import LifecycleConfig
from fma_requester.metrics import RequesterMetrics
from fma_requester.registry import ModelRegistry

NS = "llm"


def seed_requester(kube: FakeKube, token: str, *, service: bool = True) -> None:
    """What `make deploy` leaves for a requester in the namespace: its own Service (the owner of the worker
    Services it creates) and the Secret fma-keys (the workers' token, which their pods get by secretKeyRef)."""
    import base64

    if service:
        kube.put_object({"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                         "metadata": {"name": "fma-requester", "namespace": NS}, "spec": {}})
    kube.put_object({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fma-keys", "namespace": NS},
                     "data": {"worker-token": base64.b64encode(token.encode()).decode()}}, plural="secrets")


def registry(**model: str) -> ModelRegistry:
    extra = "".join(f", {k}: {v}" for k, v in model.items())  # e.g. knative="{max_scale: 1}"
    return ModelRegistry.from_text(
        "models:\n"
        f"  - {{name: {EMBEDDED}, source: 'embedded:{EMBEDDED}', dtype: float32{extra}}}\n"
        "  - {name: meta-llama/Llama-3.1-8B-Instruct, source: 'hf:meta-llama/Llama-3.1-8B-Instruct',"
        " knative: {gpus: 1, gpu_binding: shared, max_scale: 2}}\n")


ROLE = REPO / "knative" / "base" / "role.yaml"
VERSION_RBAC = REPO / "knative" / "base" / "knative-version-rbac.yaml"  # get on the Serving CRD, by name
RBAC = (ROLE, VERSION_RBAC)
SVC = "fma-worker-smollm2-135m-instruct"
SPEED = 20.0  # simulated seconds per real second: pods start in 0.1 s, the stable window is 3 s


@pytest.fixture()
def kube() -> Iterator[FakeKube]:
    fake = FakeKube(role=load_role(*RBAC)).start()
    # The requester's own Service, owner of the workers.
    fake.put_object({"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                     "metadata": {"name": "fma-requester", "namespace": NS}, "spec": {}})
    yield fake
    fake.stop()


@pytest.fixture()
def sim(kube: FakeKube, tmp_path: Path) -> Iterator[SimulatedKnative]:
    s = SimulatedKnative(kube, tmp_path, speed=SPEED)
    yield s
    s.stop()


def api_for(kube: FakeKube) -> client.CustomObjectsApi:
    return custom_objects_api(client.Configuration(host=kube.url))


def actuator(kube: FakeKube, reg: ModelRegistry | None = None, **env: str) -> KnativeActuator:
    kn = KnativeSettings.from_env({"FMA_NAMESPACE": NS, "FMA_KUBE_RETRIES": "4", **env})
    return KnativeActuator(reg or registry(), RequesterMetrics(), kn, api=api_for(kube),
                           config=LifecycleConfig(restart_backoff_s=0.1))


def revision_annotations(kube: FakeKube, name: str) -> dict[str, str]:
    return kube.get_object(NS, name, plural="revisions")["metadata"]["annotations"]


# ---- the manifest ----------------------------------------------------------------------

def test_service_names_are_dns_1035_and_at_most_50_chars():
    assert worker_service_name(EMBEDDED) == "fma-worker-smollm2-135m-instruct"
    assert worker_service_name("meta-llama/Llama-3.1-8B-Instruct") == "fma-worker-meta-llama-llama-3-1-8b-instruct"
    long = worker_service_name("org/" + "very-long-model-name-" * 5)
    assert len(long) <= 50 and long[-9] == "-"  # cut, with a short hash of the full name
    assert long != worker_service_name("org/" + "very-long-model-name-" * 6)
    assert worker_service_name("7b").startswith("fma-worker-m-7b")
    assert model_slug("Org/Model_v2.5") == "org-model-v2-5"


def test_worker_manifest_follows_the_knative_rules():
    spec = registry().get(EMBEDDED)
    svc = render_worker_service(spec, WorkerTemplate(namespace=NS, image="registry/fma-worker:1"),
                                owner={"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                                       "name": "fma-requester", "uid": "u-1"})
    meta, template = svc["metadata"], svc["spec"]["template"]
    assert meta["labels"] == {"llm-d.ai/role": "decode", "llm-d.ai/model": "smollm2-135m-instruct",
                              "app.kubernetes.io/managed-by": "fma-requester",
                              "networking.knative.dev/visibility": "cluster-local"}
    assert "annotations" not in meta or not any(k.startswith("autoscaling.") for k in meta["annotations"])
    assert "networking.knative.dev/visibility" not in template["metadata"]["labels"]
    ann = template["metadata"]["annotations"]
    assert ann["autoscaling.knative.dev/min-scale"] == "0"
    assert ann["autoscaling.knative.dev/max-scale"] == "1"
    assert "autoscaling.knative.dev/scale-to-zero-pod-retention-period" in ann
    assert ann["serving.knative.dev/progress-deadline"] == "1800s"
    pod = template["spec"]
    assert pod["timeoutSeconds"] == 600 and pod["responseStartTimeoutSeconds"] == 600
    (container,) = pod["containers"]
    assert container["ports"] == [{"containerPort": 8080}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/loaded", "ready to Knative while asleep"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False, "a worker never talks to the API server"
    assert meta["ownerReferences"][0]["uid"] == "u-1"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["FMA_MODEL"] == EMBEDDED and env["FMA_MODEL_SOURCE"] == f"embedded:{EMBEDDED}"


def test_shared_gpu_binding_requests_no_gpu_and_pins_to_the_requesters_node():
    spec = registry().get("meta-llama/Llama-3.1-8B-Instruct")
    svc = render_worker_service(spec, WorkerTemplate(namespace=NS), gpu_uuids=["GPU-aaa", "GPU-bbb"],
                                node_name="gpu-node-7")
    pod = svc["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == env["FMA_GPU_UUIDS"] == "GPU-aaa", "the model shares 1 of the 2"
    assert env["FMA_GPUS"] == "1" and env["FMA_GPU_BINDING"] == "shared", "the worker checks it sees its GPU"
    assert "nodeSelector" not in pod, "the hostname label is not the node's name under --hostname-override"
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term == {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-node-7"]}]}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert svc["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"] == "2"


# ---- the actuator against the fake API server and the simulator ----------------------------

def test_cold_start_creates_its_service_one_revision_and_one_pod(kube: FakeKube, sim: SimulatedKnative):
    act = actuator(kube)
    lease = act.ensure_ready(EMBEDDED)
    lease.done()
    assert lease.url == sim.route_url(SVC), "requests go to the Service's address (the route)"
    assert lease.actuation.path == "cold"
    obj = kube.get_object(NS, SVC)
    assert obj["metadata"]["ownerReferences"][0]["name"] == "fma-requester"
    assert act.describe(EMBEDDED).state == "ready"
    assert act.ensure_ready(EMBEDDED).actuation.path == "warm"
    assert sim.revisions_created[SVC] == 1 and sim.pods_started[SVC] == 1
    assert ("POST", f"/apis/serving.knative.dev/v1/namespaces/{NS}/services") in kube.requests
    assert any("watch=" in p and "fieldSelector=metadata.name" in p for _, p in kube.requests), \
        "readiness comes from a watch on the Service, not a polling loop"


def test_release_starts_no_pod_and_creates_no_revision(kube: FakeKube, sim: SimulatedKnative):
    act = actuator(kube)
    act.ensure_ready(EMBEDDED).done()
    generation = kube.get_object(NS, SVC)["metadata"]["generation"]
    status = act.release(EMBEDDED)
    assert status.state == "cold"
    ann = revision_annotations(kube, f"{SVC}-00001")
    assert ann["autoscaling.knative.dev/min-scale"] == "0"
    assert ann["autoscaling.knative.dev/scale-to-zero-pod-retention-period"] == "0s"
    svc = kube.get_object(NS, SVC)
    assert svc["metadata"]["generation"] == generation, "the template was not touched"
    assert svc["metadata"]["annotations"]["fma.llm-d.ai/released"] == "true"
    sim.wait_until(lambda: not sim.live_pods(SVC), 90, "the released revision's pod to go")
    assert sim.revisions_created[SVC] == 1 and sim.pods_started[SVC] == 1
    # The next activation re-pins the same revision: still no new one.
    act.ensure_ready(EMBEDDED).done()
    ann = revision_annotations(kube, f"{SVC}-00001")
    assert ann["autoscaling.knative.dev/scale-to-zero-pod-retention-period"] == "5m", "the model's own value back"
    assert "fma.llm-d.ai/released" not in (kube.get_object(NS, SVC)["metadata"].get("annotations") or {})
    assert sim.revisions_created[SVC] == 1
    # Issue 22 (found by make e2e): the Service is Ready at zero pods, so before, this start returned "ready" with
    # no pod at all and a warm warmed nothing. A start ends with a pod: one request through the route scaled the
    # Revision from zero.
    assert len(sim.live_pods(SVC)) == 1 and sim.pods_started[SVC] == 2


def test_a_scale_from_zero_ends_when_the_route_answers_and_the_pod_is_ready_without_waiting_a_watch_slice(
        kube: FakeKube, sim: SimulatedKnative, monkeypatch: pytest.MonkeyPatch):
    """Issue 24: after the route's 200 the start waited for a Pod change (a watch of up to 1 s) before looking,
    so a Pod already published ready cost a whole slice on every Knative cold start (1.0-1.1 s of 6.7 s)."""
    import httpx

    act = actuator(kube)
    act.ensure_ready(EMBEDDED).done()
    act.release(EMBEDDED)
    sim.wait_until(lambda: not sim.live_pods(SVC), 90, "the released revision's pod to go")

    def ready_pods() -> list[dict]:
        return [p for p in kube.list_objects(NS, "pods") if pod_is_ready(p)
                and not (p.get("metadata") or {}).get("deletionTimestamp")]

    real_get = httpx.get

    def route_get(url: str, **kw):  # the route's answer arrives once the Pod object says Ready (the usual order)
        resp = real_get(url, **kw)
        deadline = time.monotonic() + 10
        while resp.status_code == 200 and not ready_pods() and time.monotonic() < deadline:
            time.sleep(0.01)
        return resp

    waits: list[bool] = []
    original = act.kn_effects._wait_pods_change

    def recording(name: str, seconds: float) -> None:
        waits.append(bool(ready_pods()))
        original(name, seconds)

    monkeypatch.setattr(httpx, "get", route_get)
    monkeypatch.setattr(act.kn_effects, "_wait_pods_change", recording)
    act.ensure_ready(EMBEDDED).done()
    assert sim.pods_started[SVC] == 2
    assert not any(waits), "waited for a Pod change while a ready Pod was already there"


# ---- the sleep ladder: warm -> sleeping -> scaled to zero, and back ------------------------------

def test_sleep_then_wake_creates_no_revision_and_keeps_the_same_pod(kube: FakeKube, sim: SimulatedKnative):
    act = actuator(kube)
    act.ensure_ready(EMBEDDED).done()
    (pod,) = sim.live_pods(SVC)
    assert act.sleep(EMBEDDED, 1).state == "sleeping"
    assert revision_annotations(kube, f"{SVC}-00001")["autoscaling.knative.dev/min-scale"] == "1", "pinned"
    assert pod.standin.asleep and "POST /sleep?level=1" in pod.standin.calls, "the sleep reached the pod itself"
    lease = act.ensure_ready(EMBEDDED)
    assert lease.actuation.path == "wake"
    lease.done()
    assert not pod.standin.asleep and sim.live_pods(SVC) == [pod], "the same pod, woken"
    assert revision_annotations(kube, f"{SVC}-00001")["autoscaling.knative.dev/min-scale"] == "0", "unpinned"
    assert sim.revisions_created[SVC] == 1 and sim.pods_started[SVC] == 1


def test_a_sleeping_worker_survives_past_the_stable_window_and_retention(kube: FakeKube, sim: SimulatedKnative):
    act = actuator(kube, reg=registry(knative="{max_scale: 1, scale_to_zero_retention: 10s}"))
    act.ensure_ready(EMBEDDED).done()
    act.sleep(EMBEDDED, 2)
    (pod,) = sim.live_pods(SVC)
    time.sleep(sim.clock.real(60 + 10 + 30))  # stable window + retention, and then some
    assert sim.live_pods(SVC) == [pod] and sim.pods_started[SVC] == 1, "kept (pinned), though it gets no traffic"
    assert pod.ready, "asleep, it stays ready to Knative (its probe is /loaded): its autoscaler stays Active"
    assert act.ensure_ready(EMBEDDED).actuation.path == "wake"


def test_release_after_sleep_leaves_no_pod_and_no_new_revision(kube: FakeKube, sim: SimulatedKnative):
    act = actuator(kube)
    act.ensure_ready(EMBEDDED).done()
    act.sleep(EMBEDDED, 1)
    assert act.release(EMBEDDED).state == "cold"
    sim.wait_until(lambda: not sim.live_pods(SVC), 120, "the pod to go")
    assert sim.revisions_created[SVC] == 1 and sim.pods_started[SVC] == 1


def test_a_request_that_reaches_a_sleeping_pod_is_refused_at_once_not_held(kube: FakeKube, sim: SimulatedKnative):
    """Readiness does not keep traffic off a sleeper (the requester does): what reaches one gets a distinct 503."""
    import httpx

    act = actuator(kube)
    lease = act.ensure_ready(EMBEDDED)
    lease.done()
    (pod,) = sim.live_pods(SVC)
    act.sleep(EMBEDDED, 1)
    answer = httpx.post(f"{lease.url}/v1/completions", json={}, timeout=30)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "worker_sleeping"
    woken = act.ensure_ready(EMBEDDED)
    assert "POST /wake_up" in pod.standin.calls and woken.actuation.path == "wake"
    assert httpx.post(f"{woken.url}/v1/completions", json={}, timeout=30).json()["pod"] == pod.name
    woken.done()


def test_a_start_or_sleep_overtaken_by_a_release_writes_nothing_after_it(kube: FakeKube, sim: SimulatedKnative):
    """A release cancels the worker's handle and writes under the model's lock, so an effect still running for
    that handle cannot re-pin the Revision after the release (which would keep the pod while it counts as gone)."""
    from fma_requester.effects import WorkerHandle

    act = actuator(kube)
    act.ensure_ready(EMBEDDED).done()
    act.release(EMBEDDED)
    released = revision_annotations(kube, f"{SVC}-00001")
    late = WorkerHandle(EMBEDDED)
    late.cancel()  # a start the release overtook
    spec = registry().get(EMBEDDED)
    with pytest.raises(RuntimeError, match="cancelled"):
        act.kn_effects.start(spec, late, 30)
    late.data["revision"] = f"{SVC}-00001"
    with pytest.raises(RuntimeError, match="cancelled"):
        act.kn_effects._write(late, "sleep", lambda: None)
    act.kn_effects._unpin(spec, late)
    assert revision_annotations(kube, f"{SVC}-00001") == released, "the release's annotations still hold"
    assert "fma.llm-d.ai/released" in kube.get_object(NS, SVC)["metadata"]["annotations"]


def test_sleep_of_a_model_that_may_run_several_pods_is_refused_with_409(kube: FakeKube, sim: SimulatedKnative):
    from fma_common.errors import Conflict

    act = actuator(kube)
    model = "meta-llama/Llama-3.1-8B-Instruct"  # max_scale: 2
    reg = ModelRegistry.from_text(f"models:\n  - {{name: {model}, source: 'hf:{model}', knative: {{max_scale: 2}}}}\n")
    act = actuator(kube, reg=reg)
    act.ensure_ready(model).done()
    with pytest.raises(Conflict) as info:
        act.sleep(model, 1)
    assert info.value.status == 409 and "max_scale: 1" in info.value.message
    assert act.describe(model).state == "ready", "refused: it keeps serving"


def test_release_by_deletion_and_release_is_idempotent(kube: FakeKube, sim: SimulatedKnative):
    deleting = actuator(kube, FMA_RELEASE_POLICY="delete")
    deleting.ensure_ready(EMBEDDED).done()
    assert deleting.release(EMBEDDED).state == "cold"
    assert kube.get_object(NS, SVC) is None
    assert deleting.release(EMBEDDED).state == "cold", "release is idempotent"


def test_existing_managed_service_is_adopted_with_one_new_revision(kube: FakeKube, sim: SimulatedKnative):
    existing = render_worker_service(registry().get(EMBEDDED), WorkerTemplate(namespace=NS, image="old:1"))
    kube.put_object(existing)
    sim.wait_until(lambda: sim.revisions_created.get(SVC) == 1, 10, "the old revision")
    act = actuator(kube, FMA_WORKER_IMAGE="new:2")
    act.ensure_ready(EMBEDDED).done()
    obj = kube.get_object(NS, SVC)
    assert obj["spec"]["template"]["spec"]["containers"][0]["image"] == "new:2"
    assert obj["metadata"]["generation"] == 2 and sim.revisions_created[SVC] == 2
    assert obj["status"]["latestReadyRevisionName"] == f"{SVC}-00002"


def test_adopting_an_unchanged_service_writes_nothing(kube: FakeKube, sim: SimulatedKnative):
    act = actuator(kube)
    act.ensure_ready(EMBEDDED).done()
    patches = kube.count("PATCH")
    again = actuator(kube)  # a requester restarted with the same settings
    again.ensure_ready(EMBEDDED).done()
    assert kube.count("PATCH") == patches and sim.revisions_created[SVC] == 1


def test_adoption_after_a_template_change_leaves_no_stale_key(kube: FakeKube, sim: SimulatedKnative):
    old = render_worker_service(registry().get(EMBEDDED), WorkerTemplate(namespace=NS))
    tmpl = old["spec"]["template"]
    tmpl["metadata"]["annotations"]["autoscaling.knative.dev/target"] = "7"  # a value the model no longer sets
    tmpl["metadata"]["labels"]["stale-label"] = "x"
    tmpl["spec"]["serviceAccountName"] = "someone"
    kube.put_object(old)
    actuator(kube).ensure_ready(EMBEDDED).done()
    new = kube.get_object(NS, SVC)["spec"]["template"]
    assert "autoscaling.knative.dev/target" not in new["metadata"]["annotations"]
    assert "stale-label" not in new["metadata"]["labels"]
    assert "serviceAccountName" not in new["spec"]
    rev = revision_annotations(kube, f"{SVC}-00002")
    assert "autoscaling.knative.dev/target" not in rev


def test_foreign_service_with_the_same_name_is_never_touched(kube: FakeKube, sim: SimulatedKnative):
    kube.put_object({"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                     "metadata": {"name": SVC, "namespace": NS, "labels": {"team": "someone-else"}},
                     "spec": {"template": {}}})
    act = actuator(kube)
    with pytest.raises(ApiError) as info:
        act.ensure_ready(EMBEDDED)
    assert info.value.code == "foreign_service" and "not managed by fma-requester" in info.value.message
    assert not protocol.is_transient(info.value.status), "asking again fails the same way: permanent"
    assert not [p for m, p in kube.requests if m in ("PATCH", "PUT", "DELETE")]
    assert kube.get_object(NS, SVC)["metadata"]["generation"] == 1


def test_rbac_403_names_the_missing_verb_and_keeps_its_code(kube: FakeKube, sim: SimulatedKnative):
    kube.forbidden = {"create"}
    with pytest.raises(ApiError) as info:
        actuator(kube).ensure_ready(EMBEDDED)
    assert info.value.code == "forbidden" and not protocol.is_transient(info.value.status)
    assert "may not create services.serving.knative.dev" in info.value.message
    assert "403" in info.value.message


def test_a_webhook_rejection_fails_the_first_request_with_its_message_and_is_not_retried(tmp_path: Path):
    kube = FakeKube(role=load_role(*RBAC)).start()
    sim = SimulatedKnative(kube, tmp_path, speed=SPEED)  # affinity and tolerations are behind flags that are off
    try:
        act = actuator(kube, NODE_NAME="gpu-node-1")
        model = "meta-llama/Llama-3.1-8B-Instruct"  # gpu_binding: shared renders affinity and tolerations
        with pytest.raises(ApiError) as info:
            act.ensure_ready(model)
        assert info.value.code == "webhook_rejected" and not protocol.is_transient(info.value.status)
        assert "must not set the field(s): spec.template.spec.affinity" in info.value.message
        assert "enable kubernetes.podspec-affinity, kubernetes.podspec-tolerations in the config-features" \
            in info.value.message, "it says which flags would let it through"
        assert kube.count("POST") == 1, "a permanent 4xx is not retried"
        with pytest.raises(ApiError) as again:
            act.ensure_ready(model)  # within the backoff: refused at once, still permanent
        assert again.value.code == "webhook_rejected" and "next retry in" in again.value.message
        assert kube.count("POST") == 1
    finally:
        sim.stop()
        kube.stop()


def test_api_server_errors_are_retried_with_backoff(kube: FakeKube, sim: SimulatedKnative):
    kube.fail_next = [500, 503]
    actuator(kube).ensure_ready(EMBEDDED).done()
    assert kube.get_object(NS, SVC) is not None


def test_revision_failure_is_reported_with_knatives_reason(kube: FakeKube, sim: SimulatedKnative):
    sim.behaviour[SVC] = "fail"
    started = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        actuator(kube).ensure_ready(EMBEDDED)
    # The Service's Ready says the route's view; the requester adds why the Revision failed, with the log's tail
    # (the worker container's terminationMessagePolicy is FallbackToLogsOnError).
    assert "does not have any ready Revision" in info.value.message
    assert "ExitCode1: Container failed with: RuntimeError: model failed to load" in info.value.message
    assert time.monotonic() - started < 10, "a failed revision must fail fast, not at the deadline"


def test_an_unschedulable_pod_waits_with_the_reason_in_status_then_serves(kube: FakeKube, sim: SimulatedKnative):
    import threading

    sim.behaviour[SVC] = "unschedulable:40"  # a GPU node pool scaling up
    act = actuator(kube)
    result: list = []
    t = threading.Thread(target=lambda: result.append(act.ensure_ready(EMBEDDED)))
    t.start()
    sim.wait_until(lambda: "waiting for a node" in (act.describe(EMBEDDED).detail or ""), 30, "the wait")
    status = act.describe(EMBEDDED).as_dict()
    assert status["state"] == "starting" and "Insufficient nvidia.com/gpu" in status["detail"]
    t.join(30)
    assert result and result[0].actuation.path == "cold"
    result[0].done()


def test_unschedulable_past_the_start_timeout_fails_with_the_reason(kube: FakeKube, sim: SimulatedKnative):
    sim.behaviour[SVC] = "unschedulable"
    with pytest.raises((WorkerFailed, WorkerNotReady)) as info:
        actuator(kube, registry(start_timeout="2s", queue_timeout="10s")).ensure_ready(EMBEDDED)
    assert "Insufficient nvidia.com/gpu" in info.value.message


def test_deadline_reports_the_last_condition_seen(kube: FakeKube, sim: SimulatedKnative):
    sim.behaviour[SVC] = "slow:100000"
    with pytest.raises((WorkerFailed, WorkerNotReady)) as info:
        actuator(kube, registry(start_timeout="2s", queue_timeout="10s")).ensure_ready(EMBEDDED)
    assert "RevisionMissing" in info.value.message or "Ready=Unknown" in info.value.message


def test_a_release_cancels_the_activation_and_its_watch(kube: FakeKube, sim: SimulatedKnative):
    import threading

    sim.behaviour[SVC] = "slow:100000"
    act = actuator(kube)
    errors: list = []
    t = threading.Thread(target=lambda: errors.append(_raises(lambda: act.ensure_ready(EMBEDDED))))
    t.start()
    sim.wait_until(lambda: act.describe(EMBEDDED).phase == "starting" and any(
        "watch=" in p and "fieldSelector" in p for _, p in kube.requests), 30, "the start's watch")
    handle = act.slot_snapshot()[EMBEDDED]["handle"]
    started = time.monotonic()
    act.release(EMBEDDED)
    t.join(10)
    assert errors and isinstance(errors[0], WorkerNotReady) and "before it was ready" in errors[0].message
    assert handle.data["watch"]._released, "the start's watch was stopped and released, not left running"
    assert time.monotonic() - started < 5


def test_a_half_open_watch_is_abandoned_within_its_timeout(kube: FakeKube, sim: SimulatedKnative):
    act = actuator(kube)
    act.kn_effects.watch_grace_s = 0.5
    kube.hang_watches = True  # the watch connects, then goes silent forever
    import threading

    def heal() -> None:  # the service becomes ready meanwhile; only a fresh read can see it
        sim.wait_until(lambda: (kube.get_object(NS, SVC) or {}).get("status", {}).get("latestReadyRevisionName"),
                       30, "ready")
        kube.hang_watches = False

    threading.Thread(target=heal, daemon=True).start()
    started = time.monotonic()
    act.kn_effects.watch_window_s = 1
    act.ensure_ready(EMBEDDED).done()
    assert time.monotonic() - started < 10, "a silent watch is given up after its timeout, then read again"


def test_expired_watch_410_re_reads_and_still_sees_ready(kube: FakeKube, sim: SimulatedKnative):
    sim.behaviour[SVC] = "slow:10"
    kube.after_create = kube.compact  # the created object's resourceVersion expires at once
    act = actuator(kube)
    lease = act.ensure_ready(EMBEDDED)
    lease.done()
    assert act.describe(EMBEDDED).state == "ready"
    gets = [p for m, p in kube.requests if m == "GET" and p.endswith(f"/{SVC}")]
    assert gets, "after the 410 the actuator re-reads the Service before watching again"


def test_a_re_list_after_release_leaves_the_worker_cold(kube: FakeKube, sim: SimulatedKnative):
    first = actuator(kube)
    first.ensure_ready(EMBEDDED).done()
    first.release(EMBEDDED)
    assert kube.get_object(NS, SVC)["status"]["conditions"][0]["status"] == "True", "Knative still says Ready"
    restarted = actuator(kube)
    restarted.start()
    try:
        time.sleep(0.5)
        assert restarted.describe(EMBEDDED).state == "cold", "a released worker is not adopted as ready"
    finally:
        restarted.shutdown()


def test_a_ready_service_found_at_start_up_is_adopted(kube: FakeKube, sim: SimulatedKnative):
    first = actuator(kube)
    first.ensure_ready(EMBEDDED).done()
    restarted = actuator(kube)
    restarted.start()
    try:
        deadline = time.monotonic() + 10
        while restarted.describe(EMBEDDED).state != "ready":
            assert time.monotonic() < deadline, "the running worker should be adopted"
            time.sleep(0.05)
        assert restarted.ensure_ready(EMBEDDED).actuation.path == "warm"
    finally:
        restarted.shutdown()


def test_listing_uses_the_label_selector(kube: FakeKube, sim: SimulatedKnative):
    kube.put_object({"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                     "metadata": {"name": "unrelated", "namespace": NS, "labels": {"app": "x"}}, "spec": {}})
    act = actuator(kube)
    act.ensure_ready(EMBEDDED).done()
    names = [s["metadata"]["name"] for s in act.services()]
    assert names == [SVC]
    assert any(f"labelSelector={MANAGED_SELECTOR.replace('/', '%2F').replace('=', '%3D').replace(',', '%2C')}" in p
               or "labelSelector=app.kubernetes.io" in p for _, p in kube.requests)


def test_service_deleted_behind_our_back_is_noticed(kube: FakeKube, sim: SimulatedKnative):
    act = actuator(kube)
    act.start()
    act.ensure_ready(EMBEDDED).done()
    kube.delete_object(NS, SVC)
    deadline = time.monotonic() + 10
    while act.describe(EMBEDDED).state != "cold":
        assert time.monotonic() < deadline, "the background watch should mark the model cold"
        time.sleep(0.05)
    act.shutdown()


def test_the_role_grants_exactly_what_the_requester_uses(tmp_path: Path):
    """Every request the requester makes over a whole lifecycle is allowed by the Role, and every verb
    the Role grants is used by one of them."""
    from kube_fake import CRD_PATH, PATH

    kube = FakeKube(role=load_role(*RBAC)).start()
    sim = SimulatedKnative(kube, tmp_path, speed=SPEED)
    try:
        kube.put_object({"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                         "metadata": {"name": "fma-requester", "namespace": NS}, "spec": {}})
        act = actuator(kube)
        act.start()
        act.ensure_ready(EMBEDDED).done()
        act.sleep(EMBEDDED, 1)
        act.ensure_ready(EMBEDDED).done()  # wakes it
        act.release(EMBEDDED)
        act.ensure_ready(EMBEDDED).done()
        act.shutdown()
        deleting = actuator(kube, FMA_RELEASE_POLICY="delete")
        deleting.ensure_ready(EMBEDDED).done()
        deleting.release(EMBEDDED)
        sim.wait_until(lambda: not sim.pods(SVC) and deleting.describe(EMBEDDED).phase == "cold", 120,
                       "the release to follow the pods until they are gone")
        used: set[tuple[str, str]] = set()
        for method, path in kube.requests:
            plain, _, query = path.partition("?")
            if CRD_PATH.match(plain):
                used.add(("customresourcedefinitions", "get"))
                continue
            m = PATH.match(plain)
            assert m, path
            verb = {"GET": "watch" if "watch=true" in query.lower() else ("get" if m.group("name") else "list"),
                    "POST": "create", "PATCH": "patch", "DELETE": "delete"}[method]
            used.add((m.group("plural"), verb))
        granted = {(res, verb) for rule in load_role(*RBAC) for res in rule.resources for verb in rule.verbs}
        assert used == granted
    finally:
        sim.stop()
        kube.stop()


def _raises(fn):
    try:
        fn()
    except ApiError as exc:
        return exc
    return None


# ---- end to end: a requester process in knative mode ---------------------------------------

@pytest.mark.slow  # 45 s; make test-slow (CI time); the ladder is also climbed by tests/test_knative_ladder_process.py
@pytest.mark.process
def test_requester_in_knative_mode_climbs_the_whole_ladder_with_real_workers(kube: FakeKube, tmp_path: Path,
                                                                          converted_model_dir: Path):
    """The requester (gunicorn, gevent) finds the fake cluster through a kubeconfig and creates the worker
    Service; the simulator runs its pod as a real worker behind a simulated activator and queue-proxy. A
    streamed cold start gets keepalives before its first token; then a completion, a sleep, a wake (the
    same pod: no revision, no pod started), another completion, and a release."""
    import httpx
    import openai

    from conftest import requester, worker_state

    # The shipped worker template mounts the model cache claim: its flag on, as config-features.yaml asks.
    sim = SimulatedKnative(kube, tmp_path, cache_dir=converted_model_dir.parents[2], default="process", speed=10,
                           config=ClusterConfig(features={"kubernetes.podspec-persistent-volume-claim": "enabled"}),
                           claims={"fma-models": tmp_path / "fma-models"})
    kubeconfig = tmp_path / "kubeconfig"
    write_kubeconfig(kubeconfig, kube.url, namespace=NS)
    models = tmp_path / "models.yaml"
    # No GPU here: the model asks for none (a worker given one it cannot see would refuse to start).
    models.write_text(f"models:\n  - {{name: {EMBEDDED}, source: 'embedded:{EMBEDDED}', dtype: float32, "
                      "knative: {gpus: 0}}\n")
    # The shipped template: workers get FMA_WORKER_TOKEN from the Secret fma-keys, and answer only with it.
    template = tmp_path / "worker-template.yaml"
    template.write_text((REPO / "knative" / "base" / "worker-template.yaml").read_text())
    seed_requester(kube, "the-worker-token", service=False)
    try:
        with requester(tmp_path, models, FMA_ACTUATOR="knative", KUBECONFIG=str(kubeconfig), FMA_NAMESPACE=NS,
                       FMA_STREAM_KEEPALIVE="0.5s", FMA_WORKER_TEMPLATE=str(template),
                       FMA_WORKER_TOKEN="the-worker-token") as req:
            assert worker_state(req.spi)["state"] == "cold"
            lines: list[str] = []
            with httpx.stream("POST", f"{req.spi}/v1/completions", timeout=180, json={
                    "model": EMBEDDED, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0,
                    "stream": True}) as resp:
                assert resp.status_code == 200
                lines = [line for line in resp.iter_lines() if line]
            first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
            assert lines[0] == ": keepalive" and first_data > 0, "keepalives before the first token"
            assert any(line.startswith(": fma-actuation cold;") for line in lines[:first_data])
            assert lines[-1] == "data: [DONE]"
            client = openai.OpenAI(base_url=f"{req.spi}/v1", api_key="x", max_retries=0, timeout=180)
            chat = client.chat.completions.create(model=EMBEDDED, temperature=0, max_tokens=30, messages=[
                {"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
            assert "Paris" in chat.choices[0].message.content
            status = worker_state(req.spi)
            assert status["state"] == "ready" and status["backend"] == "knative"
            # The cold start's timeline, asked of the pod: its own boot and load phases (no spawn: another clock).
            steps = status["last_start"]["steps"]
            assert {"interpreter", "arbiter", "app", "import", "tokenizer", "weights", "total"} <= set(steps), steps
            assert "spawn" not in steps and steps["total"] > steps["import"] > 0, steps
            svc = kube.get_object(NS, SVC)
            assert svc["metadata"]["ownerReferences"][0]["name"] == "fma-requester"
            slept = httpx.post(f"{req.spi}/v1/workers/{EMBEDDED}/sleep", params={"level": 1}, timeout=60)
            assert slept.status_code == 200 and slept.json()["state"] == "sleeping", slept.text
            woke = httpx.post(f"{req.spi}/v1/completions", timeout=120, json={
                "model": EMBEDDED, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0})
            assert woke.status_code == 200 and woke.headers["X-FMA-Actuation"].startswith("wake;")
            assert woke.json()["choices"][0]["text"].startswith(", the city of Nova Haven")
            assert sim.revisions_created[SVC] == 1 and sim.pods_started[SVC] == 1, "sleep and wake kept the pod"
            (pod,) = sim.live_pods(SVC)
            assert httpx.post(f"{pod.url}/sleep").status_code == 401, "the real worker answers only with the token"
            released = httpx.delete(f"{req.spi}/v1/workers/{EMBEDDED}", timeout=30).json()
            assert released["state"] == "cold"
            sim.wait_until(lambda: not sim.live_pods(SVC), 200, "the released pod to go")
            assert sim.revisions_created[SVC] == 1 and sim.pods_started[SVC] == 1
            for pid in req.requester_pids():
                rss_kib = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text()
                                   .splitlines() if line.startswith("VmRSS")))
                assert rss_kib < 150 * 1024, f"requester process {pid} uses {rss_kib} KiB in knative mode"
    finally:
        sim.stop()


def test_lifecycle_events_reach_k_sink_as_cloudevents(kube: FakeKube, sim: SimulatedKnative):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from fma_requester.events import EmitterConfig, SinkEmitter

    received: list[dict[str, str]] = []
    got = threading.Event()

    class Sink(BaseHTTPRequestHandler):
        def log_message(self, *_a: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(202)
            self.end_headers()
            got.set()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        kn = KnativeSettings.from_env({"FMA_NAMESPACE": NS})
        act = KnativeActuator(registry(), RequesterMetrics(), kn, api=api_for(kube),
                              emit=SinkEmitter(EmitterConfig(f"http://127.0.0.1:{server.server_address[1]}")))
        act.ensure_ready(EMBEDDED).done()
        assert got.wait(10)
        event = received[0]
        assert event["ce-type"] == "ai.llm-d.fma.worker.started"
        assert event["ce-subject"] == EMBEDDED and event["ce-specversion"] == "1.0"
    finally:
        server.shutdown()


def test_sleep_of_an_unreachable_worker_is_a_502_not_a_crash(kube: FakeKube, sim: SimulatedKnative):
    from fma_common.errors import Conflict, UpstreamError

    act = actuator(kube)
    with pytest.raises(Conflict):
        act.sleep(EMBEDDED)  # cold: nothing to put to sleep
    act.ensure_ready(EMBEDDED).done()
    (pod,) = sim.live_pods(SVC)
    pod.standin.close()  # the pod now refuses connections
    with pytest.raises(UpstreamError) as info:
        act.sleep(EMBEDDED)
    assert info.value.status == 502
    assert act.describe(EMBEDDED).state == "ready"
    assert revision_annotations(kube, f"{SVC}-00001")["autoscaling.knative.dev/min-scale"] == "0", \
        "the sleep did not happen, so the pin is taken back"


def test_workers_run_the_requesters_own_registry_and_tag(kube: FakeKube, sim: SimulatedKnative):
    kube.update_object(NS, "fma-requester", lambda o: o.update(spec={"template": {"spec": {"containers": [
        {"name": "requester", "image": "registry.example.com/me/fma-requester:1.2.3"}]}}}))
    actuator(kube).ensure_ready(EMBEDDED).done()
    image = kube.get_object(NS, SVC)["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.com/me/fma-worker:1.2.3"
    explicit = actuator(kube, FMA_WORKER_IMAGE="other/worker:7")
    assert explicit.manifest(registry().get(EMBEDDED))["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "other/worker:7", "an explicit image wins"


def test_workers_sharing_the_requesters_gpu_are_governed_by_its_budget(kube: FakeKube, tmp_path: Path):
    """Two models on one shared GPU that fits one: the second puts the first to sleep, through its pod."""
    sim = SimulatedKnative(kube, tmp_path, speed=SPEED, config=ClusterConfig(features={
        "kubernetes.podspec-affinity": "enabled", "kubernetes.podspec-tolerations": "enabled"}))
    try:
        reg = ModelRegistry.from_text(
            "budget: {max_loaded: 2, sleepers: 1, memory_mib: 10000}\nmodels:\n"
            "  - {name: a, source: 'hf:org/a', memory_mib: 6000, sleep_memory_mib: 500,"
            " knative: {gpu_binding: shared}}\n"
            "  - {name: b, source: 'hf:org/b', memory_mib: 6000, sleep_memory_mib: 500,"
            " knative: {gpu_binding: shared}}\n")
        act = actuator(kube, reg=reg, NODE_NAME="gpu-node-1")
        act.ensure_ready("a").done()
        act.ensure_ready("b").done()
        assert act.describe("a").state == "sleeping" and act.describe("b").state == "ready"
        (pod_a,) = sim.live_pods("fma-worker-a")
        assert pod_a.standin.asleep, "a's pod itself was put to sleep"
        assert revision_annotations(kube, "fma-worker-a-00001")["autoscaling.knative.dev/min-scale"] == "1"
        svc = kube.get_object(NS, "fma-worker-b")["spec"]["template"]["spec"]
        assert svc["affinity"]["nodeAffinity"] and "nvidia.com/gpu" not in \
            svc["containers"][0]["resources"]["limits"], "placed beside the requester, asking for no GPU"
    finally:
        sim.stop()


def test_a_health_probe_asks_the_pod_itself_and_a_revision_at_zero_is_alive(kube: FakeKube, sim: SimulatedKnative):
    act = actuator(kube, reg=registry(knative="{max_scale: 1, scale_to_zero_retention: 0s}"))
    spec = registry().get(EMBEDDED)
    lease = act.ensure_ready(EMBEDDED)
    lease.done()
    (pod,) = sim.live_pods(SVC)
    assert act.kn_effects.probe(spec, lease.handle, 2.0)
    assert any(call.startswith("GET /health") for call in pod.standin.calls), "asked on the pod's own address"
    sim.wait_until(lambda: not sim.live_pods(SVC), 60 + 30, "Knative to scale the idle Revision to zero")
    assert act.kn_effects.probe(spec, lease.handle, 2.0), "no pod: the next request brings one up"


def test_a_pod_that_stops_answering_makes_the_worker_cold_after_a_failed_request(kube: FakeKube,
                                                                                 sim: SimulatedKnative):
    act = actuator(kube)
    lease = act.ensure_ready(EMBEDDED)
    lease.done()
    (pod,) = sim.live_pods(SVC)
    pod.standin.close()  # its Service still reads Ready: only the pod can say it is gone
    act.worker_unreachable(lease)
    deadline = time.monotonic() + 10
    while act.describe(EMBEDDED).state == "ready" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert act.describe(EMBEDDED).state != "ready"


def test_an_eviction_of_a_model_that_may_run_several_pods_releases_it(kube: FakeKube, sim: SimulatedKnative):
    reg = ModelRegistry.from_text(
        "budget: {max_loaded: 1, sleepers: 1}\nmodels:\n"
        "  - {name: a, source: 'hf:org/a', knative: {max_scale: 2}}\n"
        "  - {name: b, source: 'hf:org/b'}\n")
    act = actuator(kube, reg=reg)
    act.ensure_ready("a").done()
    act.ensure_ready("b").done()
    assert act.describe("a").state == "cold" and act.describe("b").state == "ready"
    assert revision_annotations(kube, "fma-worker-a-00001")["autoscaling.knative.dev/min-scale"] == "0"
    sim.wait_until(lambda: not sim.live_pods("fma-worker-a"), 120, "a's pods to go")
    assert sim.revisions_created["fma-worker-a"] == 1


@contextmanager
def hub_model_on_a_claim(kube: FakeKube, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                         cache: Path, gpus: int | None = None,
                         **sim_args: Any) -> Iterator[tuple[Any, KnativeActuator]]:
    """A stand-in hub serving ``acme/tiny`` (the real huggingface_hub client talks to it), a simulated cluster with
    the PVC flag on, a worker template naming the model cache claim, and an actuator whose model cache is
    ``cache``: (the hub, the actuator) for model ``tiny`` (``hf:acme/tiny``; ``gpus`` for its Knative block, the
    default if None)."""
    from hub_standin import HubStandIn, Repo

    # The fetch runs in a child process (model_cache._fetching), which reads these from the environment; an
    # earlier test may have left HF_HUB_OFFLINE=1 there (an in-process engine's runtime_env).
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub = HubStandIn({"acme/tiny": Repo.from_folder(tiny_model_dir)})
    url = hub.start()
    sim = SimulatedKnative(kube, tmp_path, config=ClusterConfig(features={
        "kubernetes.podspec-persistent-volume-claim": "enabled"}), **sim_args)
    template = tmp_path / "worker-template.yaml"
    template.write_text("model_cache_claim: fma-models\nmodel_cache_path: /var/cache/fma-models\n")
    knative = "" if gpus is None else f"knative: {{gpus: {gpus}}}, "
    reg = ModelRegistry.from_text(
        f"models:\n  - {{name: tiny, source: 'hf:acme/tiny', {knative}env: {{HF_ENDPOINT: '{url}'}}}}\n")
    kn = KnativeSettings.from_env({"FMA_NAMESPACE": NS, "FMA_KUBE_RETRIES": "4",
                                   "FMA_WORKER_TEMPLATE": str(template)})
    act = KnativeActuator(reg, RequesterMetrics(), kn, api=api_for(kube), hub_cache_dir=cache,
                          config=LifecycleConfig(restart_backoff_s=0.1))
    try:
        yield hub, act
    finally:
        act.shutdown()
        sim.stop()
        hub.stop()


def test_a_hub_model_is_fetched_into_the_claim_before_its_service_and_its_workers_mount_it_read_only(
        kube: FakeKube, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """Issue 26: with the model cache claim in the worker template, the requester fetches a hub model into it once
    (the stand-in hub, the real huggingface_hub client) before it creates the Service; the Service mounts the
    claim read-only where FMA_HUB_CACHE_DIR points; a second start after a release fetches nothing."""
    with hub_model_on_a_claim(kube, tmp_path, tiny_model_dir, monkeypatch, tmp_path / "models",
                              speed=SPEED) as (hub, act):
        act.ensure_ready("tiny").done()
        counts = hub.downloads("acme/tiny")
        assert counts and set(counts.values()) == {1}, counts
        assert (tmp_path / "models" / "hub" / "acme--tiny" / "refs" / "main").is_file()
        pod = kube.get_object(NS, worker_service_name("tiny"))["spec"]["template"]["spec"]
        assert {"name": "models", "persistentVolumeClaim": {"claimName": "fma-models", "readOnly": True}} \
            in pod["volumes"]
        (container,) = pod["containers"]
        assert {"name": "models", "mountPath": "/var/cache/fma-models", "readOnly": True} in container["volumeMounts"]
        assert {"name": "FMA_HUB_CACHE_DIR", "value": "/var/cache/fma-models"} in container["env"]
        assert act.release("tiny").state in ("cold", "stopping")
        asked = len(hub.requests)
        act.ensure_ready("tiny").done()
        assert len(hub.requests) == asked, "the second start reached the hub"


def test_a_worker_pod_loads_a_hub_model_from_the_claim_offline_and_leaves_it_as_it_was(
        kube: FakeKube, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """The pod as a real worker process (the simulator's kubelet mounts the claim at the template's path): it
    loads the model the requester fetched into the claim, offline, and writes nothing there."""
    claim = tmp_path / "claim"
    with hub_model_on_a_claim(kube, tmp_path, tiny_model_dir, monkeypatch, claim, gpus=0, default="process",
                              speed=10, claims={"fma-models": claim}) as (_hub, act):
        act.ensure_ready("tiny").done()
        listing = sorted((str(p), p.stat().st_mtime_ns) for p in claim.rglob("*"))
        logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
        assert f"loaded tiny from {claim}/hub/acme--tiny/" in logs, logs[-3000:]
        assert act.release("tiny").state in ("cold", "stopping")
        assert sorted((str(p), p.stat().st_mtime_ns) for p in claim.rglob("*")) == listing, "the pod wrote there"
