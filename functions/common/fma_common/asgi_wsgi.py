"""A WSGI app (our Flask apps) served to an ASGI server (func-python's hypercorn), keeping what gunicorn gives us.

Knative Functions' Python runtime (func-python) calls an ASGI ``handle(scope, receive, send)``; our services are
Flask apps built for gunicorn. The adapters on PyPI were tried first (issue 23; README "As Knative Functions"):
``a2wsgi`` runs the app on a thread pool but, when a client disconnects, does not close the app's response
iterable, so a stream runs to its end (the requester keeps its upstream stream open, the worker keeps
generating into the void); ``asgiref``'s ``WsgiToAsgi`` reads the whole body first and by default runs every
request on one shared thread. What this bridge keeps:

* **Disconnects end the response**: a task waits for ``http.disconnect`` while the app streams; the thread that
  iterates the response stops at the next chunk and calls the iterable's ``close()`` (WSGI's, PEP 3333), as
  gunicorn does when a write fails - the requester then closes its upstream stream and the worker frees its rows.
* **A bounded thread pool** (``threads``): each request runs on one of its threads, the rest wait for one.
* **Streaming without buffering**: each chunk the app yields is sent as it comes, with a small bounded queue
  between the thread and the event loop (a slow reader slows the app, it does not grow memory).
* **The body limit before the body**: a ``Content-Length`` above ``max_body`` is answered 413 without reading;
  a body without one is read up to the limit and refused past it.
* **A graceful stop**: :meth:`drain` answers new requests 503 and waits for those in flight up to its timeout.
"""

from __future__ import annotations

import asyncio
import io
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_QUEUE = 8  # chunks between the app's thread and the event loop
_DONE = object()


def _status(text: str) -> int:
    return int(text.split(" ", 1)[0])


def _environ(scope: Scope, body: bytes) -> dict[str, Any]:
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client") or ("", 0)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode("utf-8").decode("latin-1"),
        "PATH_INFO": scope["path"].encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]), "SERVER_PORT": str(server[1] or 80),
        "REMOTE_ADDR": str(client[0]), "REMOTE_PORT": str(client[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "wsgi.version": (1, 0), "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
        "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        "CONTENT_LENGTH": str(len(body)),
    }
    for raw_name, raw_value in scope.get("headers") or []:
        name, value = raw_name.decode("latin-1").upper().replace("-", "_"), raw_value.decode("latin-1")
        if name == "CONTENT_TYPE":
            environ["CONTENT_TYPE"] = value
        elif name != "CONTENT_LENGTH":
            key = f"HTTP_{name}"
            environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


class WsgiBridge:
    def __init__(self, app: Callable[..., Iterable[bytes]], *, threads: int = 64, max_body: int = 1 << 20) -> None:
        self.app = app
        self.max_body = max_body
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsgi")
        self._in_flight = 0
        self._idle = threading.Condition()
        self._draining = False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if self._draining:
            return await self._plain(send, 503, b"shutting down\n", [(b"retry-after", b"1")])
        length = next((v for k, v in scope.get("headers") or [] if k.lower() == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._plain(send, 413, b"request body too large\n")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return await self._plain(send, 413, b"request body too large\n")
            if not message.get("more_body"):
                break
        with self._idle:
            self._in_flight += 1
        try:
            await self._serve(scope, bytes(body), receive, send)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    async def _plain(self, send: Send, status: int, text: bytes, headers: list[tuple[bytes, bytes]] | None = None
                     ) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(text)).encode()),
                                *(headers or [])]})
        await send({"type": "http.response.body", "body": text})

    async def _serve(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Any] = asyncio.Queue(_QUEUE)
        gone = threading.Event()

        def put(item: Any) -> bool:
            """From the app's thread: hand one item to the loop, waiting while the queue is full; False once the
            client is gone."""
            future = asyncio.run_coroutine_threadsafe(chunks.put(item), loop)
            while True:
                try:
                    future.result(timeout=0.25)
                    return True
                except TimeoutError:
                    if gone.is_set():
                        future.cancel()
                        return False

        def run() -> None:
            started: list[Any] = []

            def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable:
                started[:] = [status, headers]
                return lambda data: None  # the legacy write() callable: our apps never use it

            result: Iterable[bytes] | None = None
            try:
                result = self.app(_environ(scope, body), start_response)
                for chunk in result:
                    if gone.is_set():
                        break
                    if not chunk:
                        continue
                    if started and not put(("start", *started)):
                        break
                    started.clear()
                    if not put(("body", chunk)):
                        break
                if started:
                    put(("start", *started))
            except BaseException as exc:  # the app raised: a 500 if nothing was sent yet, else the stream ends
                put(("error", exc))
            finally:
                if result is not None and hasattr(result, "close"):
                    result.close()  # PEP 3333: always; this is what frees a disconnected stream's resources
                put(_DONE)

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    return

        task = loop.run_in_executor(self._pool, run)
        watcher = asyncio.ensure_future(watch())
        sent_start = False
        try:
            while True:
                item = await chunks.get()
                if item is _DONE:
                    break
                kind = item[0]
                if kind == "start":
                    status, headers = item[1], item[2]
                    await send({"type": "http.response.start", "status": _status(status),
                                "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]})
                    sent_start = True
                elif kind == "body":
                    await send({"type": "http.response.body", "body": bytes(item[1]), "more_body": True})
                elif kind == "error" and not sent_start:
                    await self._plain(send, 500, b"internal error\n")
                    sent_start = True
            if sent_start:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            gone.set()  # the server could not write: the client is gone
        finally:
            gone.set()  # whatever ended this (done, a failed write, the server cancelling us): the thread stops
            watcher.cancel()
            await task

    def drain(self, timeout: float) -> bool:
        """Refuse new requests (503) and wait for those in flight, up to ``timeout``; True when none is left."""
        self._draining = True
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class BridgedFunction:
    """The part of a func-python instance both services share: ``handle`` serves ``self.bridge`` once ``start`` has
    built it; a request before that (func-python calls ``start`` first) is a 503 with Retry-After, not a crash."""

    bridge: WsgiBridge | None = None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.bridge is None:
            await send({"type": "http.response.start", "status": 503, "headers": [(b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": b"starting\n"})
            return
        await self.bridge(scope, receive, send)
