"""The WSGI-to-ASGI bridge for func-python (fma_common/asgi_wsgi.py): what gunicorn gives our apps, kept.

Driven the way an ASGI server drives it (scope, receive, send) with a Flask app whose stream records when it is
closed: a disconnect closes the response iterable mid-stream; streams are sent chunk by chunk as they come; 8
streams run at once on 8 threads; the body limit answers 413 before reading; a drain refuses new requests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from flask import Flask, Response, request

from fma_common.asgi_wsgi import WsgiBridge


def app_with_stream() -> tuple[Flask, dict[str, Any]]:
    app = Flask("t")
    seen: dict[str, Any] = {"closed": 0, "chunks": 0, "started": []}

    @app.post("/stream")
    def stream() -> Response:
        n = int(request.args.get("n", "50"))

        def gen():
            seen["started"].append(time.monotonic())
            try:
                for i in range(n):
                    seen["chunks"] += 1
                    yield f"data: {i}\n\n".encode()
                    time.sleep(0.02)
            finally:
                seen["closed"] += 1

        return Response(gen(), mimetype="text/event-stream")

    @app.post("/echo")
    def echo() -> Response:
        return Response(request.get_data(), mimetype="application/octet-stream")

    return app, seen


def scope(path: str, body_len: int | None = None, query: bytes = b"") -> dict[str, Any]:
    headers = [(b"content-type", b"application/json")]
    if body_len is not None:
        headers.append((b"content-length", str(body_len).encode()))
    return {"type": "http", "method": "POST", "path": path, "query_string": query, "headers": headers,
            "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 1)}


async def call(bridge: Any, sc: dict[str, Any], body: bytes = b"", *, disconnect_after: int | None = None
               ) -> tuple[int, list[tuple[float, bytes]]]:
    """Run one request; with ``disconnect_after`` the client goes away after that many body chunks."""
    sent: list[tuple[float, bytes]] = []
    status = 0
    gone = asyncio.Event()
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message.get("body"):
            sent.append((time.monotonic(), message["body"]))
            if disconnect_after is not None and len(sent) >= disconnect_after:
                gone.set()

    await bridge(sc, receive, send)
    return status, sent


def test_a_client_that_disconnects_mid_stream_closes_the_apps_iterable_at_once():
    app, seen = app_with_stream()
    bridge = WsgiBridge(app.wsgi_app, threads=4)
    status, _sent = asyncio.run(call(bridge, scope("/stream", 0, b"n=500"), disconnect_after=3))
    deadline = time.monotonic() + 2
    while not seen["closed"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert status == 200 and seen["closed"] == 1, "closed, as gunicorn closes it when a write fails"
    assert seen["chunks"] < 20, f"stopped within a few chunks of the disconnect, not at 500 ({seen['chunks']})"


def test_a_stream_is_sent_chunk_by_chunk_as_it_is_made():
    app, _ = app_with_stream()
    status, sent = asyncio.run(call(WsgiBridge(app.wsgi_app), scope("/stream", 0, b"n=10")))
    assert status == 200 and len(sent) == 10
    assert sent[-1][0] - sent[0][0] >= 0.15, "not buffered to the end: the chunks came over the stream's time"


def test_eight_streams_run_at_once_on_eight_threads():
    app, _seen = app_with_stream()
    bridge = WsgiBridge(app.wsgi_app, threads=8)

    async def all_of_them() -> list[tuple[int, list]]:
        return await asyncio.gather(*(call(bridge, scope("/stream", 0, b"n=25")) for _ in range(8)))

    t0 = time.monotonic()
    results = asyncio.run(all_of_them())
    assert all(status == 200 and len(sent) == 25 for status, sent in results)
    firsts = sorted(sent[0][0] - t0 for _, sent in results)
    # Each stream lasts 0.5 s: one that waited for another's thread would get its first chunk after that.
    assert firsts[-1] < 0.4, f"every stream's first chunk came at once, none waited for another: {firsts}"


def test_a_body_over_the_limit_is_413_before_it_is_read():
    app, _ = app_with_stream()
    bridge = WsgiBridge(app.wsgi_app, max_body=100)
    read = threading.Event()

    async def run() -> int:
        status = 0

        async def receive() -> dict[str, Any]:
            read.set()
            return {"type": "http.request", "body": b"x" * 1000, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await bridge(scope("/echo", 1000), receive, send)
        return status

    assert asyncio.run(run()) == 413 and not read.is_set()
    status, sent = asyncio.run(call(bridge, scope("/echo", None), b"y" * 101))
    assert status == 413, "without a Content-Length, refused once past the limit"
    status, sent = asyncio.run(call(bridge, scope("/echo", 5), b"hello"))
    assert status == 200 and b"".join(b for _, b in sent) == b"hello"


def test_a_drain_refuses_new_requests_and_waits_for_those_in_flight():
    app, _ = app_with_stream()
    bridge = WsgiBridge(app.wsgi_app)

    async def run() -> tuple[Any, Any, bool]:
        long = asyncio.ensure_future(call(bridge, scope("/stream", 0, b"n=15")))
        await asyncio.sleep(0.05)
        drained = asyncio.get_running_loop().run_in_executor(None, bridge.drain, 5.0)
        await asyncio.sleep(0.05)
        refused = await call(bridge, scope("/stream", 0, b"n=1"))
        return await long, refused, await drained

    (status, sent), (refused_status, _), drained = asyncio.run(run())
    assert status == 200 and len(sent) == 15, "the stream in flight finished"
    assert refused_status == 503 and drained and bridge.in_flight == 0
