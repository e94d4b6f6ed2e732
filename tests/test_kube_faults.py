"""The requester in knative mode while the Kubernetes API misbehaves: every client gets a clear answer.

The requester app (Flask, the real data plane and lifecycle) drives the fake
API server (tests/kube_fake.py) through the real ``kubernetes`` client, with
the Knative simulator (tests/knative_sim.py) running stand-in pods. Each fault
is injected after a second model is already up, to show that a sick API costs
only the model that needs it: the ready one keeps being served and ``/health``
stays 200.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from knative_sim import SimulatedKnative
from kube_fake import FakeKube, load_role
from test_knative import NS, RBAC, SPEED, api_for

from fma_requester.app import create_app
from fma_requester.knative import KnativeActuator, KnativeSettings
from fma_requester.lifecycle import LifecycleConfig
from fma_requester.metrics import RequesterMetrics
from fma_requester.registry import ModelRegistry
from fma_requester.settings import RequesterSettings

SICK = "sick"  # the model started while the API misbehaves
FINE = "fine"  # the model already up when the fault begins
SICK_SVC = "fma-worker-sick"
REGISTRY = ("defaults: {queue_timeout: 20s}\nmodels:\n"
            f"  - {{name: {SICK}, source: 'hf:org/sick'}}\n"
            f"  - {{name: {FINE}, source: 'hf:org/fine'}}\n")

Make = Callable[..., FlaskClient]


@pytest.fixture()
def kube() -> Iterator[FakeKube]:
    fake = FakeKube(role=load_role(*RBAC)).start()
    fake.put_object({"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                     "metadata": {"name": "fma-requester", "namespace": NS}, "spec": {}})
    yield fake
    fake.stop()


@pytest.fixture()
def sim(kube: FakeKube, tmp_path: Path) -> Iterator[SimulatedKnative]:
    s = SimulatedKnative(kube, tmp_path, speed=SPEED)
    yield s
    s.stop()


@pytest.fixture()
def requester(kube: FakeKube, sim: SimulatedKnative) -> Iterator[Make]:
    """Builds the requester app in knative mode; shuts its actuator down (API healed first) after the test."""
    made: list[KnativeActuator] = []

    def make(**env: str) -> FlaskClient:
        kn = KnativeSettings.from_env({"FMA_NAMESPACE": NS, "FMA_KUBE_RETRIES": "3", **env})
        registry = ModelRegistry.from_text(REGISTRY)
        act = KnativeActuator(registry, RequesterMetrics(), kn, api=api_for(kube),
                              config=LifecycleConfig(restart_backoff_s=0.2, restart_backoff_max_s=0.4))
        made.append(act)
        settings = RequesterSettings.from_env({"FMA_LOG_LEVEL": "warning", "FMA_ACTUATOR": "knative"})
        return create_app(settings, registry=registry, actuator=act).test_client()

    yield make
    kube.fail_all, kube.hang_all, kube.hang_requests = None, False, 0
    for act in made:
        act.shutdown(10)


def complete(client: FlaskClient, model: str) -> tuple[int, dict]:
    resp = client.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 2})
    return resp.status_code, resp.get_json()


def served_by_a_pod(client: FlaskClient, model: str) -> None:
    code, body = complete(client, model)
    assert code == 200 and body["pod"].startswith(f"fma-worker-{model}-"), (code, body)


def healthy(client: FlaskClient) -> None:
    assert client.get("/health").status_code == 200


def eventually_served(client: FlaskClient, model: str, within_s: float = 20.0) -> int:
    """The model is served again once the fault is gone (after the restart backoff): attempts taken."""
    deadline = time.monotonic() + within_s
    attempts = 0
    while True:
        attempts += 1
        code, body = complete(client, model)
        if code == 200:
            assert body["pod"].startswith(f"fma-worker-{model}-")
            return attempts
        assert time.monotonic() < deadline, f"{model} still failing: {code} {body}"
        time.sleep(0.2)


def test_an_api_server_answering_500_fails_that_start_with_a_clear_503_and_nothing_else(kube: FakeKube,
                                                                                      requester: Make):
    client = requester()
    served_by_a_pod(client, FINE)
    kube.fail_all = 500
    started = time.monotonic()
    code, body = complete(client, SICK)
    assert code == 503 and body["error"]["code"] == "worker_failed", body
    assert "500" in body["error"]["message"], "the API server's status is in the message"
    assert time.monotonic() - started < 10, "three attempts with a short backoff, not a hang"
    served_by_a_pod(client, FINE)  # ready already: no API call needed
    healthy(client)
    kube.fail_all = None
    eventually_served(client, SICK)


def test_a_hanging_api_server_fails_that_start_within_the_call_timeout(kube: FakeKube, requester: Make):
    client = requester(FMA_KUBE_TIMEOUT="0.5s")
    served_by_a_pod(client, FINE)
    kube.hang_all = True  # connections accepted, requests read, never answered
    started = time.monotonic()
    code, body = complete(client, SICK)
    took = time.monotonic() - started
    assert code == 503 and body["error"]["code"] == "knative_error", body
    assert "Kubernetes API is unreachable" in body["error"]["message"] and "timed out" in body["error"]["message"]
    assert took < 8, f"3 attempts of 0.5 s plus backoff, not the queue timeout: {took:.1f} s"
    served_by_a_pod(client, FINE)
    healthy(client)
    kube.hang_all = False
    eventually_served(client, SICK)


def test_one_hung_call_is_retried_and_the_start_goes_on(kube: FakeKube, sim: SimulatedKnative, requester: Make):
    kube.hang_requests = 1  # the first API call (the start-up list of our Services) is never answered
    client = requester(FMA_KUBE_TIMEOUT="0.5s")
    served_by_a_pod(client, SICK)
    (hung,) = kube.held
    deadline = time.monotonic() + 10
    while kube.requests.count(hung) < 2:
        assert time.monotonic() < deadline, f"the hung call was never made again: {hung}"
        time.sleep(0.05)
    assert kube.requests.count(hung) == 2, "one attempt of ours, not urllib3's retries on top"
    assert sim.revisions_created[SICK_SVC] == 1, "the retried create made one Service, one Revision"


def test_a_create_that_loses_a_race_gets_409_and_adopts_the_winners_service(kube: FakeKube, sim: SimulatedKnative,
                                                                           requester: Make):
    client = requester()
    kube.before_create = kube.put_object  # another requester replica creates the same Service first
    served_by_a_pod(client, SICK)
    assert sim.revisions_created[SICK_SVC] == 1, "the winner's Service was adopted as it was: no second Revision"
    assert not [p for m, p in kube.requests if m in ("PUT", "DELETE")]


def test_an_expired_watch_410_while_starting_is_survived_by_a_fresh_read(kube: FakeKube, sim: SimulatedKnative,
                                                                        requester: Make):
    sim.behaviour[SICK_SVC] = "slow:10"
    client = requester()
    kube.after_create = kube.compact  # the created Service's resourceVersion is compacted away at once
    served_by_a_pod(client, SICK)
    assert any(m == "GET" and p.endswith(f"/{SICK_SVC}") for m, p in kube.requests), "re-read after the 410"


def test_requests_for_a_ready_model_go_on_while_another_start_hangs_on_the_api(kube: FakeKube, requester: Make):
    client = requester(FMA_KUBE_TIMEOUT="1s")
    served_by_a_pod(client, FINE)
    kube.hang_all = True
    result: list[tuple[int, dict]] = []
    stuck = threading.Thread(target=lambda: result.append(complete(client, SICK)))
    stuck.start()
    deadline = time.monotonic() + 5
    while not kube.held:  # the start is now waiting on the API
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    for _ in range(5):
        served_by_a_pod(client, FINE)
    assert time.monotonic() - started < 2, "a hung start holds no lock the ready model needs"
    healthy(client)
    stuck.join(30)
    assert result and result[0][0] == 503, result
