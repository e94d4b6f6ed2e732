"""The Knative simulator behaves like Knative: each test names the knative/serving file it mirrors.

These check the ground truth the requester's tests rely on, through the
real ``kubernetes`` client and the fake API server, at a simulated clock
that runs 100 times faster than wall time (a 60 s stable window takes 0.6 s).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from knative_sim import DRAIN_S, PA_REENQUEUE_S, SimulatedKnative
from knative_webhook import ClusterConfig
from kube_fake import FakeKube, load_role
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from conftest import REPO
from fma_requester.kube import custom_objects_api

NS = "sim"
GROUP, VERSION = "serving.knative.dev", "v1"
SPEED = 100.0


@pytest.fixture()
def kube() -> Iterator[FakeKube]:
    fake = FakeKube().start()
    yield fake
    fake.stop()


def make_sim(kube: FakeKube, tmp_path: Path, **kw) -> SimulatedKnative:
    return SimulatedKnative(kube, tmp_path, speed=kw.pop("speed", SPEED), **kw)


@pytest.fixture()
def sim(kube: FakeKube, tmp_path: Path) -> Iterator[SimulatedKnative]:
    s = make_sim(kube, tmp_path)
    yield s
    s.stop()


@pytest.fixture()
def slow_sim(kube: FakeKube, tmp_path: Path) -> Iterator[SimulatedKnative]:
    """20 simulated s per real s: ticks of 0.4 simulated s, fine enough to time a backoff or a window."""
    s = make_sim(kube, tmp_path, speed=20.0)
    yield s
    s.stop()


@pytest.fixture()
def api(kube: FakeKube) -> client.CustomObjectsApi:
    return custom_objects_api(client.Configuration(host=kube.url))


def service(name: str = "w", *, annotations: dict | None = None, spec: dict | None = None,
            meta_annotations: dict | None = None) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Service",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "fma-requester"},
                         **({"annotations": meta_annotations} if meta_annotations else {})},
            "spec": {"template": {"metadata": {"annotations": {
                "autoscaling.knative.dev/min-scale": "0", "autoscaling.knative.dev/max-scale": "1",
                "autoscaling.knative.dev/target-burst-capacity": "-1", **(annotations or {})}},
                "spec": {"timeoutSeconds": 600, "containers": [
                    {"image": "worker:1", "ports": [{"containerPort": 8080}],
                     "readinessProbe": {"httpGet": {"path": "/ready"}, "periodSeconds": 1}}], **(spec or {})}}}}


def create(api: client.CustomObjectsApi, body: dict) -> dict:
    return api.create_namespaced_custom_object(GROUP, VERSION, NS, "services", body)


def patch(api: client.CustomObjectsApi, name: str, body: dict, plural: str = "services") -> dict:
    return api.patch_namespaced_custom_object(GROUP, VERSION, NS, plural, name, body)


def svc_status(kube: FakeKube, name: str = "w") -> dict:
    return (kube.get_object(NS, name) or {}).get("status") or {}


def ready(kube: FakeKube, name: str = "w") -> str | None:
    return next((c["status"] for c in svc_status(kube, name).get("conditions", []) if c["type"] == "Ready"), None)


def rejected(api: client.CustomObjectsApi, body: dict) -> str:
    """The message of the API server's Status for a create the webhook denies."""
    with pytest.raises(ApiException) as info:
        create(api, body)
    assert info.value.status == 400
    status = json.loads(info.value.body)
    assert status["kind"] == "Status" and status["reason"] == "BadRequest" and status["code"] == 400
    return status["message"]


# ---- revisions ------------------------------------------------------------------------------------

def test_each_template_generation_is_one_revision_named_after_the_service(kube, sim, api):
    """pkg/reconciler/configuration/configuration.go, resources/revision.go (MakeRevision)."""
    create(api, service())
    sim.wait_until(lambda: ready(kube) == "True", 30, "the first revision to be ready")
    status = svc_status(kube)
    assert status["latestCreatedRevisionName"] == status["latestReadyRevisionName"] == "w-00001"
    assert status["traffic"] == [{"revisionName": "w-00001", "latestRevision": True, "percent": 100}]
    rev = kube.get_object(NS, "w-00001", plural="revisions")
    assert rev["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] == "0", "template annotations copied"
    assert rev["metadata"]["labels"]["serving.knative.dev/service"] == "w"
    patch(api, "w", {"metadata": {"labels": {"team": "x"}, "annotations": {"note": "metadata only"}}})
    time.sleep(0.2)
    assert sim.revisions_created["w"] == 1, "a change of the Service's own metadata makes no revision"
    patch(api, "w", {"spec": {"template": {"metadata": {"annotations": {"autoscaling.knative.dev/min-scale": "0",
                                                                        "x": "y"}}}}})
    sim.wait_until(lambda: svc_status(kube).get("latestReadyRevisionName") == "w-00002", 30, "revision 2")
    assert sim.revisions_created["w"] == 2, "any change under spec.template, annotations included, is a revision"


def test_a_new_revision_starts_one_pod_even_with_min_scale_zero_then_scales_to_zero(kube, sim, api):
    """deploy.go (Deployment replicas = initial-scale, 1), kpa/scaler.go (stable window, then retention)."""
    create(api, service(annotations={"autoscaling.knative.dev/scale-to-zero-pod-retention-period": "30s"}))
    sim.wait_until(lambda: sim.pods_started.get("w") == 1, 10, "the initial pod")
    sim.wait_until(lambda: ready(kube) == "True", 30, "ready")
    ready_at = sim.clock.now()
    sim.wait_until(lambda: not sim.live_pods("w"), 200, "scale to zero without traffic")
    # 60 s stable window + 30 s retention, give or take the ticks.
    assert 85 <= sim.clock.now() - ready_at <= 110
    assert ready(kube) == "True", "a revision scaled to zero is still Ready"


def test_initial_scale_zero_is_refused_unless_the_cluster_allows_it(kube, tmp_path, api):
    """pkg/apis/autoscaling/annotation_validation.go (validateInitialScale)."""
    sim = make_sim(kube, tmp_path)
    try:
        body = service(annotations={"autoscaling.knative.dev/initial-scale": "0"})
        assert "initial-scale=0 not allowed by cluster" in rejected(api, body)
    finally:
        sim.stop()
    allowing = make_sim(kube, tmp_path, config=ClusterConfig(allow_zero_initial_scale=True))
    try:
        create(api, service(annotations={"autoscaling.knative.dev/initial-scale": "0"}))
        allowing.wait_until(lambda: "w-00001" in allowing.revisions, 10, "the revision")
        time.sleep(0.3)
        assert allowing.pods_started.get("w", 0) == 0
    finally:
        allowing.stop()


def test_revision_annotations_change_scale_bounds_without_a_new_revision(kube, sim, api):
    """reconcile_resources.go (syncAnnotationsForKPA: "setting these annotations on the Revision is the source of
    truth"), resources/pa.go; revision_validation.go (a Revision's metadata is mutable)."""
    create(api, service())
    sim.wait_until(lambda: ready(kube) == "True", 30, "ready")
    patch(api, "w-00001", {"metadata": {"annotations": {"autoscaling.knative.dev/min-scale": "1"}}}, "revisions")
    time.sleep(sim.clock.real(120))
    assert len(sim.live_pods("w")) == 1, "min-scale 1 on the Revision keeps its pod past the stable window"
    patch(api, "w-00001", {"metadata": {"annotations": {
        "autoscaling.knative.dev/min-scale": "0",
        "autoscaling.knative.dev/scale-to-zero-pod-retention-period": "0s"}}}, "revisions")
    sim.wait_until(lambda: not sim.live_pods("w"), 100, "scale to zero once the bound is lifted")
    assert sim.revisions_created["w"] == 1 and sim.pods_started["w"] == 1


def test_a_revision_spec_is_immutable_its_annotations_are_validated(kube, sim, api):
    """pkg/apis/serving/v1/revision_validation.go (Revision.Validate)."""
    create(api, service())
    sim.wait_until(lambda: "w-00001" in sim.revisions, 10, "the revision")
    with pytest.raises(ApiException) as info:
        patch(api, "w-00001", {"spec": {"timeoutSeconds": 30}}, "revisions")
    assert info.value.status == 400 and "Immutable fields changed" in str(info.value.body)
    with pytest.raises(ApiException) as info:
        patch(api, "w-00001", {"metadata": {"annotations": {"autoscaling.knative.dev/min-scale": "5"}}}, "revisions")
    assert "max-scale=1 is less than min-scale=5" in str(info.value.body)


# ---- the data path -----------------------------------------------------------------------------------

class Upstream:
    """A worker stand-in behind the simulated queue-proxy: scripted readiness and answers."""

    def __init__(self) -> None:
        self.is_ready = True
        self.delay_headers = 0.0  # real seconds before the response starts
        self.chunks = 3
        self.chunk_gap = 0.0  # real seconds between chunks
        self.hits = 0
        up = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a: object) -> None:
                pass

            def do_GET(self) -> None:
                code = 200 if up.is_ready else 503
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                up.hits += 1
                time.sleep(up.delay_headers)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for i in range(up.chunks):
                        data = f"data: {i}\n\n".encode()
                        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                        self.wfile.flush()
                        time.sleep(up.chunk_gap)
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def upstream() -> Iterator[Upstream]:
    u = Upstream()
    yield u
    u.close()


def route(sim: SimulatedKnative) -> str:
    url = sim.route_url("w")
    assert url
    return url


def test_the_activator_buffers_a_request_while_the_revision_scales_from_zero(kube, sim, api, upstream):
    """pkg/activator (buffering), kpa/scaler.go (traffic at zero scales up)."""
    sim.behaviour["w"] = f"upstream:{upstream.url}"
    create(api, service())
    sim.wait_until(lambda: ready(kube) == "True", 30, "ready")
    sim.wait_until(lambda: not sim.live_pods("w"), 200, "scale to zero")
    started = sim.pods_started["w"]
    resp = httpx.post(f"{route(sim)}/v1/completions", json={}, timeout=30)
    assert resp.status_code == 200 and resp.text.count("data:") == 3
    assert sim.pods_started["w"] == started + 1, "the buffered request started one pod"


def test_the_activator_answers_504_past_the_revisions_timeout(kube, sim, api, upstream):
    """cmd/activator/main.go (the activator's handler is wrapped in the revision's timeoutSeconds)."""
    sim.behaviour["w"] = f"upstream:{upstream.url}"
    create(api, service(spec={"timeoutSeconds": 120}))
    sim.wait_until(lambda: ready(kube) == "True", 30, "ready")
    sim.wait_until(lambda: not sim.live_pods("w"), 200, "scale to zero")
    upstream.is_ready = False  # the next pod never passes its readiness probe
    t0 = time.monotonic()
    resp = httpx.post(f"{route(sim)}/v1/completions", json={}, timeout=30)
    assert resp.status_code == 504 and resp.text == "activator request timeout"
    assert sim.clock.real(110) <= time.monotonic() - t0 <= sim.clock.real(120) + 2
    assert upstream.hits == 0


def test_queue_proxy_cuts_a_stream_at_timeout_seconds(kube, sim, api, upstream):
    """pkg/http/handler/timeout.go timeoutAndWriteError, cmd/activator/main.go (a total cap, even mid-stream: the
    timeout text ends the body)."""
    sim.behaviour["w"] = f"upstream:{upstream.url}"
    upstream.chunks, upstream.chunk_gap = 50, 0.1  # 5 real s = 500 sim s of streaming
    create(api, service(spec={"timeoutSeconds": 100}))
    sim.wait_until(lambda: ready(kube) == "True", 30, "ready")
    with httpx.stream("POST", f"{route(sim)}/v1/completions", json={}, timeout=30) as resp:
        assert resp.status_code == 200
        body = b"".join(resp.iter_raw())
    assert body.endswith(b"activator request timeout"), "after the headers the text ends the body"
    assert body.count(b"data:") < 50, "cut short"


def test_no_response_start_within_its_timeout_is_a_504(kube, sim, api, upstream):
    """pkg/http/handler/timeout.go (responseStartTimeoutSeconds)."""
    sim.behaviour["w"] = f"upstream:{upstream.url}"
    upstream.delay_headers = 1.0  # 100 sim s
    create(api, service(spec={"timeoutSeconds": 600, "responseStartTimeoutSeconds": 30}))
    sim.wait_until(lambda: ready(kube) == "True", 30, "ready")
    resp = httpx.post(f"{route(sim)}/v1/completions", json={}, timeout=30)
    assert resp.status_code == 504


def test_a_pod_that_fails_its_readiness_probe_gets_no_requests(kube, sim, api, upstream):
    """The route and activator forward only to ready pods (readiness probe on the user container)."""
    sim.behaviour["w"] = f"upstream:{upstream.url}"
    create(api, service(annotations={"autoscaling.knative.dev/min-scale": "1"}))
    sim.wait_until(lambda: ready(kube) == "True", 30, "ready")
    upstream.is_ready = False
    sim.wait_until(lambda: not any(p.ready for p in sim.live_pods("w")), 30, "the probe to fail")
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(httpx.post(f"{route(sim)}/x", json={}, timeout=30).status_code))
    t.start()
    time.sleep(0.5)
    assert upstream.hits == 0 and not got, "held in the activator while the only pod is not ready"
    upstream.is_ready = True
    t.join(30)
    assert got == [200] and upstream.hits == 1


# ---- failures ---------------------------------------------------------------------------------------

def test_an_unschedulable_pod_fails_the_service_until_it_schedules(kube, sim, api):
    """reconcile_resources.go (reconcileDeployment: PodScheduled=False marks ResourcesAvailable=False at once),
    configuration_lifecycle.go (MarkLatestCreatedFailed)."""
    sim.behaviour["w"] = "unschedulable:60"  # the node pool takes a minute to scale up
    create(api, service())
    sim.wait_until(lambda: ready(kube) == "False", 30, "the Service to report it")
    conds = {c["type"]: c for c in svc_status(kube)["conditions"]}
    assert conds["Ready"]["reason"] == "RevisionMissing", "the route's word is the Service's (condition_set.go)"
    assert conds["ConfigurationsReady"]["reason"] == "RevisionFailed"
    assert conds["ConfigurationsReady"]["message"].startswith(
        'Revision "w-00001" failed with message: 0/3 nodes are available')
    rev = kube.get_object(NS, "w-00001", plural="revisions")
    ra = next(c for c in rev["status"]["conditions"] if c["type"] == "ResourcesAvailable")
    assert ra["status"] == "False" and ra["reason"] == "Unschedulable"
    sim.wait_until(lambda: ready(kube) == "True", 120, "ready once the pod is scheduled")


def test_a_container_that_exits_fails_the_revision(kube, sim, api):
    """revision_lifecycle.go (ExitCodeReason, RevisionContainerExitingMessage)."""
    sim.behaviour["w"] = "fail"
    create(api, service())
    sim.wait_until(lambda: ready(kube) == "False", 30, "the failure")
    cond = next(c for c in svc_status(kube)["conditions"] if c["type"] == "ConfigurationsReady")
    assert cond["reason"] == "RevisionFailed" and "Container failed with:" in cond["message"]


def test_no_ready_pod_within_the_progress_deadline_fails_the_revision(kube, sim, api):
    """revision_lifecycle.go (ProgressDeadlineExceeded: "Initial scale was never achieved")."""
    sim.behaviour["w"] = "slow:100000"
    create(api, service(annotations={"serving.knative.dev/progress-deadline": "120s"}))
    sim.wait_until(lambda: ready(kube) == "False", 200, "the deadline")
    rev = kube.get_object(NS, "w-00001", plural="revisions")
    ra = next(c for c in rev["status"]["conditions"] if c["type"] == "ResourcesAvailable")
    assert ra["reason"] == "ProgressDeadlineExceeded"
    sim.wait_until(lambda: not sim.live_pods("w"), 30, "the pods to be given up")


# ---- the webhook --------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"meta_annotations": {"autoscaling.knative.dev/min-scale": "1"}},
     'invalid key name "autoscaling.knative.dev/min-scale"'),
    ({"annotations": {"autoscaling.knative.dev/min-scale": "3"}}, "max-scale=1 is less than min-scale=3"),
    ({"annotations": {"autoscaling.knative.dev/scale-to-zero-pod-retention-period": "2h"}},
     "expected 0s <= 2h <= 1h0m0s"),
    ({"annotations": {"autoscaling.knative.dev/scale-to-zero-pod-retention-period": "5 minutes"}},
     "invalid value: 5 minutes"),
    ({"annotations": {"serving.knative.dev/progress-deadline": "1.5s"}}, "is not at second precision"),
    ({"spec": {"timeoutSeconds": 700}}, "expected 0 <= 700 <= 600: spec.template.spec.timeoutSeconds"),
    ({"spec": {"containerConcurrency": 1001}}, "expected 0 <= 1001 <= 1000"),
    ({"spec": {"nodeSelector": {"kubernetes.io/hostname": "n1"}}},
     "must not set the field(s): spec.template.spec.nodeSelector"),
    ({"spec": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}},
     "must not set the field(s): spec.template.spec.tolerations"),
    ({"spec": {"automountServiceAccountToken": True}}, "spec.template.spec.automountServiceAccountToken"),
])
def test_the_webhook_refuses_what_knative_refuses(kube, sim, api, change, message):
    """metadata_validation.go, annotation_validation.go, revision_validation.go, fieldmask.go (PodSpecMask)."""
    body = rejected(api, service(**change))
    assert message in body
    assert body.startswith('admission webhook "validation.webhook.serving.knative.dev" denied the request: '
                           'validation failed: '), "the API server's wording (webhook/errors/statuserror.go)"


@pytest.mark.parametrize("env, message", [
    ([{"name": "PORT", "value": "1"}], '"PORT" is a reserved environment variable'),
    ([{"name": "K_REVISION", "value": "1"}], '"K_REVISION" is a reserved environment variable'),
    ([{"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
     "must not set the field(s): spec.template.spec.containers[0].env[0].valueFrom.fieldRef"),
])
def test_the_webhook_refuses_reserved_and_gated_env(kube, sim, api, env, message):
    """k8s_validation.go (reservedEnvVars, validateEnvValueFrom), fieldmask.go (EnvVarSourceMask)."""
    body = service()
    body["spec"]["template"]["spec"]["containers"][0]["env"] = env
    assert message in rejected(api, body)


def test_feature_flags_allow_the_gated_fields(kube, tmp_path, api):
    """pkg/apis/config/features.go: kubernetes.podspec-nodeselector, -tolerations, -fieldref."""
    sim = make_sim(kube, tmp_path, config=ClusterConfig(features={
        "kubernetes.podspec-nodeselector": "enabled", "kubernetes.podspec-tolerations": "enabled",
        "kubernetes.podspec-fieldref": "enabled"}))
    try:
        body = service(spec={"nodeSelector": {"kubernetes.io/hostname": "n1"},
                             "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]})
        body["spec"]["template"]["spec"]["containers"][0]["env"] = [
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
        assert create(api, body)["metadata"]["generation"] == 1
    finally:
        sim.stop()


# ---- the API server -------------------------------------------------------------------------------------

def test_the_api_server_enforces_the_requesters_role(tmp_path: Path):
    """RBAC: a verb the Role does not grant is a 403 with the API server's message."""
    fake = FakeKube(role=load_role(REPO / "knative" / "base" / "role.yaml")).start()
    try:
        api = custom_objects_api(client.Configuration(host=fake.url))
        create(api, service())
        with pytest.raises(ApiException) as info:
            api.delete_namespaced_custom_object(GROUP, VERSION, NS, "revisions", "w-00001")
        assert info.value.status == 403
        assert 'cannot delete resource "revisions"' in json.loads(info.value.body)["message"]
        with pytest.raises(ApiException) as info:
            api.list_namespaced_custom_object(GROUP, VERSION, NS, "revisions")
        assert info.value.status == 403
    finally:
        fake.stop()


def test_a_half_open_watch_sends_headers_then_nothing(kube):
    """What a client must survive: the fake can leave a watch open and silent."""
    kube.hang_watches = True
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=httpx.Timeout(1.0)) as http, \
            http.stream("GET", f"{kube.url}/apis/{GROUP}/{VERSION}/namespaces/{NS}/services",
                        params={"watch": "true", "timeoutSeconds": "1"}) as resp:
        assert resp.status_code == 200
        for _ in resp.iter_raw():
            pass


# ---- the PodAutoscaler: activation, the stable window, the drain ------------------------------------

def pod_object(kube: FakeKube, name: str) -> dict | None:
    return kube.get_object(NS, name, plural="pods")


def revision_condition(kube: FakeKube, name: str, kind: str) -> dict:
    rev = kube.get_object(NS, name, plural="revisions") or {}
    return next((c for c in (rev.get("status") or {}).get("conditions", []) if c["type"] == kind), {})


def test_an_idle_ready_pod_goes_a_stable_window_after_its_last_request_then_drains_30_s(kube, slow_sim, api,
                                                                                       upstream):
    """pkg/autoscaler/scaling/autoscaler.go (Scale: the stable window's average), kpa/scaler.go (handleScaleToZero:
    active for the stable window -> inactive -> the fast path 3 s later, the activator being in the path), then
    resources/deploy.go + pkg/queue/sharedmain/main.go (the preStop waits for queue-proxy's 30 s drain)."""
    sim = slow_sim
    sim.behaviour["w"] = f"upstream:{upstream.url}"
    create(api, service(annotations={"autoscaling.knative.dev/scale-to-zero-pod-retention-period": "0s"}))
    sim.wait_until(lambda: ready(kube) == "True", 30, "ready")
    time.sleep(sim.clock.real(70))  # active for longer than the stable window already
    assert httpx.post(f"{route(sim)}/x", json={}, timeout=30).status_code == 200
    last = sim.clock.now()
    (pod,) = sim.live_pods("w")
    sim.wait_until(lambda: pod.deleting, 200, "the scale-down")
    terminated = sim.clock.now() - last
    assert 60 <= terminated <= 60 + PA_REENQUEUE_S + 3, terminated
    assert pod_object(kube, pod.name)["metadata"].get("deletionTimestamp"), "terminating: still there"
    sim.wait_until(lambda: pod.gone, 60, "the drain")
    assert DRAIN_S - 3 <= sim.clock.now() - last - terminated <= DRAIN_S + 3
    assert pod_object(kube, pod.name) is None


def test_a_pod_that_stops_being_ready_keeps_its_pa_activating_until_the_progress_deadline(kube, sim, api, upstream):
    """kpa.go (computeActiveCondition: ready < minReady -> Activating), kpa/scaler.go (handleScaleToZero: an
    activating PA is not scaled to zero before CanFailActivation), pa_lifecycle.go (progress deadline + 30 s since
    activation began). This is why a sleeping worker must stay ready: a release would leave its pod this long."""
    sim.behaviour["w"] = f"upstream:{upstream.url}"
    create(api, service(annotations={"autoscaling.knative.dev/min-scale": "1",
                                     "serving.knative.dev/progress-deadline": "120s"}))
    sim.wait_until(lambda: ready(kube) == "True", 30, "ready")
    upstream.is_ready = False  # e.g. a worker whose readiness meant "awake", put to sleep
    sim.wait_until(lambda: revision_condition(kube, "w-00001", "Active").get("status") == "Unknown", 30,
                   "the PA to be activating")
    began = sim.clock.now()
    assert ready(kube) == "True", "revision_lifecycle.go: PA Active is not part of the Revision's readiness"
    patch(api, "w-00001", {"metadata": {"annotations": {
        "autoscaling.knative.dev/min-scale": "0",
        "autoscaling.knative.dev/scale-to-zero-pod-retention-period": "0s"}}}, "revisions")
    time.sleep(sim.clock.real(100))
    assert sim.live_pods("w"), "released, but kept: the PA is activating"
    sim.wait_until(lambda: not sim.live_pods("w"), 200, "the activation to time out")
    assert 120 + 30 - 3 <= sim.clock.now() - began <= 120 + 30 + 5


# ---- the kubelet: restarts, Secrets ---------------------------------------------------------------

def test_a_crashed_container_restarts_in_the_same_pod_with_the_kubelets_backoff(kube, slow_sim, api):
    """pkg/kubelet/kuberuntime/kuberuntime_manager.go (doBackOff), pkg/kubelet/kubelet.go (backOffPeriod 10 s,
    MaxContainerBackOff 5 min): the first restart at once, then 10 s, 20 s...; restartCount and lastState."""
    sim = slow_sim
    create(api, service(annotations={"autoscaling.knative.dev/min-scale": "1"}))
    sim.wait_until(lambda: ready(kube) == "True", 30, "ready")
    (pod,) = sim.live_pods("w")
    address = pod.url
    sim.crash(pod, again=True)
    starts: list[float] = []
    for restarts in (1, 2, 3):
        sim.wait_until(lambda n=restarts: pod.restarts >= n and pod.state == "running", 200, f"restart {restarts}")
        starts.append(pod.started_at)
    assert 9 <= starts[1] - starts[0] - 1 <= 12 and 19 <= starts[2] - starts[1] - 1 <= 22, starts
    assert pod.url == address and sim.pods_started["w"] == 1, "the same pod, at the same address"
    obj = pod_object(kube, pod.name)
    user = obj["status"]["containerStatuses"][0]
    assert user["restartCount"] >= 3 and user["lastState"]["terminated"]["exitCode"] == 1


def test_a_container_whose_secret_is_missing_waits_with_create_container_config_error(kube, sim, api):
    """pkg/kubelet/kubelet_pods.go (makeEnvironmentVariables: secretKeyRef resolved, else the container does not
    start); the pod gets the value once the Secret exists."""
    env = [{"name": "FMA_WORKER_TOKEN", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "worker-token"}}}]
    body = service()
    body["spec"]["template"]["spec"]["containers"][0]["env"] = env
    create(api, body)
    sim.wait_until(lambda: sim.live_pods("w") and sim.live_pods("w")[0].reason == "CreateContainerConfigError", 30,
                   "the container to wait")
    (pod,) = sim.live_pods("w")
    assert pod.message == 'secret "keys" not found' and not pod.ready
    kube.put_object({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys", "namespace": NS},
                     "data": {"worker-token": "czNjcjN0"}}, plural="secrets")  # "s3cr3t"
    sim.wait_until(lambda: ready(kube) == "True", 30, "ready once the Secret is there")
    assert pod.standin.token == "s3cr3t"


def test_the_stand_in_worker_checks_the_token_and_answers_like_the_worker(kube, sim, api):
    """fma_worker/app.py: probes open, the rest needs the token; /loaded ready awake or asleep, /ready only awake;
    a completion while asleep is a 503 worker_sleeping."""
    kube.put_object({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys", "namespace": NS},
                     "data": {"worker-token": "czNjcjN0"}}, plural="secrets")
    body = service(annotations={"autoscaling.knative.dev/min-scale": "1"})
    container = body["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": "FMA_WORKER_TOKEN",
                         "valueFrom": {"secretKeyRef": {"name": "keys", "key": "worker-token"}}}]
    container["readinessProbe"] = {"httpGet": {"path": "/loaded"}, "periodSeconds": 1}
    create(api, body)
    sim.wait_until(lambda: ready(kube) == "True", 30, "ready")
    (pod,) = sim.live_pods("w")
    auth = {"Authorization": "Bearer s3cr3t"}
    assert httpx.post(f"{pod.url}/sleep").status_code == 401 and pod.standin.refused == ["POST /sleep"]
    assert httpx.post(f"{pod.url}/sleep", headers=auth).status_code == 200
    assert httpx.get(f"{pod.url}/loaded").status_code == 200 and httpx.get(f"{pod.url}/ready").status_code == 503
    assert httpx.get(f"{pod.url}/is_sleeping", headers=auth).json() == {"is_sleeping": True}
    time.sleep(sim.clock.real(5))
    assert pod.ready, "probed on /loaded: ready while asleep"
    answer = httpx.post(f"{route(sim)}/v1/completions", json={}, headers=auth, timeout=30)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "worker_sleeping"


# ---- revision conditions that stick ----------------------------------------------------------------

def test_container_healthy_false_sticks_until_a_pod_is_ready_and_after_a_scale_to_zero(kube, sim, api):
    """reconcile_resources.go (reconcileDeployment: lastState.terminated with replicas > 0 and none available ->
    ContainerHealthy=False; only ReadyReplicas > 0 clears it), configuration.go (the latest ready revision stays
    latest ready; the Configuration goes Ready=False), route.go (a bad target is marked, traffic keeps going)."""
    create(api, service(annotations={"serving.knative.dev/progress-deadline": "30s"}))
    sim.wait_until(lambda: ready(kube) == "True", 30, "ready")
    (pod,) = sim.live_pods("w")
    sim.crash(pod)  # once: it restarts and loads again
    sim.wait_until(lambda: revision_condition(kube, "w-00001", "ContainerHealthy").get("status") == "False", 30,
                   "ContainerHealthy=False while no pod is available")
    assert revision_condition(kube, "w-00001", "ContainerHealthy")["reason"] == "ExitCode137"
    assert ready(kube) == "False"
    sim.wait_until(lambda: ready(kube) == "True", 60, "cleared by a ready replica")
    assert pod.restarts == 1 and pod_object(kube, pod.name)["status"]["containerStatuses"][0]["lastState"]
    sim.crash(pod, again=True)  # now a crash loop: the PA activates, times out, scales to zero
    sim.wait_until(lambda: not sim.pods("w"), 400, "the activation timeout and the drain")
    time.sleep(sim.clock.real(30))
    health = revision_condition(kube, "w-00001", "ContainerHealthy")
    assert health["status"] == "False", "no pod left to clear it: it sticks"
    status = svc_status(kube)
    assert ready(kube) == "False" and status["latestReadyRevisionName"] == "w-00001"
    ready_cond = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready_cond["reason"] == "RevisionMissing", "the route's word: its target failed"
    assert ready_cond["message"] == 'Revision "w-00001" failed to become ready.'


def test_a_revision_that_never_initialized_says_initial_scale_was_never_achieved(kube, sim, api):
    """revision_lifecycle.go (PropagateAutoscalerStatus: inactive before the scale target initialized)."""
    sim.behaviour["w"] = "slow:100000"
    create(api, service(annotations={"serving.knative.dev/progress-deadline": "60s"}))
    sim.wait_until(lambda: sim.pods_started.get("w"), 30, "the pod")
    sim.wait_until(lambda: not sim.pods("w"), 200, "the activation to time out")
    ra = revision_condition(kube, "w-00001", "ResourcesAvailable")
    assert ra["status"] == "False" and ra["message"] == "Initial scale was never achieved"


# ---- the API server's defaults, the release, older releases -------------------------------------------

def test_a_service_is_stored_as_the_defaulting_webhook_leaves_it(kube, sim, api):
    """revision_defaults.go (RevisionSpec.SetDefaults), route_defaults.go (traffic), metadata_validation.go
    (SetUserInfo: creator, and lastModifier only when the spec changes)."""
    created = create(api, service())
    stored = kube.get_object(NS, "w")
    assert created["spec"] == stored["spec"], "the create's answer is the stored object"
    spec = stored["spec"]["template"]["spec"]
    assert stored["spec"]["traffic"] == [{"latestRevision": True, "percent": 100}]
    assert spec["containerConcurrency"] == 0 and spec["enableServiceLinks"] is False
    (container,) = spec["containers"]
    assert container["name"] == "user-container"
    assert container["readinessProbe"] == {"httpGet": {"path": "/ready"}, "periodSeconds": 1, "successThreshold": 1,
                                           "failureThreshold": 3, "timeoutSeconds": 1}
    ann = stored["metadata"]["annotations"]
    assert ann["serving.knative.dev/creator"] == ann["serving.knative.dev/lastModifier"]
    patch(api, "w", {"metadata": {"labels": {"team": "x"}}})
    assert kube.get_object(NS, "w")["metadata"]["annotations"] == ann, "no spec change: no new modifier"


def test_the_serving_crd_carries_the_release_and_rbac_can_name_it(kube, tmp_path):
    """hack/generate-yamls.sh (app.kubernetes.io/version: devel -> the release); RBAC resourceNames."""
    from kube_fake import Rule

    sim = make_sim(kube, tmp_path, config=ClusterConfig(serving_version="1.20.3"))
    try:
        ext = client.ApiextensionsV1Api(client.ApiClient(client.Configuration(host=kube.url)))
        crd = ext.read_custom_resource_definition("services.serving.knative.dev", _preload_content=False)
        assert json.loads(crd.data)["metadata"]["labels"]["app.kubernetes.io/version"] == "1.20.3"
        kube.role = [Rule(frozenset({"apiextensions.k8s.io"}), frozenset({"customresourcedefinitions"}),
                          frozenset({"get"}), frozenset({"services.serving.knative.dev"}))]
        with pytest.raises(ApiException) as info:
            ext.read_custom_resource_definition("revisions.serving.knative.dev")
        assert info.value.status == 403
    finally:
        sim.stop()


def test_before_1_21_a_revision_annotation_change_rolls_a_new_pod_and_never_reaches_the_pa(kube, tmp_path, api):
    """knative-v1.20.0 resources/meta.go (makeAnnotations: every Revision annotation on the pod template),
    reconcile_resources.go (reconcilePA compares the spec only; MakePA copied the annotations at creation)."""
    sim = make_sim(kube, tmp_path, config=ClusterConfig(serving_version="1.20.3"))
    try:
        create(api, service())
        sim.wait_until(lambda: ready(kube) == "True", 30, "ready")
        (first,) = sim.live_pods("w")
        patch(api, "w-00001", {"metadata": {"annotations": {"autoscaling.knative.dev/min-scale": "1"}}}, "revisions")
        sim.wait_until(lambda: first.deleting, 60, "the rollout to replace the pod")
        assert sim.pods_started["w"] == 2, "a surge pod first, then the old one goes: the model loads again"
        assert sim.revisions_created["w"] == 1
        sim.wait_until(lambda: not sim.live_pods("w"), 200, "the idle revision to scale to zero anyway")
        # min-scale 1 on the Revision never reached its PA: it scaled to zero as created (min-scale 0).
    finally:
        sim.stop()


def test_the_service_says_the_routes_reason_and_the_revision_says_why(kube, sim, api):
    """service.go propagates ConfigurationsReady then RoutesReady through knative.dev/pkg's condition set
    (condition_set.go: the last dependent marked False names Ready), route_lifecycle.go MarkConfigurationFailed;
    reconcile_resources.go puts the container's termination message in the Revision; with
    terminationMessagePolicy FallbackToLogsOnError the kubelet makes the log's tail that message."""
    sim.behaviour["w"] = "fail"
    body = service()
    body["spec"]["template"]["spec"]["containers"][0]["terminationMessagePolicy"] = "FallbackToLogsOnError"
    create(api, body)
    sim.wait_until(lambda: ready(kube) == "False", 30, "the failure")
    assert httpx.post(f"{route(sim)}/x", json={}, timeout=5).status_code == 404, "no route programmed yet"
    conds = {c["type"]: c for c in svc_status(kube)["conditions"]}
    assert conds["Ready"]["reason"] == "RevisionMissing"
    assert conds["Ready"]["message"] == 'Configuration "w" does not have any ready Revision.'
    assert conds["ConfigurationsReady"]["reason"] == "RevisionFailed"
    assert conds["ConfigurationsReady"]["message"].startswith('Revision "w-00001" failed with message: Container '
                                                              'failed with: RuntimeError: model failed to load')
    health = revision_condition(kube, "w-00001", "ContainerHealthy")
    assert health["reason"] == "ExitCode1" and "model failed to load" in health["message"]
    (pod,) = sim.live_pods("w")
    assert pod_object(kube, pod.name)["status"]["containerStatuses"][0]["lastState"]["terminated"]["reason"] == \
        "Error"


def test_an_unreachable_revision_loses_its_min_scale(kube, sim, api):
    """resources/pa.go reachability (routingState reserve: the route no longer uses it), pa_lifecycle.go
    ScaleBounds: the old Revision's min-scale 1 no longer keeps its pod once the new one takes the traffic."""
    create(api, service(annotations={"autoscaling.knative.dev/min-scale": "1"}))
    sim.wait_until(lambda: ready(kube) == "True", 30, "ready")
    (old,) = sim.live_pods("w")
    patch(api, "w", {"spec": {"template": {"metadata": {"annotations": {"x": "y"}}}}})
    sim.wait_until(lambda: svc_status(kube).get("latestReadyRevisionName") == "w-00002", 30, "revision 2")
    sim.wait_until(lambda: old.deleting, 200, "the old revision's pod to go despite its min-scale 1")
    assert len(sim.live_pods("w")) == 1 and sim.live_pods("w")[0] is not old


def test_a_pod_is_pending_until_its_container_first_starts_and_a_named_watch_is_authorized_by_name(kube, tmp_path,
                                                                                                   api):
    """The kubelet's pod phase; RBAC resourceNames against a list or watch by fieldSelector=metadata.name
    (the API server's RequestInfo takes the name from it)."""
    from kube_fake import Rule

    sim = make_sim(kube, tmp_path)
    try:
        body = service(annotations={"autoscaling.knative.dev/min-scale": "1"})
        body["spec"]["template"]["spec"]["containers"][0]["env"] = [
            {"name": "T", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]
        create(api, body)
        sim.wait_until(lambda: sim.live_pods("w") and sim.live_pods("w")[0].published, 30, "the pod")
        (pod,) = sim.live_pods("w")
        assert pod_object(kube, pod.name)["status"]["phase"] == "Pending", "never started: Pending"
        kube.role = [Rule(frozenset({"serving.knative.dev"}), frozenset({"services"}), frozenset({"list", "watch"}),
                          frozenset({"w"}))]
        assert api.list_namespaced_custom_object(GROUP, VERSION, NS, "services",
                                                 field_selector="metadata.name=w")["items"]
        with pytest.raises(ApiException) as info:
            api.list_namespaced_custom_object(GROUP, VERSION, NS, "services")
        assert info.value.status == 403
    finally:
        kube.role = None
        sim.stop()
