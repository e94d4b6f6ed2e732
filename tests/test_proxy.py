"""The stream relay against a real HTTP server standing in for a worker."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fma_requester.actuator import Actuation, WorkerLease
from fma_requester.metrics import RequesterMetrics
from fma_requester.proxy import SSETail, WorkerProxy


class SSEWorker:
    """Streams the scripted events, then holds the connection open until told to finish."""

    def __init__(self, events: list[bytes], hold: bool = False) -> None:
        self.events = events
        self.hold = hold
        self.finish = threading.Event()
        self.client_gone = threading.Event()
        worker = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a: object) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for event in worker.events:
                        self._chunk(event)
                    while worker.hold and not worker.finish.wait(0.05):
                        self._chunk(b": keep-alive\n\n")  # a comment line: fails once the client is gone
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    worker.client_gone.set()

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.finish.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def proxy() -> Iterator[WorkerProxy]:
    p = WorkerProxy(RequesterMetrics(), connect_timeout=2, read_timeout=10)
    yield p
    p.close()


def lease_for(url: str, done: list[str]) -> WorkerLease:
    return WorkerLease("m", url, Actuation(path="warm", seconds=0.0), lambda lease: done.append(lease.model))


def test_a_stream_closed_before_its_first_chunk_releases_its_lease_and_connection(proxy: WorkerProxy):
    worker = SSEWorker([b'data: {"x": 1}\n\n'], hold=True)
    try:
        done: list[str] = []
        upstream = proxy.forward(lease_for(worker.url, done), "/v1/completions", b"{}", stream=True)
        assert upstream.stream is not None and done == []
        upstream.stream.close()  # what the WSGI server does when the client is gone before any byte
        assert done == ["m"], "the lease is given back"
        assert worker.client_gone.wait(5), "the upstream connection is closed, so the worker stops generating"
        upstream.stream.close()
        assert done == ["m"], "exactly once"
    finally:
        worker.close()


def test_a_finished_stream_passes_bytes_through_and_releases_once(proxy: WorkerProxy):
    events = [b'data: {"a": 1}\n\n', b'data: {"b": 2}\n\n', b"data: [DONE]\n\n"]
    worker = SSEWorker(events)
    try:
        done: list[str] = []
        upstream = proxy.forward(lease_for(worker.url, done), "/v1/completions", b"{}", stream=True)
        assert b"".join(upstream.stream) == b"".join(events)
        upstream.stream.close()
        assert done == ["m"]
    finally:
        worker.close()


def test_a_stream_that_stops_without_done_ends_with_one_error_event(proxy: WorkerProxy):
    worker = SSEWorker([b'data: {"a": 1}\n\n', b'data: {"text": "data: [DONE] is not the end"}\n\n'])
    try:
        done: list[str] = []
        upstream = proxy.forward(lease_for(worker.url, done), "/v1/completions", b"{}", stream=True)
        body = b"".join(upstream.stream)
        assert body.endswith(b"\n\n") and b'"error"' in body.rsplit(b"data: ", 1)[1]
        assert done == ["m"]
    finally:
        worker.close()


@pytest.mark.parametrize("chunks, ended_well", [
    ([b"data: [DONE]\n\n"], True),
    ([b"data: [DO", b"NE]\n\n"], True),
    ([b'data: {"error": {"message": "x"}}\n\n'], True),
    ([b"data: [DONE]\r\n\r\n"], True),
    ([b'data: {"text": "data: [DONE]"}\n\n'], False),
    ([b"data: [DONE]\n\n", b'data: {"a": 1}\n\n'], False),
    ([b"data: [DONE]"], False),  # the event never completed
    ([], False),
])
def test_the_end_of_a_stream_is_read_from_its_events_not_searched_for(chunks, ended_well):
    tail = SSETail()
    for chunk in chunks:
        tail.feed(chunk)
    assert tail.ended_well is ended_well


def test_the_pool_is_as_large_as_the_connection_limit():
    p = WorkerProxy(RequesterMetrics(), 1, 1, max_connections=1000)
    try:
        assert p._client._transport._pool._max_connections == 1000
    finally:
        p.close()
