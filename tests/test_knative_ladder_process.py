"""The sleep ladder, releases and the budget on Knative, through the requester process (knative mode).

Each test runs the requester as it is deployed (gunicorn, gevent, a kubeconfig
for the fake API server with the shipped Role and ClusterRoles, the shipped
worker template with its token Secret) against the Knative simulator
(tests/knative_sim.py), whose pods are stand-in workers that check the token.
Every point of issue 20 has its test here; each failed before the fix it
pins. Times are the simulator's seconds (it runs ``SPEED`` times faster).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from knative_sim import DRAIN_S, PA_REENQUEUE_S, SimulatedKnative
from knative_webhook import ClusterConfig
from kube_fake import FakeKube, load_role, write_kubeconfig
from test_knative import NS, RBAC, seed_requester

from conftest import REPO, Requester, requester, wait_for

pytestmark = pytest.mark.process

SPEED = 20.0
TOKEN = "fma-worker-token-for-tests"
SHARED_FLAGS = {"kubernetes.podspec-affinity": "enabled", "kubernetes.podspec-tolerations": "enabled",
                "kubernetes.podspec-runtimeclassname": "enabled"}  # knative/cluster/config-features.yaml


class Cluster:
    """A fake API server with Knative on it, and requesters to run against it."""

    def __init__(self, tmp_path: Path, config: ClusterConfig | None = None, **template: object) -> None:
        self.dir = tmp_path
        self.kube = FakeKube(role=load_role(*RBAC)).start()
        seed_requester(self.kube, TOKEN)
        # The shipped worker template mounts the model cache claim: the cluster has its flag on, as
        # knative/cluster/config-features.yaml asks.
        config = config or ClusterConfig()
        config.features.setdefault("kubernetes.podspec-persistent-volume-claim", "enabled")
        self.sim = SimulatedKnative(self.kube, tmp_path, speed=SPEED, config=config)
        shipped = yaml.safe_load((REPO / "knative" / "base" / "worker-template.yaml").read_text())
        # The models here are hub ids whose simulated pods load nothing: no model cache to fill for them (the
        # cache on Knative: tests/test_knative.py, with a stand-in hub).
        template.setdefault("model_cache_claim", None)
        self.template = tmp_path / "worker-template.yaml"
        self.template.write_text(yaml.safe_dump({**shipped, **template}))
        self.kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(self.kubeconfig, self.kube.url, namespace=NS)
        self.runs = 0

    @contextmanager
    def requester(self, models: str, **env: str) -> Iterator[Requester]:
        self.runs += 1
        here = self.dir / f"requester-{self.runs}"
        here.mkdir()
        (here / "models.yaml").write_text(models)
        with requester(here, here / "models.yaml", FMA_ACTUATOR="knative", KUBECONFIG=str(self.kubeconfig),
                       FMA_NAMESPACE=NS, FMA_WORKER_TEMPLATE=str(self.template), FMA_WORKER_TOKEN=TOKEN,
                       **env) as req:
            yield req

    def close(self) -> None:
        self.sim.stop()
        self.kube.stop()


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.close()


def one_model(name: str = "m", **knative: object) -> str:
    extra = ", ".join(f"{k}: {v}" for k, v in knative.items())
    return f"models:\n  - {{name: {name}, source: 'hf:org/{name}', knative: {{{extra}}}}}\n"


def status(req: Requester, model: str) -> dict:
    data = httpx.get(f"{req.spi}/v1/workers", timeout=10).json()["data"]
    return next(w for w in data if w["model"] == model)


def complete(req: Requester, model: str, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{req.spi}/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 2},
                      timeout=timeout)


def served(req: Requester, model: str) -> tuple[str, str]:
    """(the pod that answered, the actuation path) of one completion."""
    resp = complete(req, model)
    assert resp.status_code == 200, resp.text
    return resp.json()["pod"], resp.headers["X-FMA-Actuation"].split(";")[0]


def ready_condition(kube: FakeKube, service: str) -> str | None:
    svc = kube.get_object(NS, service) or {}
    return next((c["status"] for c in (svc.get("status") or {}).get("conditions", []) if c["type"] == "Ready"), None)


# ---- 1. the token reaches every control call --------------------------------------------------

def test_every_control_call_carries_the_worker_token_so_sleep_and_wake_work(cluster: Cluster):
    """Issue 20, point 1: with the shipped template the workers require the token; the requester sends it on every
    control call (sleep, wake, is_sleeping, health) - before, each was a 401 and a manual sleep a 409."""
    with cluster.requester(one_model("m", max_scale=1)) as req:
        pod_name, path = served(req, "m")
        assert path == "cold"
        (pod,) = cluster.sim.live_pods("fma-worker-m")
        assert pod.standin.token == TOKEN, "the pod got the token from the Secret (secretKeyRef)"
        slept = httpx.post(f"{req.spi}/v1/workers/m/sleep", params={"level": 1}, timeout=60)
        assert slept.status_code == 200 and slept.json()["state"] == "sleeping", slept.text
        assert pod.standin.asleep
        assert served(req, "m") == (pod_name, "wake")
        control = [c for c in pod.standin.calls if c.split()[1].split("?")[0] in ("/sleep", "/wake_up", "/is_sleeping")]
        assert {c.split()[1].split("?")[0] for c in control} >= {"/sleep", "/wake_up"}
        assert pod.standin.refused == [], f"calls without the token: {pod.standin.refused}"


def test_a_worker_put_to_sleep_behind_the_requesters_back_is_woken_by_the_next_request(cluster: Cluster):
    """A request that reaches a sleeping worker gets its distinct refusal (503 worker_sleeping); the requester turns
    it into a wake and sends the request again, instead of passing the 503 on."""
    with cluster.requester(one_model("m", max_scale=1)) as req:
        pod_name, _ = served(req, "m")
        (pod,) = cluster.sim.live_pods("fma-worker-m")
        assert httpx.post(f"{pod.url}/sleep", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert served(req, "m") == (pod_name, "wake")
        assert not pod.standin.asleep and status(req, "m")["state"] == "ready"
        assert "answered that it is asleep" in req.log()


# ---- 2. a release of a sleeping worker removes its pod, and the budget holds it until then --------

def test_releasing_a_sleeping_worker_removes_its_pod_within_the_bound_and_the_budget_holds_it(cluster: Cluster):
    """Point 2: a sleeping pod is ready to Knative, so a release scales it to zero after the stable window
    (60 s since its last request) and queue-proxy's drain (30 s) - not after the progress deadline (1800 s with
    the shipped template). Until the pod is gone the worker is `stopping` and still counts: a model that needs
    its memory waits."""
    models = ("budget: {max_loaded: 2, sleepers: 1, memory_mib: 10000}\nmodels:\n"
              "  - {name: a, source: 'hf:org/a', memory_mib: 6000, sleep_memory_mib: 5000, knative: {max_scale: 1}}\n"
              "  - {name: b, source: 'hf:org/b', memory_mib: 6000, knative: {max_scale: 1}}\n")
    sim = cluster.sim
    with cluster.requester(models) as req:
        served(req, "a")
        assert httpx.post(f"{req.spi}/v1/workers/a/sleep", timeout=60).json()["state"] == "sleeping"
        (pod,) = sim.live_pods("fma-worker-a")
        last_request = sim.clock.now()
        released = httpx.delete(f"{req.spi}/v1/workers/a", timeout=30)
        assert released.status_code == 200
        assert released.json()["phase"] == "stopping" and "Knative removes" in released.json()["detail"]
        waiting: list[httpx.Response] = []
        b = threading.Thread(target=lambda: waiting.append(complete(req, "b")))
        b.start()
        seen_stopping = False
        while True:
            a = status(req, "a")  # first what the requester says, then what exists: a pod seen after a "cold" is a lie
            pods_a, pods_b = sim.pods("fma-worker-a"), sim.pods("fma-worker-b")
            if a["phase"] != "stopping":
                assert not pods_a, f"a is {a['phase']} while its pod still exists and holds its memory"
                break
            seen_stopping = True
            assert not (pods_a and pods_b), "b must not start beside a's pod: a 5000 + b 6000 > 10000 MiB"
            time.sleep(0.02)
        gone_after = sim.clock.now() - last_request
        assert seen_stopping and pod.gone
        bound = sim.config.stable_window_s + PA_REENQUEUE_S + DRAIN_S
        print(f"\nthe released sleeping pod was gone {gone_after:.0f} simulated s after its last request "
              f"(bound {bound:.0f} s + one reconcile); before the fix: progress deadline + 30 s = 1830 s")
        assert gone_after <= bound + 10
        b.join(60)
        assert waiting and waiting[0].status_code == 200, "b started once a's pod was gone"
        wait_for(lambda: status(req, "a")["phase"] == "cold", 10, "a to be cold")


# ---- 3. a second model on a shared GPU never runs beside the first one's pod --------------------

def test_a_second_model_on_a_shared_gpu_never_has_a_pod_while_the_first_ones_pod_exists(tmp_path: Path):
    """Point 3: an eviction frees the GPU only when the evicted worker's pod is gone (terminating included)."""
    cluster = Cluster(tmp_path, ClusterConfig(features=SHARED_FLAGS))
    models = ("budget: {max_loaded: 1, sleepers: 0}\nmodels:\n"
              "  - {name: a, source: 'hf:org/a', knative: {gpu_binding: shared}}\n"
              "  - {name: b, source: 'hf:org/b', knative: {gpu_binding: shared}}\n")
    samples: list[tuple[int, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((len(cluster.sim.pods("fma-worker-a")), len(cluster.sim.pods("fma-worker-b"))))
            time.sleep(0.005)

    try:
        with cluster.requester(models, NODE_NAME="gpu-node-1") as req:
            served(req, "a")
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            _, path = served(req, "b")  # a is evicted (no sleeper room): stopped, then b starts
            done.set()
            sampler.join(5)
            assert path == "cold" and status(req, "a")["state"] == "cold"
            both = max(min(a, b) for a, b in samples)
            most = max(a + b for a, b in samples)
            print(f"\n{len(samples)} samples: at most {most} pod(s) at once, {both} moment(s) with both models' pods")
            assert both == 0, "b had a pod while a's pod (terminating or not) still held the GPU"
            assert most == 1
    finally:
        done.set()
        cluster.close()


# ---- 4. a requester restart finds a sleeping worker sleeping ---------------------------------

def test_a_requester_restart_reports_a_sleeping_worker_as_sleeping_and_wakes_the_same_pod(cluster: Cluster):
    """Point 4: adoption asks the pod (/is_sleeping); before, a sleeping worker was adopted as ready and
    requests reached a sleeping pod."""
    with cluster.requester(one_model("m", max_scale=1)) as req:
        pod_name, _ = served(req, "m")
        assert httpx.post(f"{req.spi}/v1/workers/m/sleep", timeout=60).json()["state"] == "sleeping"
    assert ready_condition(cluster.kube, "fma-worker-m") == "True", "Knative keeps the Service Ready"
    with cluster.requester(one_model("m", max_scale=1)) as again:
        wait_for(lambda: status(again, "m")["state"] == "sleeping", 15, "the adopted worker to show as sleeping")
        assert served(again, "m") == (pod_name, "wake"), "the same pod, woken"
        assert cluster.sim.pods_started["fma-worker-m"] == 1
        (pod,) = cluster.sim.live_pods("fma-worker-m")
        assert pod.standin.refused == []


# ---- 5. a worker that restarted once still sleeps and wakes; a wedged model serves again --------

def test_a_worker_whose_container_restarted_once_still_sleeps_and_wakes(cluster: Cluster):
    """Point 5: the restart leaves lastState.terminated on the pod for its life; a sleep used to make the pod not
    ready, so ContainerHealthy went False (reconcileDeployment) and the Service Ready=False: the model was stopped.
    Now the pod stays ready asleep, and the request after the crash takes the same pod back."""
    sim = cluster.sim
    with cluster.requester(one_model("m", max_scale=1)) as req:
        pod_name, _ = served(req, "m")
        (pod,) = sim.live_pods("fma-worker-m")
        sim.crash(pod)  # an OOM kill: the kubelet restarts the container in the same pod
        sim.wait_until(lambda: pod.restarts == 1 and pod.ready, 60, "the container to restart and load again")
        assert served(req, "m")[0] == pod_name, "the restarted pod serves again, no new pod"
        slept = httpx.post(f"{req.spi}/v1/workers/m/sleep", timeout=60)
        assert slept.status_code == 200 and slept.json()["state"] == "sleeping", slept.text
        time.sleep(sim.clock.real(10))
        assert ready_condition(cluster.kube, "fma-worker-m") == "True", "asleep after a restart, still Ready"
        assert status(req, "m")["state"] == "sleeping"
        assert served(req, "m") == (pod_name, "wake")
        assert sim.pods_started["fma-worker-m"] == 1 and sim.revisions_created["fma-worker-m"] == 1


# make test-slow: its simulated activation timeout is timing-sensitive; it failed once in CI under load, passes alone.
@pytest.mark.slow
def test_a_model_whose_revision_crashed_and_scaled_to_zero_serves_again_on_the_next_request(tmp_path: Path):
    """Point 5: a crash loop while no requester watched, then the activation timeout scaled it to zero: the
    Revision keeps ContainerHealthy=False (no pod will ever clear it) and the Service Ready=False. Before, every
    start failed at once with no new Revision until someone deleted the Service."""
    cluster = Cluster(tmp_path, progress_deadline="30s")
    sim = cluster.sim
    try:
        with cluster.requester(one_model("m")) as req:
            served(req, "m")
        (pod,) = sim.live_pods("fma-worker-m")
        sim.crash(pod, again=True)
        sim.wait_until(lambda: not sim.pods("fma-worker-m"), 400, "the activation to time out and the pod to go")
        assert ready_condition(cluster.kube, "fma-worker-m") == "False", "wedged: no pod can clear the condition"
        with cluster.requester(one_model("m")) as again:
            pod_name, path = served(again, "m")
            assert path == "cold" and pod_name.startswith("fma-worker-m-00002-"), "a new Revision, from the requester"
            assert sim.revisions_created["fma-worker-m"] == 2
            assert "starting a new Revision" in again.log()
    finally:
        cluster.close()


# ---- 6. Knative Serving older than 1.21 --------------------------------------------------------

def test_on_serving_1_20_sleep_is_refused_with_the_reason_and_a_release_still_works(tmp_path: Path):
    """Point 6: before 1.21 Revision annotations never reach the autoscaler and are copied into the pod template,
    so a sleep's pin would roll a second pod (loading the model again) and a release would never scale to zero."""
    cluster = Cluster(tmp_path, ClusterConfig(serving_version="1.20.3"))
    sim = cluster.sim
    try:
        with cluster.requester(one_model("m", max_scale=1)) as req:
            served(req, "m")
            refused = httpx.post(f"{req.spi}/v1/workers/m/sleep", timeout=60)
            assert refused.status_code == 409, refused.text
            message = refused.json()["error"]["message"]
            assert "Knative Serving 1.21 or newer" in message and "1.20" in message
            assert "Knative Serving 1.20 (from the services.serving.knative.dev CRD" in req.log()
            assert sim.pods_started["fma-worker-m"] == 1, "nothing rolled a second pod"
            released = httpx.delete(f"{req.spi}/v1/workers/m", timeout=30)
            assert released.status_code == 200
            sim.wait_until(lambda: not sim.pods("fma-worker-m"), 200, "the release to remove the pod")
            assert sim.pods_started["fma-worker-m"] == 1
            wait_for(lambda: status(req, "m")["phase"] == "cold", 10, "cold")
    finally:
        cluster.close()


# ---- 7. adoption writes nothing when the stored (defaulted) Service already matches -------------

def test_adopting_an_unchanged_defaulted_service_sends_no_patch_even_after_the_defaults_changed(cluster: Cluster):
    """Point 7: the API server stores the Service as Knative's webhook defaulted it; a requester restart must find
    it unchanged. Before, every start PATCHed, and with config-defaults changed since, the PATCH made a new
    Revision (a new GPU pod)."""
    model = one_model("m", scale_to_zero_retention="0s")
    with cluster.requester(model) as req:
        served(req, "m")
    stored = cluster.kube.get_object(NS, "fma-worker-m")
    assert stored["spec"]["traffic"] == [{"latestRevision": True, "percent": 100}], "stored defaulted"
    # Knative scales the idle worker to zero on its own; the next requester finds no pod to adopt, so its first
    # request starts the model: create (409), read, compare.
    cluster.sim.wait_until(lambda: not cluster.sim.pods("fma-worker-m"), 200, "Knative to scale the idle worker to 0")
    cluster.sim.webhook.config.revision_ephemeral_storage_request = "500Mi"  # an operator changes config-defaults
    patches = cluster.kube.count("PATCH") + cluster.kube.count("PATCH", "revisions")
    with cluster.requester(model) as again:
        assert served(again, "m")[1] == "cold"
    assert [p for m, p in cluster.kube.requests if m == "POST" and p.endswith("/services")][-1:], "it did start"
    assert cluster.kube.count("PATCH") + cluster.kube.count("PATCH", "revisions") == patches
    assert cluster.sim.revisions_created["fma-worker-m"] == 1


def test_the_requester_in_knative_mode_answers_on_port_and_on_8081_for_the_examples_port_forward(cluster: Cluster):
    """Issue 26: the FMA example port-forwards 8080 (health) and 8081 (the SPI) to the requester's pod; in Knative
    mode it listened on $PORT only. It now also serves on the pod's loopback at FMA_SPI_PORT (8081 by default;
    a free port here, the default is checked in test_settings)."""
    from fma_common.procs import free_port, start_gunicorn, stop_process_group, wait_ready

    port, spi = free_port(), free_port()
    models = cluster.dir / "models.yaml"
    models.write_text(one_model())
    env = {**os.environ, "PORT": str(port), "FMA_SPI_PORT": str(spi), "FMA_ACTUATOR": "knative",
           "KUBECONFIG": str(cluster.kubeconfig), "FMA_NAMESPACE": NS, "FMA_WORKER_TEMPLATE": str(cluster.template),
           "FMA_WORKER_TOKEN": TOKEN, "FMA_MODELS": str(models), "FMA_LOG_LEVEL": "info"}
    env.pop("FMA_BIND", None)
    log = cluster.dir / "requester-ports.log"
    proc = start_gunicorn("fma_requester.gunicorn_conf", "fma_requester.app:create_app()", env, log, cwd=REPO)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, 60, log)
        for p in (port, spi):
            assert httpx.get(f"http://127.0.0.1:{p}/health", timeout=10).json() == {"status": "ok"}
            models_seen = httpx.get(f"http://127.0.0.1:{p}/v1/models", timeout=10).json()["data"]
            assert [m["id"] for m in models_seen] == ["m"]
    finally:
        stop_process_group(proc, 60)
