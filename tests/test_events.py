"""The lifecycle-event sender: never blocks the caller, retries what may succeed, drops and counts the rest."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http_event

from fma_requester.events import EmitterConfig, SinkEmitter, parse_overrides
from fma_requester.metrics import RequesterMetrics


class Sink:
    def __init__(self, statuses: list[int] | None = None, hang: bool = False) -> None:
        self.statuses = statuses or [202]
        self.hang = hang
        self.events: list[tuple[dict[str, str], bytes]] = []
        self.release = threading.Event()
        sink = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *_a: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if sink.hang:
                    sink.release.wait(30)
                    return
                sink.events.append((dict(self.headers), body))
                status = sink.statuses[min(len(sink.events), len(sink.statuses)) - 1]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def metrics() -> RequesterMetrics:
    return RequesterMetrics()


def emitter(url: str, metrics: RequesterMetrics, **kw: object) -> SinkEmitter:
    cfg = EmitterConfig(url, **{"timeout_s": 0.5, "retries": 2, "backoff_s": 0.01, **kw})  # type: ignore[arg-type]
    return SinkEmitter(cfg, sent=metrics.events_sent, dropped=metrics.events_dropped)


def dropped(metrics: RequesterMetrics, reason: str) -> float:
    return metrics.registry.get_sample_value("fma_events_dropped_total", {"reason": reason}) or 0.0


def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.stop()


def test_events_arrive_in_order_in_binary_mode_with_the_overrides(sink: Sink, metrics: RequesterMetrics):
    emit = emitter(sink.url, metrics, overrides=parse_overrides('{"extensions": {"fmadeployment": "prod"}}'))
    for type_ in ("ai.llm-d.fma.worker.started", "ai.llm-d.fma.worker.ready", "ai.llm-d.fma.worker.released"):
        emit(type_, {"model": "m", "state": "x"})
    wait_for(lambda: len(sink.events) == 3)
    events = [from_http_event(HTTPMessage(h, b)) for h, b in sink.events]
    assert [e.get_type().rsplit(".", 1)[-1] for e in events] == ["started", "ready", "released"]
    assert all(e.get_extension("fmadeployment") == "prod" and e.get_subject() == "m" for e in events)
    assert metrics.registry.get_sample_value("fma_events_sent_total", {"type": "ai.llm-d.fma.worker.ready"}) == 1
    emit.close(1.0)


def test_bad_overrides_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING):
        assert parse_overrides("not json") == {}
        assert parse_overrides('{"extensions": {"Bad-Name": "x", "type": "y", "ok1": 3}}') == {"ok1": "3"}
        assert parse_overrides('{"extensions": ["x"]}') == {}
    assert "K_CE_OVERRIDES" in caplog.text
    assert parse_overrides(None) == {} and parse_overrides('{"extensions": {}}') == {}


def test_a_5xx_is_retried_and_a_4xx_is_not(metrics: RequesterMetrics):
    flaky = Sink([503, 503, 202])
    refusing = Sink([400])
    try:
        emitter(flaky.url, metrics)("ai.llm-d.fma.worker.ready", {"model": "m"})
        emitter(refusing.url, metrics)("ai.llm-d.fma.worker.ready", {"model": "m"})
        wait_for(lambda: len(flaky.events) == 3 and dropped(metrics, "rejected") == 1)
        time.sleep(0.2)
        assert len(refusing.events) == 1, "a 400 will not change: not retried"
    finally:
        flaky.stop()
        refusing.stop()


def test_emitting_never_waits_for_a_dead_or_hanging_sink(metrics: RequesterMetrics, caplog: pytest.LogCaptureFixture):
    hanging = Sink(hang=True)
    try:
        for url, reason in ((f"http://127.0.0.1:{closed_port()}", "unreachable"), (hanging.url, "timeout")):
            emit = emitter(url, metrics, max_pending=4)
            with caplog.at_level(logging.WARNING, logger="fma.requester.events"):
                caplog.clear()
                started = time.monotonic()
                for _ in range(50):
                    emit("ai.llm-d.fma.worker.ready", {"model": "m"})
                took = time.monotonic() - started
                assert took < 0.25, f"50 emits took {took:.3f} s: the caller waited for the sink"
                wait_for(lambda r=reason: dropped(metrics, r) >= 1)
            assert dropped(metrics, "queue_full") >= 40, "the queue is bounded; the rest are dropped and counted"
            drops = [r for r in caplog.records if "dropped" in r.getMessage()]
            assert len(drops) == 1, "one line per burst, not one per event"
    finally:
        hanging.stop()


def test_close_delivers_what_is_queued(sink: Sink, metrics: RequesterMetrics):
    emit = emitter(sink.url, metrics)
    for _ in range(5):
        emit("ai.llm-d.fma.worker.released", {"model": "m"})
    emit.close(5.0)
    assert len(sink.events) == 5
    emit("ai.llm-d.fma.worker.ready", {"model": "m"})  # after close: ignored, not an error
    time.sleep(0.1)
    assert len(sink.events) == 5


def test_no_sink_means_no_thread_and_no_work(metrics: RequesterMetrics):
    emit = SinkEmitter(EmitterConfig(None))
    emit("ai.llm-d.fma.worker.ready", {"model": "m"})
    assert emit._thread is None
    emit.close(0.1)


def test_the_sinkbindings_oidc_token_goes_with_each_event_and_is_reread_when_rotated(
        sink: Sink, metrics: RequesterMetrics, tmp_path, caplog: pytest.LogCaptureFixture):
    token_file = tmp_path / "token"  # where the SinkBinding mounts it: /oidc/token
    token_file.write_text("eyJ.first.sig\n")
    emit = emitter(sink.url, metrics, token_file=token_file)
    with caplog.at_level(logging.DEBUG):
        emit("ai.llm-d.fma.worker.started", {"model": "m"})
        wait_for(lambda: len(sink.events) == 1)
        token_file.write_text("eyJ.second.sig")  # the SinkBinding's reconciler refreshed the Secret
        emit("ai.llm-d.fma.worker.ready", {"model": "m"})
        wait_for(lambda: len(sink.events) == 2)
        token_file.unlink()  # authentication-oidc off: no token, no header
        emit("ai.llm-d.fma.worker.released", {"model": "m"})
        wait_for(lambda: len(sink.events) == 3)
    auth = [{k.lower(): v for k, v in h.items()}.get("authorization") for h, _ in sink.events]
    assert auth == ["Bearer eyJ.first.sig", "Bearer eyJ.second.sig", None]
    assert "eyJ." not in caplog.text, "the token is never logged"
    emit.close(1.0)
