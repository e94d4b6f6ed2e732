"""A faithful HTTP-level fake of the Kubernetes API server, for Knative Services.

It serves the real REST paths of ``serving.knative.dev/v1`` ``services`` so
the real ``kubernetes`` client talks to it unchanged:

* ``POST   /apis/serving.knative.dev/v1/namespaces/{ns}/services``         201, 409 AlreadyExists
* ``GET    .../services[?labelSelector=&fieldSelector=]``                    a ``ServiceList``
* ``GET    .../services?watch=true&resourceVersion=N``                       a watch stream (JSON lines);
  a resourceVersion older than the compaction point gets an ``ERROR`` event with a 410 ``Status``
* ``GET    .../services/{name}``                                              200, 404 NotFound
* ``PATCH  .../services/{name}`` (``application/merge-patch+json``, RFC 7386) 200, 404, 415
* ``DELETE .../services/{name}``                                              200, 404

Errors are Kubernetes ``Status`` bodies. ``metadata.generation`` moves only
when ``spec`` changes; every write gets a new ``resourceVersion``. Tests can
refuse verbs (403), inject server errors (500), and compact history (410).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

PATH = re.compile(r"^/apis/serving\.knative\.dev/v1/namespaces/(?P<ns>[^/]+)/services(?:/(?P<name>[^/]+))?$")


def status_body(code: int, reason: str, message: str, name: str | None = None) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": {"name": name, "group": "serving.knative.dev", "kind": "services"},
            "code": code}


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def matches_labels(obj: dict[str, Any], selector: str | None) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (selector or "").split(",")):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k.strip().rstrip("=")) != v.strip():
                return False
        elif term.strip() not in labels:
            return False
    return True


def matches_fields(obj: dict[str, Any], selector: str | None) -> bool:
    for term in filter(None, (selector or "").split(",")):
        k, _, v = term.partition("=")
        if k == "metadata.name" and obj["metadata"]["name"] != v:
            return False
        if k == "metadata.namespace" and obj["metadata"]["namespace"] != v:
            return False
    return True


class FakeKube:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.rv = 100
        self.compacted_before = 0
        self.forbidden: set[str] = set()  # verbs answered with 403
        self.fail_next: list[int] = []  # statuses for the next requests (e.g. 500, 503)
        self.requests: list[tuple[str, str]] = []
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self.after_create: Callable[[], None] | None = None  # e.g. compact history right after a create
        self._stopping = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_PATCH(self) -> None:
                fake._handle(self, "PATCH")

            def do_DELETE(self) -> None:
                fake._handle(self, "DELETE")

            def do_PUT(self) -> None:
                fake._handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeKube:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self._stopping = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # ---- store ------------------------------------------------------------------

    def _record(self, kind: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        snapshot = copy.deepcopy(obj)
        self.history.append((self.rv, kind, snapshot))
        self.cond.notify_all()
        for listener in list(self.listeners):
            listener(kind, copy.deepcopy(snapshot))

    def put_object(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create an object directly (a Service someone else made)."""
        with self.cond:
            obj = copy.deepcopy(obj)
            meta = obj["metadata"]
            meta.setdefault("namespace", "default")
            meta.update(uid=str(uuid.uuid4()), generation=1,
                        creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self.objects[(meta["namespace"], meta["name"])] = obj
            self._record("ADDED", obj)
            return copy.deepcopy(obj)

    def get_object(self, ns: str, name: str) -> dict[str, Any] | None:
        with self.cond:
            obj = self.objects.get((ns, name))
            return copy.deepcopy(obj) if obj else None

    def set_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        """What a controller does: write status (generation unchanged)."""
        with self.cond:
            obj = self.objects.get((ns, name))
            if obj is None:
                return
            obj["status"] = status
            self._record("MODIFIED", obj)

    def compact(self) -> None:
        """Forget history: watches from an older resourceVersion get 410 Gone."""
        with self.cond:
            self.compacted_before = self.rv + 1
            self.history.clear()

    # ---- HTTP -------------------------------------------------------------------

    def _send(self, h: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.requests.append((method, h.path))
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        match = PATH.match(url.path)
        if not match:
            return self._send(h, 404, status_body(404, "NotFound", f"the server could not find {url.path}"))
        ns, name = match.group("ns"), match.group("name")
        watching = query.get("watch") in ("true", "1", "True")
        verb = {"GET": "watch" if watching else ("get" if name else "list"), "POST": "create", "PATCH": "patch",
                "DELETE": "delete", "PUT": "update"}[method]
        if verb in self.forbidden:
            return self._send(h, 403, status_body(
                403, "Forbidden", f'services.serving.knative.dev{" " + repr(name) if name else ""} is forbidden: '
                f'User "system:serviceaccount:{ns}:fma-requester" cannot {verb} resource "services" in API group '
                f'"serving.knative.dev" in the namespace "{ns}"', name))
        if self.fail_next:
            code = self.fail_next.pop(0)
            return self._send(h, code, status_body(code, "InternalError", "etcdserver: request timed out"))
        if method == "GET" and watching:
            return self._watch(h, ns, query)
        if method == "GET" and not name:
            with self.cond:
                items = [copy.deepcopy(o) for (n, _), o in sorted(self.objects.items())
                         if n == ns and matches_labels(o, query.get("labelSelector"))
                         and matches_fields(o, query.get("fieldSelector"))]
                rv = str(self.rv)
            return self._send(h, 200, {"apiVersion": "serving.knative.dev/v1", "kind": "ServiceList",
                                       "metadata": {"resourceVersion": rv}, "items": items})
        if method == "POST":
            body = json.loads(raw or b"{}")
            meta = body.setdefault("metadata", {})
            meta["namespace"] = ns
            with self.cond:
                if (ns, meta.get("name")) in self.objects:
                    return self._send(h, 409, status_body(
                        409, "AlreadyExists", f'services.serving.knative.dev "{meta.get("name")}" already exists',
                        meta.get("name")))
                meta.update(uid=str(uuid.uuid4()), generation=1,
                            creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                body.pop("status", None)
                self.objects[(ns, meta["name"])] = body
                self._record("ADDED", body)
                if self.after_create:
                    self.after_create()
                return self._send(h, 201, copy.deepcopy(body))
        with self.cond:
            obj = self.objects.get((ns, name))
            if obj is None:
                return self._send(h, 404, status_body(
                    404, "NotFound", f'services.serving.knative.dev "{name}" not found', name))
            if method == "GET":
                return self._send(h, 200, copy.deepcopy(obj))
            if method == "DELETE":
                del self.objects[(ns, name)]
                self._record("DELETED", obj)
                return self._send(h, 200, copy.deepcopy(obj))
            if method == "PATCH":
                ctype = h.headers.get("Content-Type", "")
                if not ctype.startswith("application/merge-patch+json"):
                    return self._send(h, 415, status_body(415, "UnsupportedMediaType",
                                                          f"the body of the request was in an unknown format: {ctype}"))
                patch = json.loads(raw or b"{}")
                patch.get("metadata", {}).pop("generation", None)
                patch.pop("status", None)
                updated = merge_patch(obj, patch)
            else:
                updated = json.loads(raw or b"{}")
                updated["status"] = obj.get("status", {})
            if updated.get("spec") != obj.get("spec"):
                updated["metadata"]["generation"] = obj["metadata"]["generation"] + 1
            else:
                updated["metadata"]["generation"] = obj["metadata"]["generation"]
            for key in ("uid", "creationTimestamp", "name", "namespace"):
                updated["metadata"][key] = obj["metadata"][key]
            self.objects[(ns, name)] = updated
            self._record("MODIFIED", updated)
            return self._send(h, 200, copy.deepcopy(updated))

    def _watch(self, h: BaseHTTPRequestHandler, ns: str, query: dict[str, str]) -> None:
        since = int(query.get("resourceVersion") or 0)
        timeout = float(query.get("timeoutSeconds") or 300)
        deadline = time.monotonic() + timeout
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def emit(event: dict[str, Any]) -> None:
            data = (json.dumps(event) + "\n").encode()
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

        def wanted(obj: dict[str, Any]) -> bool:
            return obj["metadata"]["namespace"] == ns and matches_labels(obj, query.get("labelSelector")) \
                and matches_fields(obj, query.get("fieldSelector"))

        try:
            with self.cond:
                expired = bool(since and since < self.compacted_before)
                pending: list[dict[str, Any]] = []
                if not expired and not since:  # no resourceVersion: the current state first, as ADDED
                    pending = [{"type": "ADDED", "object": copy.deepcopy(o)}
                               for _, o in sorted(self.objects.items()) if wanted(o)]
                    since = self.rv
            if expired:
                emit({"type": "ERROR", "object": status_body(
                    410, "Expired", f"too old resource version: {since} ({self.compacted_before})")})
                h.wfile.write(b"0\r\n\r\n")
                return
            while True:
                for event in pending:  # written outside the lock: a slow reader blocks no one
                    emit(event)
                with self.cond:
                    while True:
                        pending = [{"type": kind, "object": obj} for rv, kind, obj in self.history
                                   if rv > since and wanted(obj)]
                        since = self.rv
                        remaining = deadline - time.monotonic()
                        if pending or self._stopping or remaining <= 0:
                            break
                        self.cond.wait(min(remaining, 0.5))
                if not pending:
                    break
            h.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
