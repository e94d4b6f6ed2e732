"""A scale-to-zero Knative Service in front of a real server, for tests: requests wait for a cold start.

What a client of a Service at zero sees, from knative/serving ``knative-v1.22.x``:

* The activator takes the request and holds it while the revision scales from zero
  (``pkg/activator/handler/handler.go`` ``ServeHTTP`` -> ``pkg/activator/net/throttler.go``
  ``Try``); the first held request is what starts the pod (the activator reports
  its concurrency to the autoscaler), and the pod then comes up whatever happens
  to that request. Held requests go through once a pod is ready, all at once and
  in no particular order (``containerConcurrency: 0``, the event log's: no
  breaker limits them) - here each held request's thread races for it.
* A request whose client went away while it was held never reaches the pod: the
  throttler's wait returns with the request context's error
  (``pkg/queue/breaker.go`` ``Maybe``) - here: the client's socket is watched.

Not simulated: the activator's 504 at the Revision's ``timeoutSeconds``, and a
client that hangs up after its request went through.
* Once up, the pod stays until ``idle_s`` with no request (the stable window and
  drain of ``knative_sim.py``, shortened); then the next request is cold again.

The server behind it is any URL (a real event log, a real requester).
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from broker_sim import client_hung_up


class ColdService:
    def __init__(self, target: str, start_delay_s: float, idle_s: float = 3600.0) -> None:
        self.target = urlsplit(target)
        self.start_delay_s = start_delay_s
        self.idle_s = idle_s
        self.cold_starts = 0
        self.dropped = 0  # held requests whose client went away
        self.forwarded = 0
        self._lock = threading.Condition()
        self._ready_at: float | None = None  # when the current pod is (or was) ready; None: scaled to zero
        self._last_request = 0.0
        svc = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer = svc._through(self.connection, self.command, self.path, dict(self.headers), body)
                if answer is None:
                    self.close_connection = True
                    return
                status, headers, content = answer
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _through(self, client: socket.socket, method: str, path: str, headers: dict[str, str], body: bytes
                 ) -> tuple[int, list[tuple[str, str]], bytes] | None:
        with self._lock:
            now = time.monotonic()
            if self._ready_at is not None and self._ready_at <= now and now - self._last_request >= self.idle_s:
                self._ready_at = None  # scaled to zero while idle
            if self._ready_at is None:
                self.cold_starts += 1
                self._ready_at = now + self.start_delay_s
            self._last_request = now
            while True:
                if client_hung_up(client):
                    self.dropped += 1
                    return None
                if time.monotonic() >= self._ready_at:
                    break
                self._lock.wait(0.02)
            self.forwarded += 1
        conn = http.client.HTTPConnection(self.target.hostname, self.target.port, timeout=600)
        try:
            conn.request(method, path, body=body if method == "POST" else None,
                         headers={k: v for k, v in headers.items() if k.lower() not in ("host", "connection")})
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()
            with self._lock:
                self._last_request = time.monotonic()
