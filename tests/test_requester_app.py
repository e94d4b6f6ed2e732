"""Requester edge with a recording fake actuator (Flask test client) and a scripted fake worker."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fma_common.errors import Conflict, ModelNotFound, QueueFull
from fma_requester.actuator import Actuation, Actuator, WorkerLease, WorkerStatus
from fma_requester.app import create_app
from fma_requester.registry import ModelRegistry
from fma_requester.settings import RequesterSettings

MODELS = ["org/model-a", "model-b"]


class FakeActuator(Actuator):
    backend = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.states = dict.fromkeys(MODELS, "cold")
        self.refuse_with: Exception | None = None
        self.worker_url = "http://127.0.0.1:9"
        self.gate = threading.Event()  # cleared: the worker is "starting" until it is set
        self.gate.set()
        self.fail_after_gate: Exception | None = None

    def _check(self, model: str) -> None:
        if model not in self.states:
            raise ModelNotFound(f"model {model!r} is not served here; available: {', '.join(MODELS)}")

    def ensure_ready(self, model: str) -> WorkerLease:
        self._check(model)
        self.calls.append(("ensure_ready", model))
        if self.refuse_with:
            raise self.refuse_with
        self.states[model] = "ready"
        return WorkerLease(model, self.worker_url, Actuation(path="cold", seconds=0.5),
                           lambda lease: self.calls.append(("done", lease.model)))

    def worker_unreachable(self, lease: WorkerLease) -> None:
        self.calls.append(("unreachable", lease.model))

    def admit(self, model: str):
        self._check(model)
        if self.refuse_with:
            raise self.refuse_with
        return {"model": model}

    def wait_for(self, ticket, timeout=None):
        if not self.gate.wait(timeout):
            return None
        if self.fail_after_gate:
            raise self.fail_after_gate
        return self.ensure_ready(ticket["model"])

    def abandon(self, ticket) -> None:
        self.calls.append(("abandon", ticket["model"]))

    def release(self, model: str) -> WorkerStatus:
        self._check(model)
        self.calls.append(("release", model))
        self.states[model] = "cold"
        return self.describe(model)

    def sleep(self, model: str, level: int = 1) -> WorkerStatus:
        self._check(model)
        self.calls.append(("sleep", model, str(level)))
        if self.states[model] == "cold":
            raise Conflict(f"worker for {model} is cold")
        self.states[model] = "sleeping"
        return self.describe(model)

    def describe(self, model: str) -> WorkerStatus:
        self._check(model)
        return WorkerStatus(model=model, state=self.states[model], phase=self.states[model], backend="fake",
                            url=None, last_used=None, in_flight=0, queued=0, last_actuation=None)

    def list(self) -> list[WorkerStatus]:
        return [self.describe(m) for m in MODELS]


@pytest.fixture()
def fake() -> FakeActuator:
    return FakeActuator()


@pytest.fixture()
def client(fake: FakeActuator):
    registry = ModelRegistry.from_text(
        "models:\n" + "".join(f"  - {{name: {m}, source: 'embedded:smollm2-135m-instruct'}}\n" for m in MODELS))
    app = create_app(RequesterSettings.from_env({"FMA_LOG_LEVEL": "warning"}), registry=registry, actuator=fake)
    return app.test_client()


def test_workers_lists_every_model_cold_ones_included(client):
    body = client.get("/v1/workers").get_json()
    assert body["object"] == "list"
    assert [w["model"] for w in body["data"]] == MODELS
    assert set(body["data"][0]) == {"model", "state", "phase", "backend", "url", "last_used", "in_flight", "queued",
                                    "last_actuation", "last_start", "idle_left_s"}


def test_models_lists_every_configured_model_with_its_state(client):
    data = client.get("/v1/models").get_json()["data"]
    assert [(m["id"], m["state"]) for m in data] == [("org/model-a", "cold"), ("model-b", "cold")]


def test_warm_sleep_and_release_accept_model_names_with_slashes(client, fake):
    assert client.post("/v1/workers/org/model-a/warm").get_json()["state"] == "ready"
    assert ("done", "org/model-a") in fake.calls, "warm must not leave the worker counted as in flight"
    assert client.post("/v1/workers/org/model-a/sleep?level=2").get_json()["state"] == "sleeping"
    assert ("sleep", "org/model-a", "2") in fake.calls
    assert client.delete("/v1/workers/org/model-a").get_json()["state"] == "cold"


@pytest.mark.parametrize(("level", "sleeps"), [("sleep1", "1"), ("sleep2", "2")])
def test_warm_to_a_sleep_level_starts_then_parks_the_worker(client, fake, level: str, sleeps: str):
    resp = client.post(f"/v1/workers/model-b/warm?level={level}")
    assert resp.status_code == 200 and resp.get_json()["state"] == "sleeping"
    calls = [c for c in fake.calls if c[1] == "model-b"]
    assert calls.index(("ensure_ready", "model-b")) < calls.index(("sleep", "model-b", sleeps))
    assert client.post("/v1/workers/model-b/warm?level=sleep3").status_code == 400


def test_sleep_of_a_cold_worker_is_409_and_bad_level_400(client):
    resp = client.post("/v1/workers/model-b/sleep")
    assert resp.status_code == 409 and resp.get_json()["error"]["code"] == "conflict"
    assert client.post("/v1/workers/model-b/sleep?level=5").status_code == 400


def test_unknown_model_is_404_naming_the_available_ones(client):
    resp = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert resp.status_code == 404
    err = resp.get_json()["error"]
    assert err["code"] == "model_not_found" and "model-b" in err["message"]
    assert client.delete("/v1/workers/nope").status_code == 404


def test_bad_bodies_are_400_before_any_actuation(client, fake):
    assert client.post("/v1/completions", data=b"{", content_type="application/json").status_code == 400
    assert client.post("/v1/completions", json={"prompt": "no model"}).status_code == 400
    assert client.post("/v1/completions", json={"model": "model-b", "stream": "yes"}).status_code == 400
    assert not [c for c in fake.calls if c[0] == "ensure_ready"]


@pytest.mark.parametrize("raw", [b'{"model": "model-b", "prompt": "\\ud800"}',
                                 b'{"model": "model-b", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                 b'{"model": "model-b", "x": ' + b'{"a": ' * 70 + b"1" + b"}" * 70 + b"}"],
                         ids=["lone-surrogate", "5000-deep", "70-deep"])
def test_hostile_json_is_400_at_the_edge_and_never_reaches_a_worker(client, fake, raw: bytes):
    resp = client.post("/v1/completions", data=raw, content_type="application/json")
    assert resp.status_code == 400 and resp.get_json()["error"]["type"] == "invalid_request_error"
    event = client.post("/", data=raw, headers={"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/t",
                                                "ce-type": "ai.llm-d.fma.completion.requested",
                                                "content-type": "application/json"})
    assert event.status_code in (200, 400)
    if event.status_code == 200:  # a permanent failure is a completion.failed reply
        assert event.headers["ce-type"] == "ai.llm-d.fma.completion.failed"
    assert not [c for c in fake.calls if c[0] == "ensure_ready"]


def test_full_queue_is_429_with_retry_after(client, fake):
    fake.refuse_with = QueueFull("64 requests already wait", retry_after=5)
    resp = client.post("/v1/completions", json={"model": "model-b", "prompt": "x"})
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "5"


def test_become_unready_and_ready_drive_ready(client):
    assert client.get("/ready").status_code == 200
    assert client.post("/v1/become-unready").status_code == 200
    assert client.get("/ready").status_code == 503
    assert client.get("/health").status_code == 200
    assert client.post("/v1/become-ready").status_code == 200
    assert client.get("/ready").data == b"OK\n"


def test_accelerators_without_gpus_is_500_like_upstream(client):
    resp = client.get("/v1/dual-pods/accelerators")
    assert resp.status_code == 500 and b"no GPUs" in resp.data


def test_cloudevent_warm_gets_a_ready_reply_in_binary_mode(client):
    resp = client.post("/", json={"model": "model-b"}, headers={
        "ce-specversion": "1.0", "ce-type": "ai.llm-d.fma.worker.warm.requested", "ce-source": "/t", "ce-id": "w1"})
    assert resp.status_code == 200
    assert resp.headers["ce-type"] == "ai.llm-d.fma.worker.ready"
    assert resp.headers["ce-requestid"] == "w1" and resp.headers["ce-subject"] == "model-b"
    assert resp.get_json()["state"] == "ready"


def test_cloudevent_release_structured_and_unknown_model_fails_permanently(client):
    event = {"specversion": "1.0", "type": "ai.llm-d.fma.worker.release.requested", "source": "/t", "id": "r1",
             "datacontenttype": "application/json", "data": {"model": "model-b"}}
    resp = client.post("/", json=event, content_type="application/cloudevents+json")
    assert resp.get_json()["type"] == "ai.llm-d.fma.worker.released"
    event.update(id="r2", type="ai.llm-d.fma.completion.requested", data={"model": "nope", "prompt": "x"})
    resp = client.post("/", json=event, content_type="application/cloudevents+json")
    assert resp.status_code == 200
    reply = resp.get_json()
    assert reply["type"] == "ai.llm-d.fma.completion.failed" and reply["requestid"] == "r2"
    assert reply["data"]["error"]["code"] == "model_not_found"


def test_cloudevent_transient_failure_is_429_without_an_event(client, fake):
    fake.refuse_with = QueueFull("busy", retry_after=3)
    resp = client.post("/", json={"model": "model-b", "prompt": "x"}, headers={
        "ce-specversion": "1.0", "ce-type": "ai.llm-d.fma.completion.requested", "ce-source": "/t", "ce-id": "c1"})
    assert resp.status_code == 429 and "ce-type" not in resp.headers


def test_a_pingsource_ping_naming_a_model_warms_it(client, fake):
    """A PingSource cannot set its events' type (knative/eventing pkg/adapter/mtping/runner.go)."""
    resp = client.post("/", data=b'{"model": "model-b"}', headers={
        "ce-specversion": "1.0", "ce-type": "dev.knative.sources.ping", "ce-id": "p1",
        "ce-source": "/apis/v1/namespaces/fma-example/pingsources/fma-prewarm", "ce-fmaprewarm": "true",
        "Content-Type": "application/json"})
    assert resp.status_code == 200 and resp.headers["ce-type"] == "ai.llm-d.fma.worker.ready"
    assert resp.headers["ce-requestid"] == "p1" and resp.get_json()["state"] == "ready"
    resp = client.post("/", data=b"", headers={"ce-specversion": "1.0", "ce-type": "dev.knative.sources.ping",
                                               "ce-id": "p2", "ce-source": "/apis/v1/namespaces/x/pingsources/y"})
    assert resp.status_code == 200 and resp.headers["ce-type"] == "ai.llm-d.fma.worker.failed", \
        "a ping that names no model fails permanently (a reply, not a retry), not guessed at"
    assert resp.get_json()["error"]["type"] == "invalid_request_error"


def test_a_reply_carries_request_replys_correlation_id_back(client):
    """Knative's RequestReply matches a reply by its replyid = the request's correlationid."""
    resp = client.post("/", json={"model": "model-b"}, headers={
        "ce-specversion": "1.0", "ce-type": "ai.llm-d.fma.worker.warm.requested", "ce-source": "/t", "ce-id": "w9",
        "ce-correlationid": "abc:signed"})
    assert resp.headers["ce-replyid"] == "abc:signed" and resp.headers["ce-requestid"] == "w9"
    plain = client.post("/", json={"model": "model-b"}, headers={
        "ce-specversion": "1.0", "ce-type": "ai.llm-d.fma.worker.warm.requested", "ce-source": "/t", "ce-id": "w10"})
    assert "ce-replyid" not in plain.headers


def test_an_event_larger_than_the_body_limit_is_413(client):
    big = b'{"model": "model-b", "prompt": "' + b"x" * (2 << 20) + b'"}'
    resp = client.post("/", data=big, headers={
        "ce-specversion": "1.0", "ce-type": "ai.llm-d.fma.completion.requested", "ce-source": "/t", "ce-id": "b1",
        "Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.get_json()["error"]["type"] == "invalid_request_error"


def test_unknown_and_malformed_events_are_400(client):
    resp = client.post("/", json={}, headers={"ce-specversion": "1.0", "ce-type": "x.y", "ce-source": "/t",
                                              "ce-id": "1"})
    assert resp.status_code == 400
    assert client.post("/", data=b"{", content_type="application/cloudevents+json").status_code == 400


# ---- one data plane: the same outcome over HTTP and CloudEvents -------------------------------


class ScriptedWorker:
    """A real HTTP server standing in for a worker (or for Knative's activator in front of one)."""

    def __init__(self) -> None:
        self.answer: tuple[int, str, bytes] = (200, "application/json", b"{}")
        self.requests: list[dict] = []
        self.delay_s = 0.0  # how long it "generates" before answering
        worker = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_a: object) -> None:
                pass

            def do_POST(self) -> None:
                worker.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                time.sleep(worker.delay_s)
                status, ctype, body = worker.answer
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def worker(fake: FakeActuator) -> Iterator[ScriptedWorker]:
    w = ScriptedWorker()
    fake.worker_url = w.url
    yield w
    w.close()


def completion_event(client, **data):
    return client.post("/", json={"model": "model-b", "prompt": "x", **data}, headers={
        "ce-specversion": "1.0", "ce-type": "ai.llm-d.fma.completion.requested", "ce-source": "/t", "ce-id": "c9"})


ENVELOPE_500 = json.dumps({"error": {"message": "generation failed", "type": "server_error",
                                     "code": "internal_error", "param": None}}).encode()


@pytest.mark.parametrize("answer, status, code", [
    ((503, "text/plain", b"activator: no healthy upstream"), 503, "upstream_503"),
    ((502, "text/html", b"<html>bad gateway</html>"), 502, "upstream_502"),
    ((504, "text/plain", b"upstream request timeout"), 504, "upstream_504"),
    ((429, "application/json", json.dumps({"error": {"message": "busy", "type": "rate_limit_error",
                                                      "code": "queue_full", "param": None}}).encode()), 429,
     "queue_full"),
])
def test_transient_worker_answers_are_retryable_on_both_edges(client, fake, worker, answer, status, code):
    worker.answer = answer
    over_http = client.post("/v1/completions", json={"model": "model-b", "prompt": "x"})
    assert over_http.status_code == status and over_http.get_json()["error"]["code"] == code
    as_event = completion_event(client)
    assert as_event.status_code == status and "ce-type" not in as_event.headers  # the broker retries
    assert as_event.get_json()["error"]["code"] == code
    assert fake.calls.count(("done", "model-b")) == 2, "every lease is given back"


def test_a_worker_500_is_a_permanent_failure_on_both_edges(client, worker):
    worker.answer = (500, "application/json", ENVELOPE_500)
    over_http = client.post("/v1/completions", json={"model": "model-b", "prompt": "x"})
    assert over_http.status_code == 500 and over_http.get_json() == json.loads(ENVELOPE_500)
    reply = completion_event(client)
    assert reply.status_code == 200 and reply.headers["ce-type"] == "ai.llm-d.fma.completion.failed"
    assert reply.get_json() == json.loads(ENVELOPE_500)


@pytest.mark.parametrize("answer", [
    (200, "text/plain", b"surprise"),
    (200, "text/html", b"<html><body>a captive portal</body></html>"),
    (200, "application/json", b'{"id": "cmpl-1", "choices": [{"te'),  # cut short, Content-Length agreeing
    (200, "application/json", b'["not", "an", "object"]'),
    (200, "application/json", b""),
])
def test_a_worker_answer_that_is_not_a_json_object_is_a_502_on_both_edges_and_the_worker_is_probed(
        client, fake, worker, answer):
    worker.answer = answer
    over_http = client.post("/v1/completions", json={"model": "model-b", "prompt": "x"})
    assert over_http.status_code == 502, over_http.data
    error = over_http.get_json()["error"]
    assert error["code"] == "upstream_bad_body" and "not a JSON object" in error["message"]
    assert ("unreachable", "model-b") in fake.calls, "a worker answering garbage is probed (replaced if sick)"
    as_event = completion_event(client)
    assert as_event.status_code == 502 and "ce-type" not in as_event.headers  # the broker retries
    assert as_event.get_json()["error"]["code"] == "upstream_bad_body"
    assert fake.calls.count(("done", "model-b")) == 2, "every lease is given back"


def test_events_without_an_id_or_a_specversion_are_400_in_both_modes(client):
    """The SDK would make up an id (and a specversion): the reply's requestid would match nothing sent."""
    binary = client.post("/", json={"model": "model-b", "prompt": "x"}, headers={
        "ce-specversion": "1.0", "ce-type": "ai.llm-d.fma.completion.requested", "ce-source": "/t"})
    assert binary.status_code == 400 and "missing required attribute(s) id" in binary.get_json()["error"]["message"]
    for missing in ("id", "specversion"):
        event = {"specversion": "1.0", "id": "e1", "source": "/t", "type": "ai.llm-d.fma.completion.requested",
                 "data": {"model": "model-b", "prompt": "x"}}
        del event[missing]
        resp = client.post("/", data=json.dumps(event), content_type="application/cloudevents+json")
        assert resp.status_code == 400, resp.data
        assert f"missing required attribute(s) {missing}" in resp.get_json()["error"]["message"]


def test_a_successful_event_sends_the_same_body_as_http_with_stream_off(client, worker):
    worker.answer = (200, "application/json", json.dumps({"id": "cmpl-1", "choices": []}).encode())
    reply = completion_event(client, stream=True, max_tokens=3)
    assert reply.headers["ce-type"] == "ai.llm-d.fma.completion.succeeded"
    assert reply.get_json() == {"id": "cmpl-1", "choices": []}
    assert worker.requests[-1] == {"model": "model-b", "prompt": "x", "stream": False, "max_tokens": 3}


def test_an_unreachable_worker_is_a_502_and_is_reported_to_the_actuator(client, fake):
    fake.worker_url = "http://127.0.0.1:9"  # nothing listens on the discard port
    resp = client.post("/v1/completions", json={"model": "model-b", "prompt": "x"})
    assert resp.status_code == 502 and resp.get_json()["error"]["code"] == "worker_unreachable"
    assert ("unreachable", "model-b") in fake.calls


# ---- a stream that waits for a cold start ------------------------------------------------------

SSE = b'data: {"choices": [{"text": "Hi"}]}\n\ndata: [DONE]\n\n'


@pytest.fixture()
def keepalive_client(fake: FakeActuator):
    registry = ModelRegistry.from_text(
        "models:\n" + "".join(f"  - {{name: {m}, source: 'embedded:smollm2-135m-instruct'}}\n" for m in MODELS))
    app = create_app(RequesterSettings.from_env({"FMA_LOG_LEVEL": "warning", "FMA_STREAM_KEEPALIVE": "50ms"}),
                     registry=registry, actuator=fake)
    return app.test_client()


def test_a_stream_waiting_for_a_cold_start_gets_keepalives_then_its_tokens(keepalive_client, fake, worker):
    worker.answer = (200, "text/event-stream", SSE)
    fake.gate.clear()
    resp = keepalive_client.post("/v1/completions", json={"model": "model-b", "prompt": "x", "stream": True},
                                 buffered=False)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    chunks = iter(resp.response)
    assert next(chunks) == b": keepalive\n\n"
    assert next(chunks) == b": keepalive\n\n", "one every FMA_STREAM_KEEPALIVE while it waits"
    fake.gate.set()  # the worker is ready
    rest = b"".join(chunks)
    assert rest.startswith(b": fma-actuation cold;dur=") and rest.endswith(SSE)
    resp.close()
    assert ("done", "model-b") in fake.calls


def test_a_start_that_fails_after_keepalives_ends_the_stream_with_an_error_event(keepalive_client, fake):
    from fma_common.errors import WorkerFailed

    fake.gate.clear()
    fake.fail_after_gate = WorkerFailed("worker for model-b failed to start: out of memory")
    resp = keepalive_client.post("/v1/completions", json={"model": "model-b", "prompt": "x", "stream": True},
                                 buffered=False)
    chunks = iter(resp.response)
    assert next(chunks) == b": keepalive\n\n"
    fake.gate.set()
    last = b"".join(chunks).strip().rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: ") and json.loads(last[6:])["error"]["code"] == "worker_failed"
    assert b"[DONE]" not in last


def test_a_client_that_leaves_during_the_wait_gives_up_its_place(keepalive_client, fake):
    fake.gate.clear()
    resp = keepalive_client.post("/v1/completions", json={"model": "model-b", "prompt": "x", "stream": True},
                                 buffered=False)
    assert next(iter(resp.response)) == b": keepalive\n\n"
    resp.close()
    assert ("abandon", "model-b") in fake.calls


def test_a_stream_served_at_once_or_refused_at_once_has_its_usual_status(keepalive_client, fake, worker):
    worker.answer = (200, "text/event-stream", SSE)
    resp = keepalive_client.post("/v1/completions", json={"model": "model-b", "prompt": "x", "stream": True})
    assert resp.status_code == 200 and resp.data == SSE and resp.headers["X-FMA-Actuation"].startswith("cold;")
    fake.refuse_with = QueueFull("64 requests already wait", retry_after=5)
    resp = keepalive_client.post("/v1/completions", json={"model": "model-b", "prompt": "x", "stream": True})
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "5"


def test_new_requests_while_draining_get_503_shutting_down_with_retry_after(client):
    from fma_requester import drain

    drain.begin(30.0)
    try:
        resp = client.post("/v1/completions", json={"model": "model-b", "prompt": "hi"})
        assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "shutting_down"
        assert resp.headers["Retry-After"] == "1"
        assert client.get("/health").status_code == 200, "probes still answer while draining"
    finally:
        drain.reset()


# ---- issue 22: each layer answers before the one that retries it; one completion per event -------------------

def deadline_client(fake: FakeActuator, deadline: str):
    registry = ModelRegistry.from_text(
        "models:\n" + "".join(f"  - {{name: {m}, source: 'embedded:smollm2-135m-instruct'}}\n" for m in MODELS))
    app = create_app(RequesterSettings.from_env({"FMA_LOG_LEVEL": "warning", "FMA_EVENTS_DEADLINE": deadline}),
                     registry=registry, actuator=fake)
    return app.test_client()


def test_an_event_still_waiting_for_its_worker_at_its_deadline_fails_permanently(fake):
    """Not a 503 (the Broker would deliver it again and wait again): completion.failed, deadline_exceeded."""
    fake.gate.clear()  # the worker never becomes ready: without the deadline this would wait until the test's timeout
    resp = completion_event(deadline_client(fake, "1s"))
    assert resp.status_code == 200 and resp.headers["ce-type"] == "ai.llm-d.fma.completion.failed"
    assert resp.get_json()["error"]["code"] == "deadline_exceeded"


def test_an_event_whose_worker_is_still_generating_at_its_deadline_fails_permanently(fake, worker):
    worker.delay_s = 10.0  # it would answer with a success after 10 s: the failed reply says the deadline cut it
    resp = completion_event(deadline_client(fake, "1s"))
    assert resp.headers["ce-type"] == "ai.llm-d.fma.completion.failed", "cut at the deadline, not the answer"
    assert resp.get_json()["error"]["code"] == "deadline_exceeded"
    assert ("unreachable", "model-b") not in fake.calls, "a busy worker is not probed as if it hung"


def test_an_event_delivered_again_gets_the_first_reply_not_a_second_completion(client, fake, worker):
    worker.answer = (200, "application/json", json.dumps({"id": "cmpl-1", "object": "text_completion",
                                                          "choices": []}).encode())
    first = completion_event(client)
    again = completion_event(client)
    assert len(worker.requests) == 1, "one completion"
    assert again.data == first.data and again.headers["ce-id"] == first.headers["ce-id"], "the same reply event"
    other = client.post("/", json={"model": "model-b", "prompt": "x"}, headers={
        "ce-specversion": "1.0", "ce-type": "ai.llm-d.fma.completion.requested", "ce-source": "/other", "ce-id": "c9"})
    assert other.status_code == 200 and len(worker.requests) == 2, "the same id from another source is another event"


def test_an_event_that_failed_transiently_is_done_again_when_redelivered(client, fake, worker):
    fake.refuse_with = QueueFull("busy", retry_after=1)
    assert completion_event(client).status_code == 429
    fake.refuse_with = None
    assert completion_event(client).headers["ce-type"] == "ai.llm-d.fma.completion.succeeded"
    assert len(worker.requests) == 1


def test_a_repeat_in_the_other_mode_gets_the_same_reply_in_its_own_mode(client, fake, worker):
    """Same source and id, first binary then structured: one completion, the same reply event, each in its mode."""
    first = completion_event(client)
    structured = client.post("/", content_type="application/cloudevents+json", data=json.dumps({
        "specversion": "1.0", "type": "ai.llm-d.fma.completion.requested", "source": "/t", "id": "c9",
        "datacontenttype": "application/json", "data": {"model": "model-b", "prompt": "x"}}))
    assert len(worker.requests) == 1
    assert structured.content_type.startswith("application/cloudevents+json")
    assert structured.get_json()["id"] == first.headers["ce-id"]
