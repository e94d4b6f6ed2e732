"""The Broker simulator behaves as knative/eventing does (each test names the behaviour and its source file)."""

from __future__ import annotations

import base64
import itertools
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from broker_sim import Delivery, SimulatedBroker, iso8601_seconds, should_retry, trigger_matches
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event
from cloudevents.core.v1.event import CloudEvent

SPEED = 20.0


class Subscriber:
    """A scripted subscriber: answers from a list of (status, headers, body), then the last one forever."""

    def __init__(self, answers: list[tuple[int, dict[str, str], bytes]]) -> None:
        self.answers = answers
        self.requests: list[tuple[dict[str, str], bytes, float]] = []
        sub = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sub.requests.append((dict(self.headers), body, time.monotonic()))
                status, headers, answer = sub.answers[min(len(sub.requests), len(sub.answers)) - 1]
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def subs() -> Iterator[dict[str, Subscriber]]:
    made: dict[str, Subscriber] = {}
    yield made
    for s in made.values():
        s.stop()


def broker(subs: dict[str, Subscriber], triggers: list[tuple[str, dict[str, Any], str]],
           delivery: dict[str, Any] | None = None) -> SimulatedBroker:
    def resolve(dest: dict[str, Any]) -> str:
        return subs[dest["ref"]["name"]].url + dest.get("uri", "")

    return SimulatedBroker(
        {"metadata": {"name": "b", "namespace": "ns"}, "spec": {"delivery": delivery or {}}},
        [{"metadata": {"name": name}, "spec": {"broker": "b", **spec, "subscriber": {"ref": {"name": sub}}}}
         for name, spec, sub in triggers], resolve, speed=SPEED)


def send(b: SimulatedBroker, type_: str, **attrs: Any) -> httpx.Response:
    msg = to_binary_event(CloudEvent({"type": type_, "source": "/test", **attrs}, b"{}"))
    return httpx.post(b.url, content=msg.body, headers=dict(msg.headers), timeout=10)


def reply_of(type_: str) -> tuple[int, dict[str, str], bytes]:
    msg = to_binary_event(CloudEvent({"type": type_, "source": "/sub", "datacontenttype": "application/json"},
                                     b"{}"))
    return 200, dict(msg.headers), msg.body


def test_iso8601_periods_parse_as_knative_reads_them():
    assert iso8601_seconds("PT10M") == 600 and iso8601_seconds("PT0.5S") == 0.5 and iso8601_seconds("P1D") == 86400
    for bad in ("10m", "PT", "P", "1S"):
        with pytest.raises(ValueError):
            iso8601_seconds(bad)


def test_selective_retry_and_backoff_follow_retries_go():
    assert [should_retry(s) for s in (None, 500, 503, 404, 408, 409, 429)] == [True] * 7
    assert [should_retry(s) for s in (200, 202, 301, 400, 401, 403, 410, 413)] == [False] * 8
    exp = Delivery(retry=3, backoff_policy="exponential", backoff_delay_s=2)
    assert [exp.backoff(i, 500, None) for i in range(3)] == [2, 4, 8], "delay * 2^i, i from 0 (go-retryablehttp)"
    lin = Delivery(retry=3, backoff_policy="linear", backoff_delay_s=2)
    assert [lin.backoff(i, 500, None) for i in range(3)] == [0, 2, 4]
    assert exp.backoff(0, 503, "30") == 2, "Retry-After is ignored unless retryAfterMax is set"
    honour = Delivery(retry=3, backoff_policy="exponential", backoff_delay_s=2, retry_after_max_s=20)
    assert honour.backoff(0, 503, "30") == 20 and honour.backoff(0, 429, "5") == 5 and honour.backoff(0, 500, "5") == 2


def test_legacy_attribute_filters_are_exact_and_empty_means_present():
    spec = {"filter": {"attributes": {"type": "a.b", "ext": ""}}}
    assert trigger_matches(spec, {"type": "a.b", "ext": "x"})
    assert not trigger_matches(spec, {"type": "a.b"}), "an empty value still needs the attribute"
    assert not trigger_matches(spec, {"type": "a.b.c", "ext": "x"})
    new = {"filters": [{"any": [{"exact": {"type": "a"}}, {"prefix": {"type": "b."}}]},
                       {"not": {"suffix": {"type": ".x"}}}],
           "filter": {"attributes": {"type": "never"}}}
    assert trigger_matches(new, {"type": "a"}) and trigger_matches(new, {"type": "b.y"})
    assert not trigger_matches(new, {"type": "b.x"}), "filters win over filter when both are set"


def test_the_ingress_sets_the_ttl_and_drops_an_event_whose_ttl_is_spent(subs):
    subs["s"] = Subscriber([(202, {}, b"")])
    b = broker(subs, [("t", {"filter": {"attributes": {"type": "x"}}}, "s")])
    try:
        assert send(b, "x").status_code == 202
        b.wait(lambda: len(subs["s"].requests) == 1, 5, "the delivery")
        headers, _, _ = subs["s"].requests[0]
        lower = {k.lower(): v for k, v in headers.items()}
        assert "ce-knativebrokerttl" not in lower, "the TTL is the Broker's own: removed before delivery"
        assert lower["prefer"] == "reply" and lower["kn-namespace"] == "ns" and "ce-knativearrivaltime" in lower
        assert b.received[0]["knativebrokerttl"] == 255
        assert send(b, "x", knativebrokerttl="1").status_code == 400 and b.dropped_ttl, "1 - 1 = 0: dropped"
        assert send(b, "x", knativebrokerttl="7").status_code == 202 and b.received[-1]["knativebrokerttl"] == 6
        assert send(b, "nobody-listens").status_code == 202, "accepted, and delivered to no one"
    finally:
        b.stop()


def test_a_reply_goes_back_into_the_broker_one_ttl_down_and_a_reply_loop_dies(subs):
    subs["echo"] = Subscriber([reply_of("x")])  # a subscriber that answers x with x: a loop
    b = broker(subs, [("t", {"filter": {"attributes": {"type": "x"}}}, "echo")])
    try:
        send(b, "x", knativebrokerttl="5")
        b.wait(lambda: b.dropped_ttl, 10, "the loop to run out of TTL")
        assert [r["knativebrokerttl"] for r in b.received] == [4, 3, 2, 1]
    finally:
        b.stop()


def test_retries_then_the_dead_letter_sink_with_knatives_error_extensions(subs):
    subs["s"] = Subscriber([(503, {"Retry-After": "1"}, b'{"error": "busy"}')])
    subs["dls"] = Subscriber([(202, {}, b"")])
    delivery = {"retry": 2, "backoffPolicy": "exponential", "backoffDelay": "PT1S",
                "deadLetterSink": {"ref": {"name": "dls"}, "uri": "/dead-letter"}}
    b = broker(subs, [("t", {"filter": {"attributes": {"type": "x"}}}, "s")], delivery)
    try:
        send(b, "x", subject="m")
        b.wait(lambda: subs["dls"].requests, 10, "the dead letter")
        times = [t for _, _, t in subs["s"].requests]
        assert len(times) == 3, "1 attempt + 2 retries"
        gaps = [(b2 - a) * SPEED for a, b2 in itertools.pairwise(times)]
        assert gaps[0] >= 0.9 and gaps[1] >= 1.9, f"waited delay*2^i: {gaps}"
        headers, _, _ = subs["dls"].requests[0]
        lower = {k.lower(): v for k, v in headers.items()}
        assert lower["ce-knativeerrorcode"] == "503" and lower["ce-knativeerrordest"] == subs["s"].url
        assert base64.b64decode(lower["ce-knativeerrordata"]) == b'{"error": "busy"}'
        assert lower["ce-subject"] == "m", "the original event"
        (record,) = b.deliveries("t")
        assert record.outcome == "dead-lettered" and [a.status for a in record.attempts] == [503, 503, 503]
    finally:
        b.stop()


def test_a_non_event_body_is_a_failed_delivery_and_a_4xx_is_not_retried(subs):
    subs["plain"] = Subscriber([(200, {"Content-Type": "application/json"}, b'{"not": "an event"}'),
                                (202, {}, b"")])
    subs["bad"] = Subscriber([(400, {}, b"no")])
    b = broker(subs, [("p", {"filter": {"attributes": {"type": "x"}}}, "plain"),
                      ("q", {"filter": {"attributes": {"type": "y"}}}, "bad")],
               {"retry": 3, "backoffPolicy": "linear", "backoffDelay": "PT1S"})
    try:
        send(b, "x")
        send(b, "y")
        b.wait(lambda: all(r.outcome != "pending" for r in b.records) and len(b.records) == 2, 10, "both")
        (p,) = b.deliveries("p")
        assert [a.status for a in p.attempts] == [502, 202] and p.outcome == "delivered"
        (q,) = b.deliveries("q")
        assert [a.status for a in q.attempts] == [400] and q.outcome == "failed"
    finally:
        b.stop()


def test_a_structured_reply_is_understood_too(subs):
    reply = CloudEvent({"type": "done", "source": "/s", "datacontenttype": "application/json"}, b'{"a": 1}')
    from cloudevents.core.bindings.http import to_structured_event

    msg = to_structured_event(reply)
    subs["s"] = Subscriber([(200, dict(msg.headers), msg.body)])
    b = broker(subs, [("t", {"filter": {"attributes": {"type": "x"}}}, "s")])
    try:
        send(b, "x")
        b.wait(lambda: any(r["type"] == "done" for r in b.received), 5, "the reply")
        got = from_http_event(HTTPMessage(dict(msg.headers), msg.body))
        assert got.get_type() == "done"
    finally:
        b.stop()


# ---- the channel: synchronous (Eventing's default) or asynchronous (issue 22) ----------------------------------

def test_a_synchronous_channel_answers_after_its_subscribers_and_500_when_one_failed(subs):
    """fanout_event_handler.go dispatch + event_receiver.go: 202 only once every delivery ended; a failed one
    (after its retries, no dead letter) is 500 for the producer, never the subscriber's own status."""
    subs["ok"] = Subscriber([(200, {}, b"")])
    subs["bad"] = Subscriber([(400, {}, b"")])
    b = broker(subs, [("t1", {"filter": {"attributes": {"type": "a"}}}, "ok"),
                      ("t2", {"filter": {"attributes": {"type": "b"}}}, "bad")])
    try:
        assert send(b, "a", id="1").status_code == 202 and len(subs["ok"].requests) == 1, "answered after it"
        assert send(b, "b", id="2").status_code == 500
    finally:
        b.stop()


def test_a_synchronous_fan_out_gives_up_after_its_timeout_with_500(subs):
    subs["slow"] = Subscriber([(200, {}, b"")])
    b = broker(subs, [("t", {}, "slow")])
    b.fanout_timeout_s = 0.0  # defaultTimeout (15 min) with no further result
    try:
        assert send(b, "a", id="1").status_code == 500
    finally:
        b.stop()


def test_an_asynchronous_channel_answers_202_before_any_delivery(subs):
    """The Broker's messaging.knative.dev/async-handler, copied to its channel (broker.go), read with ParseBool."""
    subs["bad"] = Subscriber([(400, {}, b"")])

    def resolve(dest: dict[str, Any]) -> str:
        return subs[dest["ref"]["name"]].url

    for value, asynchronous in (("true", True), ("1", True), ("True", True), ("yes", False), ("false", False)):
        trigger = {"metadata": {"name": "t"}, "spec": {"broker": "b", "subscriber": {"ref": {"name": "bad"}}}}
        b = SimulatedBroker({"metadata": {"name": "b", "namespace": "ns",
                                          "annotations": {"messaging.knative.dev/async-handler": value}}},
                            [trigger], resolve, speed=SPEED)
        try:
            assert b.asynchronous is asynchronous, value
            assert send(b, "a", id=value).status_code == (202 if asynchronous else 500), value
        finally:
            b.stop()


def test_a_reply_the_broker_cannot_take_is_retried_then_the_original_goes_to_the_dead_letter_sink(subs):
    """event_dispatcher.go send: the reply goes with the delivery's retries; when it still fails, the original
    event is dead-lettered, which counts as delivered (the synchronous producer gets 202)."""
    subs["replier"] = Subscriber([reply_of("r")])
    subs["bad"] = Subscriber([(400, {}, b"")])
    # The dead-letter sink refuses the reply's own dead letters (so the reply's fan-out fails: 500 at the ingress,
    # twice), then takes the original event.
    subs["dls"] = Subscriber([(400, {}, b""), (400, {}, b""), (202, {}, b"")])
    b = broker(subs, [("t1", {"filter": {"attributes": {"type": "a"}}}, "replier"),
                      ("t2", {"filter": {"attributes": {"type": "r"}}}, "bad")],
               delivery={"retry": 1, "backoffPolicy": "linear", "backoffDelay": "PT0.1S",
                         "deadLetterSink": {"ref": {"name": "dls"}}})
    try:
        assert send(b, "a", id="1").status_code == 202
        (first,) = b.deliveries("t1")
        assert first.outcome == "dead-lettered" and len(subs["replier"].requests) == 1
        types = [{k.lower(): v for k, v in h.items()}.get("ce-type") for h, _, _ in subs["dls"].requests]
        assert types == ["r", "r", "a"], types
        assert len(subs["bad"].requests) == 2, "the reply went twice (one retry), and failed each time"
    finally:
        b.stop()
