"""A real requester (gunicorn) and its CloudEvents: lifecycle events to a sink on loopback, a sink that is down
or hangs, and the whole Eventing path with the Broker simulated from knative/eventing's own manifests."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker_sim import SimulatedBroker
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event
from cloudevents.core.v1.event import CloudEvent
from eventing_webhook import errors as webhook_errors
from kube_fake import FakeKube, load_role, write_kubeconfig
from test_events import closed_port
from test_manifests import by_kind, render

from conftest import REPO, free_port, requester, wait_for
from fma_common.procs import start_gunicorn, stop_process_group, wait_ready
from fma_requester import protocol as p

pytestmark = pytest.mark.process
OVERRIDES = '{"extensions": {"fmadeployment": "test"}}'


class CaptureSink:
    """A CloudEvents sink on loopback; ``hang=True`` accepts and never answers."""

    def __init__(self, hang: bool = False) -> None:
        self.events: list[Any] = []
        self.hang = hang
        self.release = threading.Event()
        sink = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *_a: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if sink.hang:
                    sink.release.wait(60)
                    return
                sink.events.append(from_http_event(HTTPMessage(dict(self.headers), body)))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def types(self) -> list[str]:
        return [e.get_type().removeprefix("ai.llm-d.fma.worker.") for e in self.events]

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def data_of(event: Any) -> dict[str, Any]:
    data = event.get_data()
    return data if isinstance(data, dict) else json.loads(data)


def models_file(tmp_path: Path, tiny: Path, extra: str = "") -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(f"models:\n  - {{name: tiny, source: 'path:{tiny}'}}\n{extra}")
    return path


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}}") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def complete(url: str, prompt: str = "Hello") -> float:
    started = time.monotonic()
    resp = httpx.post(f"{url}/v1/completions", timeout=120,
                      json={"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0})
    assert resp.status_code == 200, resp.text
    return time.monotonic() - started


def test_a_warm_sleep_release_cycle_reaches_the_sink_in_order_with_the_overrides(tmp_path: Path,
                                                                                 tiny_model_dir: Path):
    sink = CaptureSink()
    try:
        with requester(tmp_path, models_file(tmp_path, tiny_model_dir), K_SINK=sink.url,
                       K_CE_OVERRIDES=OVERRIDES) as req:
            assert httpx.post(f"{req.spi}/v1/workers/tiny/warm", timeout=120).status_code == 200
            assert httpx.post(f"{req.spi}/v1/workers/tiny/sleep", params={"level": 1}, timeout=60).status_code == 200
            assert httpx.delete(f"{req.spi}/v1/workers/tiny", timeout=60).status_code == 200
            wait_for(lambda: len(sink.events) >= 4, 20, "four lifecycle events")
            assert sink.types() == ["started", "ready", "sleeping", "released"]
            for e in sink.events:
                assert e.get_extension("fmadeployment") == "test" and e.get_subject() == "tiny"
                assert e.get_source() == p.EVENT_SOURCE and data_of(e)["model"] == "tiny"
            assert [data_of(e)["state"] for e in sink.events] == ["starting", "ready", "sleeping",
                                                                                  "cold"]
            assert metric(req.spi, "fma_events_sent_total", type=p.WORKER_RELEASED) == 1
    finally:
        sink.stop()


@pytest.mark.parametrize("failure", ["refused", "hangs"])
def test_a_dead_or_hanging_sink_costs_completions_nothing_and_is_counted(tmp_path: Path, tiny_model_dir: Path,
                                                                       failure: str):
    hanging = CaptureSink(hang=True)
    url = hanging.url if failure == "hangs" else f"http://127.0.0.1:{closed_port()}"
    try:
        with requester(tmp_path, models_file(tmp_path, tiny_model_dir), K_SINK=url, FMA_EVENTS_TIMEOUT="5s",
                       FMA_EVENTS_RETRIES="1", FMA_EVENTS_QUEUE="2") as req:
            complete(req.spi)  # the cold start: started and ready go to the broken sink
            for _ in range(3):  # more events than the queue holds: some are dropped at once
                assert httpx.delete(f"{req.spi}/v1/workers/tiny", timeout=60).status_code == 200
                complete(req.spi)
            times = [complete(req.spi, f"Hello {i}") for i in range(5)]
            # A send blocks for up to FMA_EVENTS_TIMEOUT (5 s) per try on a hanging sink; no completion waited on one.
            assert max(times) < 5.0, f"completions took {times}"
            reason = "timeout" if failure == "hangs" else "unreachable"
            wait_for(lambda: metric(req.spi, "fma_events_dropped_total", reason=reason) >= 1, 30, "a counted drop")
            if failure == "hangs":  # a refused connection fails at once; a hanging sink backs the queue up
                assert metric(req.spi, "fma_events_dropped_total", reason="queue_full") >= 1
            log = req.log()
            assert log.count("dropped") <= 3, "logged once per burst, not once per event"
            print(f"sink {failure}: 5 warm completions {statistics.median(times) * 1000:.0f} ms median")
    finally:
        hanging.stop()


# ---- the Broker, played by tests/broker_sim.py with knative/eventing's own objects ------------------------

@contextmanager
def event_log(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = start_gunicorn("fma_requester.eventlog_conf", "fma_requester.eventlog:create_app()",
                          {**os.environ, "FMA_BIND": f"127.0.0.1:{port}"}, tmp_path / "event-log.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, 60, tmp_path / "event-log.log")
        yield url
    finally:
        stop_process_group(proc, 30)


def send(broker: SimulatedBroker, type_: str, data: dict[str, Any], **attrs: str) -> str:
    """Into the Broker's ingress, as any producer would (binary mode)."""
    event_id = uuid.uuid4().hex
    msg = to_binary_event(CloudEvent({"type": type_, "source": "/test/producer", "id": event_id,
                                      "datacontenttype": "application/json", **attrs}, json.dumps(data).encode()))
    assert httpx.post(broker.url, content=msg.body, headers=dict(msg.headers), timeout=10).status_code == 202
    return event_id


def test_the_broker_path_end_to_end_with_the_example_manifests(tmp_path: Path, tiny_model_dir: Path):
    docs = render("knative/eventing")
    (broker_obj,) = by_kind(docs, "Broker")
    triggers = by_kind(docs, "Trigger")
    (completion_trigger,) = [t for t in triggers if t["metadata"]["name"] == "fma-completion-requested"]
    # The user who enables Knative's alpha delivery-retryafter flag and adds retryAfterMax gets Retry-After
    # honoured; the rest of the delivery is the manifest's.
    completion_trigger["spec"]["delivery"]["retryAfterMax"] = "PT1M"
    assert webhook_errors(completion_trigger, {"delivery-retryafter": "enabled"}) == []
    (binding,) = by_kind(docs, "SinkBinding")
    overrides = json.dumps({"extensions": binding["spec"]["ceOverrides"]["extensions"]})
    urls: dict[str, str] = {}

    def resolve(dest: dict[str, Any]) -> str:
        return urls[dest["ref"]["name"]] + dest.get("uri", "")

    # As the example deploys it: API keys on, so Broker deliveries get in by their OIDC tokens (Eventing's
    # authentication-oidc), checked with TokenReviews against the fake API server under the manifests' RBAC.
    (requester_svc,) = by_kind(render("knative/overlays/examples/fma-requester"), "Service", "fma-requester")
    env = {e["name"]: e.get("value") for e in requester_svc["spec"]["template"]["spec"]["containers"][0]["env"]}
    kube = FakeKube(role=load_role(REPO / "knative/base/role.yaml", REPO / "knative/base/tokenreview-rbac.yaml"))
    kube.start()
    kubeconfig = tmp_path / "kubeconfig"
    write_kubeconfig(kubeconfig, kube.url, namespace="fma-example")
    auth_env = {"FMA_API_KEYS": "infer-key", "FMA_ADMIN_KEYS": "admin-key", "KUBECONFIG": str(kubeconfig),
                "FMA_EVENTS_OIDC_AUDIENCE": env["FMA_EVENTS_OIDC_AUDIENCE"],
                "FMA_EVENTS_OIDC_SUBJECTS": env["FMA_EVENTS_OIDC_SUBJECTS"].replace("$(POD_NAMESPACE)", "fma-example")}
    speed = 20.0
    started = time.monotonic()
    broker = SimulatedBroker(broker_obj, triggers, resolve, speed=speed,
                             oidc_token=lambda user, audience: kube.issue_token(user, (audience,)))
    models = models_file(tmp_path, tiny_model_dir,
                         f"  - {{name: tiny-now, source: 'path:{tiny_model_dir}', queue_timeout: 0s}}\n"
                         "  - {name: broken, source: 'path:/nonexistent/model'}\n")
    try:
        with event_log(tmp_path) as log_url, \
                requester(tmp_path, models, K_SINK=broker.url, K_CE_OVERRIDES=overrides, **auth_env) as req:
            urls.update({"fma-requester": req.spi, "fma-event-log": log_url})

            # 1. A completion by event: delivered once, answered with a reply that goes back into the Broker.
            first = send(broker, p.COMPLETION_REQUESTED, {"model": "tiny", "prompt": "Hello", "max_tokens": 3})
            broker.wait(lambda: any(r.get("requestid") == first for r in broker.received), 120, "the reply")
            (reply,) = [r for r in broker.received if r.get("requestid") == first]
            assert reply["type"] == p.COMPLETION_SUCCEEDED and reply["subject"] == "tiny"
            (delivery,) = [r for r in broker.deliveries("fma-completion-requested") if r.event_id == first]
            assert [a.status for a in delivery.attempts] == [200] and delivery.outcome == "replied"
            headers = {k.lower(): v for k, v in delivery.request_headers.items()}
            assert headers["prefer"] == "reply" and headers["ce-type"] == p.COMPLETION_REQUESTED
            assert headers["authorization"].startswith("Bearer ey"), "delivered with the Trigger's OIDC token"

            # 2. A model that cannot be served at once (queue_timeout 0s): 503 + Retry-After, re-delivered
            #    after it, until the started worker answers.
            second = send(broker, p.COMPLETION_REQUESTED, {"model": "tiny-now", "prompt": "Hi", "max_tokens": 3})
            broker.wait(lambda: any(r.get("requestid") == second for r in broker.received), 120, "the retried reply")
            (retried,) = [r for r in broker.deliveries("fma-completion-requested") if r.event_id == second]
            statuses = [a.status for a in retried.attempts]
            assert statuses[0] == 503 and statuses[-1] == 200 and set(statuses[:-1]) == {503}, statuses
            print(f"tiny-now by event: attempts {statuses}, Retry-After {[a.retry_after for a in retried.attempts]}")
            for before, after in zip(retried.attempts, retried.attempts[1:], strict=False):
                assert before.retry_after and (after.at - before.at) * speed >= int(before.retry_after) - 0.5, \
                    "re-delivered no sooner than the requester's Retry-After"

            # 3. A model whose worker cannot start: retried to the end, then the dead-letter sink (the event log).
            third = send(broker, p.COMPLETION_REQUESTED, {"model": "broken", "prompt": "Hi", "max_tokens": 3})
            broker.wait(lambda: any(r.event_id == third and r.outcome == "dead-lettered" for r in broker.records),
                        120, "the dead letter")
            dead = httpx.get(f"{log_url}/events", params={"route": "dead-letter"}, timeout=10).json()["data"]
            (letter,) = [e for e in dead if e["id"] == third]
            (lost,) = [r for r in broker.records if r.event_id == third]
            print(f"broken by event: attempts {[a.status for a in lost.attempts]}, then the dead-letter sink")
            assert letter["type"] == p.COMPLETION_REQUESTED and letter["knativeerrorcode"] == "503"
            assert "broken" in letter["knativeerrordata"] and "data" not in letter, "no prompt kept"

            # 4. The scheduled pre-warm, as the PingSource sends it.
            (ping,) = by_kind(docs, "PingSource")
            send(broker, p.PING_TYPE, {"model": "tiny-now"}, **ping["spec"]["ceOverrides"]["extensions"])
            broker.wait(lambda: any(r.event_type == p.PING_TYPE and r.outcome == "replied" for r in broker.records),
                        60, "the pre-warm")

            # 5. Lifecycle events went to K_SINK (the Broker) and on to the event log, with the overrides; no
            #    reply or lifecycle event was delivered to the requester.
            def lifecycle() -> list[dict[str, Any]]:
                return httpx.get(f"{log_url}/events", params={"route": "lifecycle"}, timeout=10).json()["data"]

            wait_for(lambda: {"started", "ready"} <= {e["type"].rsplit(".", 1)[-1] for e in lifecycle()
                                                      if e["subject"] == "tiny"}, 30, "tiny's lifecycle in the log")
            emitted = [e for e in lifecycle() if "requestid" not in e]
            assert emitted and all(e["fmadeployment"] == "fma-example" for e in emitted)
            to_requester = [r for r in broker.records if r.trigger != "fma-lifecycle-log"]
            assert {r.event_type for r in to_requester} <= {p.COMPLETION_REQUESTED, p.PING_TYPE}
            assert len([r for r in to_requester if r.event_id == first]) == 1, "delivered once, no loop"
            reviews = sum(path.endswith("/tokenreviews") for _, path in kube.requests)
            # One review per Trigger token per minute the requester remembers it (fma_requester/oidc.py), not
            # one per delivery.
            tokens = {r.request_headers["Authorization"] for r in to_requester}
            minutes = 1 + int((time.monotonic() - started) // 60)
            assert len(tokens) <= reviews <= len(tokens) * minutes, (reviews, len(tokens), minutes)
            assert reviews < sum(len(r.attempts) for r in to_requester), "fewer reviews than deliveries"
            assert "infer-key" not in req.log() and "Bearer ey" not in req.log(), "no credential in the log"
    finally:
        broker.stop()
        kube.stop()
