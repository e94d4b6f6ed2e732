"""The deployed example, end to end, only through the Kubernetes API and the requester's route.

``make e2e`` runs this against the simulated cluster; ``make e2e KUBECONFIG=...
REGISTRY=...`` against a real one (tests/e2e/targets.py). The tests run in
order on one deployment: deploy, a first completion (a cold start), a stream,
sleep and wake, a release, a CloudEvent through the Broker, a second model,
clean up.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml
from targets import Target, make_target

from conftest import wait_for

pytestmark = [pytest.mark.process, pytest.mark.e2e]

MODEL = "smollm2-135m-instruct"
SECOND = "smollm2-second"
MANAGED = "app.kubernetes.io/managed-by=fma-requester"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Target]:
    import os

    cache = None
    if not os.environ.get("E2E_REGISTRY"):
        cache = request.getfixturevalue("converted_model_dir").parents[2]
    started = time.monotonic()
    t = make_target(tmp_path_factory.mktemp("e2e"), cache)
    print(f"deployed in {time.monotonic() - started:.1f} s")
    try:
        yield t
    finally:
        t.close()


def knative(target: Target) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(target.api())


def core(target: Target) -> Any:
    from kubernetes import client

    return client.CoreV1Api(target.api())


def worker_services(target: Target) -> dict[str, dict]:
    items = knative(target).list_namespaced_custom_object("serving.knative.dev", "v1", target.ns, "services",
                                                          label_selector=MANAGED)["items"]
    return {s["metadata"]["annotations"]["fma.llm-d.ai/model"]: s for s in items}


def worker_pods(target: Target, model: str) -> list[str]:
    svc = f"fma-worker-{model}"
    pods = core(target).list_namespaced_pod(target.ns, label_selector=f"serving.knative.dev/service={svc}").items
    return [p.metadata.name for p in pods if p.metadata.deletion_timestamp is None]


def client(target: Target) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{target.url}/v1", api_key=target.api_key, max_retries=0, timeout=300)


def admin(target: Target, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{target.url}{path}", headers={"Authorization": f"Bearer {target.admin_key}"},
                         timeout=300, **kw)


def state(target: Target, model: str) -> dict:
    data = admin(target, "GET", "/v1/workers").json()["data"]
    return next(w for w in data if w["model"] == model)


def test_the_deployed_requester_is_ready_and_serves_the_example_model(target: Target):
    svc = knative(target).get_namespaced_custom_object("serving.knative.dev", "v1", target.ns, "services",
                                                       "fma-requester")
    ready = next(c for c in svc["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert [m.id for m in client(target).models.list().data] == [MODEL]
    assert worker_services(target) == {}, "no worker until a request asks for one"


def test_the_first_completion_cold_starts_a_worker_service(target: Target):
    started = time.monotonic()
    resp = httpx.post(f"{target.url}/v1/completions", headers={"Authorization": f"Bearer {target.api_key}"},
                      json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
                      timeout=600)
    print(f"first completion (cold start) in {time.monotonic() - started:.1f} s")
    assert resp.status_code == 200, resp.text
    assert resp.headers["X-FMA-Actuation"].startswith("cold")
    assert resp.json()["choices"][0]["text"]
    svc = worker_services(target)[MODEL]
    assert svc["metadata"]["labels"]["llm-d.ai/role"] == "decode"
    assert len(worker_pods(target, MODEL)) == 1


def test_a_streamed_chat_arrives_in_chunks(target: Target):
    stream = client(target).chat.completions.create(model=MODEL, temperature=0, max_tokens=16, stream=True,
                                                    messages=[{"role": "user", "content": "Say hello."}])
    chunks = list(stream)
    assert len(chunks) > 2 and chunks[-1].choices[-1].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


def test_sleep_then_a_request_wakes_the_same_pod(target: Target):
    (pod,) = worker_pods(target, MODEL)
    slept = admin(target, "POST", f"/v1/workers/{MODEL}/sleep", params={"level": 1})
    assert slept.status_code == 200 and slept.json()["state"] == "sleeping", slept.text
    assert worker_pods(target, MODEL) == [pod], "asleep, the pod stays (ready to Knative)"
    resp = httpx.post(f"{target.url}/v1/completions", headers={"Authorization": f"Bearer {target.api_key}"},
                      json={"model": MODEL, "prompt": "Hello", "max_tokens": 4}, timeout=300)
    assert resp.status_code == 200 and resp.headers["X-FMA-Actuation"].startswith("wake")
    assert worker_pods(target, MODEL) == [pod], "woken in place: no new pod"


def test_a_release_scales_the_worker_to_zero(target: Target):
    released = admin(target, "DELETE", f"/v1/workers/{MODEL}")
    assert released.status_code == 200, released.text
    started = time.monotonic()
    # Knative removes the pod after its stable window (60 s) and drain (30 s): cluster seconds.
    wait_for(lambda: not worker_pods(target, MODEL), 300 / target.timescale + 30, "the worker's pod to go")
    print(f"released pod gone {(time.monotonic() - started) * target.timescale:.0f} cluster-s after the release")
    wait_for(lambda: state(target, MODEL)["state"] == "cold", 60, "the requester to see it cold")


def test_a_cloudevent_through_the_broker_warms_the_model(target: Target):
    from cloudevents.core.bindings.http import to_binary_event
    from cloudevents.core.v1.event import CloudEvent

    event = CloudEvent({"type": "ai.llm-d.fma.worker.warm.requested", "source": "/e2e", "id": uuid.uuid4().hex,
                        "datacontenttype": "application/json"}, json.dumps({"model": MODEL}).encode())
    msg = to_binary_event(event)
    resp = httpx.post(target.broker_url, content=msg.body, headers=dict(msg.headers), timeout=30)
    assert resp.status_code == 202, "the Broker takes it at once (its channel is asynchronous)"
    wait_for(lambda: state(target, MODEL)["state"] == "ready", 300, "the event to warm the model")
    assert len(worker_pods(target, MODEL)) == 1, "warm means a pod: a released Service is Ready at zero pods"


def test_a_second_model_added_to_the_config_map_gets_its_own_worker(target: Target):
    api = core(target)
    cm = api.read_namespaced_config_map("fma-requester-config", target.ns)
    models = yaml.safe_load(cm.data["models.yaml"])
    first = next(m for m in models["models"] if m["name"] == MODEL)
    models["models"].append({**first, "name": SECOND})
    api.patch_namespaced_config_map("fma-requester-config", target.ns,
                                    {"data": {"models.yaml": yaml.safe_dump(models)}})
    # The kubelet refreshes the mounted file (about a minute on a cluster); the requester reloads it.
    wait_for(lambda: SECOND in [m.id for m in client(target).models.list().data], 180, "the second model")
    answer = client(target).completions.create(model=SECOND, prompt="Hello", max_tokens=4)
    assert answer.model == SECOND and answer.choices[0].text is not None
    assert set(worker_services(target)) == {MODEL, SECOND}
    assert len(worker_pods(target, SECOND)) == 1


def test_clean_up_releases_every_worker(target: Target):
    for model in (MODEL, SECOND):
        assert admin(target, "DELETE", f"/v1/workers/{model}").status_code == 200
    wait_for(lambda: not worker_pods(target, MODEL) and not worker_pods(target, SECOND),
             300 / target.timescale + 30, "every worker pod to go")
