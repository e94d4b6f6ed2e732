"""Events through the Broker when their subscriber is cold (issue 22, point 2).

The Broker is played by tests/broker_sim.py with the shipped manifests; a
scale-to-zero subscriber by tests/cold_start.py (the activator holding
requests while the pod starts, dropping those whose client hung up). The
lifecycle sender is the requester's own (fma_requester/events.py), the event
log and the requester are the real processes.

* With the in-memory channel synchronous (Eventing's default, and the shipped
  Broker before this issue), the ingress answers a lifecycle event only once
  the cold event log took it: the sender's 2 s timeout fires, each re-send is
  cancelled with it, and the first event is lost (reproduced below).
* With the shipped Broker (``messaging.knative.dev/async-handler``) every
  lifecycle event is recorded exactly once and in the sender's order, and a
  producer that gives up on ``completion.requested`` and sends it again still
  gets one completion (the requester answers a repeated event id with its
  first reply: fma_requester/replies.py).
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker_sim import SimulatedBroker
from cloudevents.core.bindings.http import to_binary_event
from cloudevents.core.v1.event import CloudEvent
from cold_start import ColdService
from prometheus_client import CollectorRegistry, Counter
from test_eventing_process import event_log, models_file
from test_manifests import by_kind, render

from conftest import requester, wait_for
from fma_requester import protocol as p
from fma_requester.events import EmitterConfig, SinkEmitter

pytestmark = pytest.mark.process

START_S = 7.0  # the event log's cold start: longer than the sender's 2 s timeout and its re-sends (0.2, 0.4 s)
SENT = [p.WORKER_STARTED, p.WORKER_READY_EVENT, p.WORKER_SLEEPING, p.WORKER_READY_EVENT, p.WORKER_RELEASED,
        p.WORKER_STARTED]


def shipped(asynchronous: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    docs = render("knative/eventing")
    (broker,) = by_kind(docs, "Broker")
    broker = copy.deepcopy(broker)
    if not asynchronous:  # the Broker as shipped before issue 22
        broker["metadata"]["annotations"].pop("messaging.knative.dev/async-handler")
    return broker, by_kind(docs, "Trigger")


def lifecycle(log_url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{log_url}/events", params={"route": "lifecycle"}, timeout=10).json()["data"]


def emit_all(broker: SimulatedBroker) -> tuple[SinkEmitter, Counter]:
    registry = CollectorRegistry()
    sent = Counter("sent", "", ["type"], registry=registry)
    dropped = Counter("dropped", "", ["reason"], registry=registry)
    # The requester's defaults: FMA_EVENTS_TIMEOUT 2s, FMA_EVENTS_RETRIES 2.
    emitter = SinkEmitter(EmitterConfig(sink=broker.url, token_file=None), sent=sent, dropped=dropped)
    for i, type_ in enumerate(SENT):
        emitter(type_, {"model": "m", "n": i})
    return emitter, dropped


def dropped_total(dropped: Counter) -> float:
    return sum(s.value for m in dropped.collect() for s in m.samples if s.name.endswith("_total"))


def test_a_synchronous_channel_loses_the_lifecycle_event_that_met_a_cold_event_log(tmp_path: Path):
    """The defect, reproduced: the Broker as shipped before (no async-handler)."""
    broker_obj, triggers = shipped(asynchronous=False)
    with event_log(tmp_path) as log_url:
        cold = ColdService(log_url, START_S)
        broker = SimulatedBroker(broker_obj, triggers, lambda dest: cold.url + dest.get("uri", ""))
        try:
            emitter, dropped = emit_all(broker)
            emitter.close(60)
            time.sleep(1.0)
            got = [e["type"] for e in lifecycle(log_url)]
            print(f"synchronous channel: sent {len(SENT)}, recorded {len(got)}, sender dropped "
                  f"{dropped_total(dropped):.0f}, activator dropped {cold.dropped} held requests")
            assert dropped_total(dropped) >= 1 and got != SENT, "the first event did not survive the cold start"
            assert got == SENT[1:], got
        finally:
            broker.stop()
            cold.stop()


def test_every_lifecycle_event_reaches_a_cold_event_log_exactly_once_in_order(tmp_path: Path):
    broker_obj, triggers = shipped(asynchronous=True)
    with event_log(tmp_path) as log_url:
        cold = ColdService(log_url, START_S)
        broker = SimulatedBroker(broker_obj, triggers, lambda dest: cold.url + dest.get("uri", ""))
        try:
            t0 = time.monotonic()
            emitter, dropped = emit_all(broker)
            emitter.close(30)
            print(f"asynchronous channel: the sender was done after {time.monotonic() - t0:.2f} s")
            wait_for(lambda: len(lifecycle(log_url)) >= len(SENT), 60, "every event in the log")
            time.sleep(1.0)  # room for a duplicate to show up
            got = lifecycle(log_url)
            print(f"recorded {len(got)} of {len(SENT)} after {time.monotonic() - t0:.1f} s; cold starts "
                  f"{cold.cold_starts}")
            assert [e["type"] for e in got] == SENT, "each once, in the order sent"
            assert [e["sequence"] for e in got] == sorted(e["sequence"] for e in got)
            assert len({e["id"] for e in got}) == len(SENT)
            assert dropped_total(dropped) == 0 and cold.cold_starts == 1
        finally:
            broker.stop()
            cold.stop()


def test_a_repeated_event_id_is_recorded_once():
    """The event log's side of at-least-once delivery, alone: the same source and id twice is one record."""
    from fma_requester.eventlog import EventLogSettings, create_app

    app = create_app(EventLogSettings.from_env({}))
    client = app.test_client()
    event = CloudEvent({"type": p.WORKER_READY_EVENT, "source": "/fma/requester", "id": "e-1", "sequence": "2"}, None)
    msg = to_binary_event(event)
    for _ in range(3):
        assert client.post("/", data=msg.body, headers=dict(msg.headers)).status_code == 202
    earlier = to_binary_event(CloudEvent({"type": p.WORKER_STARTED, "source": "/fma/requester", "id": "e-0",
                                          "sequence": "1"}, None))
    client.post("/", data=earlier.body, headers=dict(earlier.headers))
    kept = client.get("/events").get_json()["data"]
    assert [(e["id"], e["type"]) for e in kept] == [("e-0", p.WORKER_STARTED), ("e-1", p.WORKER_READY_EVENT)]
    assert b'fma_events_duplicate_total{type="ai.llm-d.fma.worker.ready"} 2.0' in client.get("/metrics").data


def completions_run(req: Any, model: str) -> float:
    """Completions the requester sent to a worker and got answered (fma_requests_total)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{req.spi}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "fma_requests_total" and sample.labels.get("model") == model
               and sample.labels.get("endpoint") == "/v1/completions" and sample.labels.get("status") == "200")


@pytest.mark.parametrize("asynchronous", [True, False], ids=["shipped", "synchronous"])
def test_an_impatient_producer_of_a_completion_gets_exactly_one_completion(asynchronous: bool, tmp_path: Path,
                                                                          tiny_model_dir: Path):
    """A producer sends completion.requested for a cold model with a 1 s timeout, and sends the same event
    again each time it times out (as a CloudEvents producer should: same id). Through the shipped Broker it
    gets 202 at once and the requester runs one completion; through a synchronous channel its hang-ups cancel
    the deliveries, and the Broker's retries of the same event get the first delivery's reply, not a second
    completion."""
    broker_obj, triggers = shipped(asynchronous)
    urls: dict[str, str] = {}
    models = models_file(tmp_path, tiny_model_dir, "")
    with event_log(tmp_path) as log_url, requester(tmp_path, models) as req:
        urls.update({"fma-requester": req.spi, "fma-event-log": log_url})
        broker = SimulatedBroker(broker_obj, triggers, lambda dest: urls[dest["ref"]["name"]] + dest.get("uri", ""))
        try:
            event_id = uuid.uuid4().hex
            data = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 3}).encode()
            msg = to_binary_event(CloudEvent({"type": p.COMPLETION_REQUESTED, "source": "/test/producer",
                                              "id": event_id, "datacontenttype": "application/json"}, data))
            answers: list[str] = []
            for _ in range(4):
                try:
                    status = httpx.post(broker.url, content=msg.body, headers=dict(msg.headers), timeout=1.0)
                    answers.append(str(status.status_code))
                    if status.status_code == 202:
                        break
                except httpx.TimeoutException:
                    answers.append("timeout")
            wait_for(lambda: completions_run(req, "tiny") >= 1, 120, "the completion")
            time.sleep(3.0)  # room for a second completion to show up
            replies = [r for r in broker.received if r.get("requestid") == event_id]
            runs = completions_run(req, "tiny")
            deliveries = [r for r in broker.deliveries("fma-completion-requested") if r.event_id == event_id]
            print(f"{'shipped' if asynchronous else 'synchronous'}: producer saw {answers}; deliveries "
                  f"{[(r.outcome, [a.status for a in r.attempts]) for r in deliveries]}; completions run {runs:.0f}; "
                  f"reply events {len(replies)}")
            assert runs == 1, "one completion for one event, however often it was delivered"
            if asynchronous:
                assert answers == ["202"], "the producer is answered at once"
                assert len(replies) == 1 and deliveries[0].outcome == "replied"
            else:
                # A synchronous channel holds the producer for the whole completion: it gave up each time and
                # each hang-up cancelled the delivery (and its reply). Its repeats cost no second completion.
                assert "timeout" in answers and len(deliveries) > 1
        finally:
            broker.stop()
