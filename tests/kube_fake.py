"""A faithful HTTP-level fake of the Kubernetes API server, for Knative Serving's resources.

It serves the real REST paths of ``serving.knative.dev/v1`` (``services``,
``revisions``) and of core ``v1`` ``pods`` (``/api/v1/namespaces/{ns}/pods``,
written by the simulator as the kubelet would) so the real ``kubernetes``
client talks to it unchanged:

* ``POST   /apis/serving.knative.dev/v1/namespaces/{ns}/{plural}``          201, 409 AlreadyExists
* ``GET    .../{plural}[?labelSelector=&fieldSelector=]``                     a ``...List``
* ``GET    .../{plural}?watch=true&resourceVersion=N``                        a watch stream (JSON lines);
  a resourceVersion older than the compaction point gets an ``ERROR`` event with a 410 ``Status``
* ``GET    .../{plural}/{name}``                                               200, 404 NotFound
* ``PATCH  .../{plural}/{name}`` (``application/merge-patch+json``, RFC 7386)  200, 404, 415
* ``DELETE .../{plural}/{name}``                                               200, 404
* ``POST   /apis/authentication.k8s.io/v1/tokenreviews``                       201, with the review in
  ``status``, for tokens the test issued (``issue_token``), as the API server's TokenReview REST storage
  answers (``pkg/registry/authentication/tokenreview/storage.go``: audiences default to none asked, the
  authenticator's error text in ``status.error``, ``status.audiences`` the ones that matched)

Errors are Kubernetes ``Status`` bodies. ``metadata.generation`` moves only
when ``spec`` changes; every write gets a new ``resourceVersion``.

What a real API server adds, and this one too:

* **RBAC**: given a Role (``knative/base/role.yaml``), every request whose
  (resource, verb) the Role does not grant is a 403 with the API server's
  message, so the tests run with exactly the permissions the requester is
  deployed with.
* **Admission**: validating webhooks (the simulator's Knative webhook) are
  called on create and patch with the old and new object; a rejection is
  answered like the API server answers a denying webhook (``k8s.io/apiserver
  .../webhook/errors/statuserror.go``: status 400 unless the webhook gave one,
  message ``admission webhook "NAME" denied the request: ...``).

Tests can also refuse verbs, inject server errors (the next few requests or
every one), compact history (410), leave watches half-open (headers sent, then
silence, never closed), hold plain requests unanswered (an API server that
accepted the connection and hangs), and let another writer create an object
just before a create is handled (the create then gets the real 409).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

GROUP, VERSION = "serving.knative.dev", "v1"
PATH = re.compile(r"^/(?:apis/serving\.knative\.dev/v1|api/v1)/namespaces/(?P<ns>[^/]+)/(?P<plural>[a-z]+)"
                  r"(?:/(?P<name>[^/]+))?$")
# Cluster-scoped: the CustomResourceDefinitions (the requester reads Knative Serving's version off one).
CRD_PATH = re.compile(r"^/apis/apiextensions\.k8s\.io/v1/customresourcedefinitions(?:/(?P<name>[^/]+))?$")
CRDS = "customresourcedefinitions"
CLUSTER = ""  # the namespace key of cluster-scoped objects in the store
KINDS = {"services": "Service", "revisions": "Revision", "configurations": "Configuration", "routes": "Route",
         "pods": "Pod", "secrets": "Secret", "configmaps": "ConfigMap", CRDS: "CustomResourceDefinition",
         "persistentvolumeclaims": "PersistentVolumeClaim"}
CORE = {"pods", "secrets", "configmaps", "persistentvolumeclaims"}  # served under /api/v1, API group ""
# Read-only, any API group (what `fma doctor` reads): /apis/G/V[/namespaces/NS]/PLURAL[/NAME] for plurals not
# above, and the cluster-scoped core ones. Stored under "G/PLURAL" (put_generic).
GENERIC = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[a-z]+)"
                     r"(?:/(?P<name>[^/]+))?$")
CORE_CLUSTER = re.compile(r"^/api/v1/(?P<plural>nodes|namespaces)(?:/(?P<name>[^/]+))?$")
SSAR = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"


def api_group(plural: str) -> str:
    if plural in CORE:
        return ""
    return {"tokenreviews": "authentication.k8s.io", CRDS: "apiextensions.k8s.io"}.get(plural, GROUP)


def status_body(code: int, reason: str, message: str, name: str | None = None,
                plural: str = "services") -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": {"name": name, "group": GROUP, "kind": plural}, "code": code}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, ``null`` removes a key, anything else replaces."""
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


class Rejected(Exception):
    """An admission webhook's denial."""

    def __init__(self, webhook: str, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.webhook, self.message, self.code = webhook, message, code


# (verb, plural, old object or None, new object) -> None (admitted as it is), a replacement object (a mutating
# webhook's defaults, stored instead), or raise Rejected
AdmissionHook = Callable[[str, str, dict[str, Any] | None, dict[str, Any]], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Rule:
    groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]
    # RBAC's resourceNames: when set, the rule allows only requests that name one of these objects
    # (k8s.io/kubernetes plugin/pkg/auth/authorizer/rbac/rbac.go, RuleAllows -> ResourceNameMatches).
    names: frozenset[str] = frozenset()


def load_role(*paths: Path) -> list[Rule]:
    """The rules of every Role and ClusterRole in these files (bound to the requester by the same files)."""
    rules = []
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in ("Role", "ClusterRole"):
                rules += [Rule(frozenset(r.get("apiGroups", [])), frozenset(r["resources"]), frozenset(r["verbs"]),
                               frozenset(r.get("resourceNames") or ())) for r in doc["rules"]]
    return rules


TOKENREVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"


class FakeKube:
    def __init__(self, role: list[Rule] | None = None) -> None:
        self.cond = threading.Condition()
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, ns, name)
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, event type, plural, object)
        self.rv = 100
        self.compacted_before = 0
        self.role = role  # None: everything allowed
        self.forbidden: set[str] = set()  # verbs on services answered with 403 (on top of the Role)
        self.fail_next: list[int] = []  # statuses for the next requests (e.g. 500, 503)
        self.fail_all: int | None = None  # every request (past RBAC) answered with this status while set
        self.hang_watches = False  # accept watches, then never send anything and never close
        self.hang_requests = 0  # the next N non-watch requests are read, then never answered
        self.hang_all = False  # every non-watch request is read, then never answered
        self.held: list[tuple[str, str]] = []  # the requests left unanswered
        self.before_create: Callable[[dict[str, Any]], None] | None = None  # runs before a create is handled
        self.tokens: dict[str, tuple[str, tuple[str, ...], float]] = {}  # token -> (user, audiences, exp)
        self.requests: list[tuple[str, str]] = []
        self.listeners: list[Callable[[str, str, dict[str, Any]], None]] = []  # (event type, plural, object)
        self.admission: list[AdmissionHook] = []
        # SelfSubjectAccessReviews asked by impersonation (Impersonate-User): the rules each user has (from
        # load_role on the manifests that bind them). Without impersonation the asker is an admin: allowed.
        self.subject_rules: dict[str, list[Rule]] = {}
        # Bearer tokens of cluster admins: their requests skip the Role (an end-to-end test reads and edits what
        # it deployed, while the requester's own requests stay under its Role).
        self.admin_tokens: set[str] = set()
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

    def _record(self, kind: str, plural: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        snapshot = copy.deepcopy(obj)
        self.history.append((self.rv, kind, plural, snapshot))
        self.cond.notify_all()
        for listener in list(self.listeners):
            listener(kind, plural, copy.deepcopy(snapshot))

    def put_object(self, obj: dict[str, Any], plural: str = "services") -> dict[str, Any]:
        """Create an object directly, as a controller (or someone else) would."""
        with self.cond:
            obj = copy.deepcopy(obj)
            meta = obj["metadata"]
            meta.setdefault("namespace", "default")
            meta.update(uid=str(uuid.uuid4()), generation=1,
                        creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self.objects[(plural, meta["namespace"], meta["name"])] = obj
            self._record("ADDED", plural, obj)
            return copy.deepcopy(obj)

    def put_generic(self, obj: dict[str, Any], group: str, plural: str) -> None:
        """An object of any API group for the read-only paths (cluster-scoped when it has no namespace)."""
        with self.cond:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            self.objects[(f"{group}/{plural}", meta.get("namespace") or CLUSTER, meta["name"])] = obj

    def get_object(self, ns: str, name: str, plural: str = "services") -> dict[str, Any] | None:
        with self.cond:
            obj = self.objects.get((plural, ns, name))
            return copy.deepcopy(obj) if obj else None

    def list_objects(self, ns: str, plural: str) -> list[dict[str, Any]]:
        with self.cond:
            return [copy.deepcopy(o) for (p, n, _), o in sorted(self.objects.items()) if p == plural and n == ns]

    def set_status(self, ns: str, name: str, status: dict[str, Any], plural: str = "services") -> None:
        """What a controller does: write status (generation unchanged)."""
        with self.cond:
            obj = self.objects.get((plural, ns, name))
            if obj is None:
                return
            obj["status"] = status
            self._record("MODIFIED", plural, obj)

    def update_object(self, ns: str, name: str, change: Callable[[dict[str, Any]], None],
                      plural: str = "services") -> None:
        """A controller's own write (labels, annotations) through the store, like an update."""
        with self.cond:
            obj = self.objects.get((plural, ns, name))
            if obj is None:
                return
            change(obj)
            self._record("MODIFIED", plural, obj)

    def delete_object(self, ns: str, name: str, plural: str = "services") -> None:
        with self.cond:
            obj = self.objects.pop((plural, ns, name), None)
            if obj is not None:
                self._record("DELETED", plural, obj)

    def compact(self) -> None:
        """Forget history: watches from an older resourceVersion get 410 Gone."""
        with self.cond:
            self.compacted_before = self.rv + 1
            self.history.clear()

    def count(self, method: str, plural: str = "services") -> int:
        """How many requests of ``method`` reached ``plural`` (for tests)."""
        return sum(1 for m, path in self.requests if m == method and f"/{plural}" in path.split("?")[0])

    # ---- HTTP -------------------------------------------------------------------

    def _send(self, h: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _allowed(self, plural: str, verb: str, name: str | None = None) -> bool:
        if plural == "services" and verb in self.forbidden:
            return False
        if self.role is None:
            return True
        group = api_group(plural)
        return any(group in r.groups and (plural in r.resources or "*" in r.resources)
                   and (verb in r.verbs or "*" in r.verbs) and (not r.names or name in r.names)
                   for r in self.role)

    def _admit(self, verb: str, plural: str, old: dict[str, Any] | None,
               new: dict[str, Any]) -> Rejected | dict[str, Any]:
        """The object to store (mutating hooks' defaults applied, in order), or the first rejection."""
        for hook in self.admission:
            try:
                changed = hook(verb, plural, copy.deepcopy(old) if old else None, copy.deepcopy(new))
            except Rejected as exc:
                return exc
            if changed is not None:
                new = changed
        return new

    def issue_token(self, username: str, audiences: tuple[str, ...], ttl_s: float = 3600) -> str:
        """A ServiceAccount token as TokenRequest gives one: a JWT (unsigned here) for these audiences."""
        import base64

        def part(obj: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

        exp = time.time() + ttl_s
        token = ".".join([part({"alg": "RS256", "kid": "fake"}),
                          part({"sub": username, "aud": list(audiences), "exp": int(exp), "jti": uuid.uuid4().hex}),
                          uuid.uuid4().hex])
        self.tokens[token] = (username, audiences, exp)
        return token

    def _token_review(self, h: BaseHTTPRequestHandler, raw: bytes) -> None:
        if not self._allowed("tokenreviews", "create"):
            return self._send(h, 403, status_body(
                403, "Forbidden", 'tokenreviews.authentication.k8s.io is forbidden: User '
                '"system:serviceaccount:llm:fma-requester" cannot create resource "tokenreviews" in API group '
                '"authentication.k8s.io" at the cluster scope', None, "tokenreviews"))
        review = json.loads(raw or b"{}")
        spec = review.get("spec") or {}
        token, wanted = spec.get("token") or "", tuple(spec.get("audiences") or ())
        if not token:
            return self._send(h, 400, status_body(400, "BadRequest",
                                                  "token is required for TokenReview in authentication.k8s.io"))
        status: dict[str, Any] = {"authenticated": False, "user": {}}
        known = self.tokens.get(token)
        if known is None:
            status["error"] = "[invalid bearer token, square/go-jose: error in cryptographic primitive]"
        elif known[2] < time.time():
            status["error"] = "[invalid bearer token, service account token has expired]"
        elif wanted and not set(wanted) & set(known[1]):
            status["error"] = (f"[invalid bearer token, token audiences {list(known[1])!r} is invalid for the "
                               f"target audiences {list(wanted)!r}]")
        else:
            status = {"authenticated": True, "user": {"username": known[0], "groups": ["system:serviceaccounts"]},
                      "audiences": [a for a in known[1] if not wanted or a in wanted]}
        return self._send(h, 201, {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                                   "metadata": {"creationTimestamp": None}, "spec": spec, "status": status})

    def _hold(self) -> None:
        """Answer nothing, ever (until the server stops): the client's own timeout must end it."""
        with self.cond:
            while not self._stopping:
                self.cond.wait(0.5)

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.requests.append((method, h.path))
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        if method == "POST" and url.path == TOKENREVIEWS:
            if self.fail_next or self.fail_all:
                code = self.fail_next.pop(0) if self.fail_next else self.fail_all
                return self._send(h, code, status_body(code, "InternalError", "etcdserver: request timed out"))
            return self._token_review(h, raw)
        if method == "POST" and url.path == SSAR:
            return self._access_review(h, raw)
        crd = CRD_PATH.match(url.path)
        if crd and method == "GET" and crd.group("name"):
            return self._get_crd(h, crd.group("name"))
        generic = GENERIC.match(url.path) or CORE_CLUSTER.match(url.path)
        plural_of = (generic.group("plural") if generic else None)
        if generic and method == "GET" and plural_of not in KINDS:
            group = generic.groupdict().get("group") or ""
            return self._get_generic(h, f"{group}/{plural_of}", generic.groupdict().get("ns") or CLUSTER,
                                     generic.group("name"), query.get("labelSelector"))
        match = PATH.match(url.path)
        if not match or match.group("plural") not in KINDS:
            return self._send(h, 404, status_body(404, "NotFound", f"the server could not find {url.path}"))
        ns, plural, name = match.group("ns"), match.group("plural"), match.group("name")
        kind = KINDS[plural]
        watching = query.get("watch") in ("true", "1", "True")
        verb = {"GET": "watch" if watching else ("get" if name else "list"), "POST": "create", "PATCH": "patch",
                "DELETE": "delete", "PUT": "update"}[method]
        # A list or watch narrowed by fieldSelector=metadata.name=X is authorized as a request for X (the API
        # server's RequestInfo takes the name from it), so a rule with resourceNames can allow it.
        named = name or next((t.partition("=")[2] for t in (query.get("fieldSelector") or "").split(",")
                              if t.startswith("metadata.name=")), None)
        admin = (h.headers.get("Authorization") or "").removeprefix("Bearer ") in self.admin_tokens
        if not admin and not self._allowed(plural, verb, named):
            qualified = f"{plural}.{api_group(plural)}" if api_group(plural) else plural
            return self._send(h, 403, status_body(
                403, "Forbidden", f'{qualified}{" " + repr(name) if name else ""} is forbidden: '
                f'User "system:serviceaccount:{ns}:fma-requester" cannot {verb} resource "{plural}" in API group '
                f'"{api_group(plural)}" in the namespace "{ns}"', name, plural))
        if self.fail_next or self.fail_all:
            code = self.fail_next.pop(0) if self.fail_next else self.fail_all
            return self._send(h, code, status_body(code, "InternalError", "etcdserver: request timed out"))
        if not watching and (self.hang_all or self.hang_requests > 0):
            if not self.hang_all:
                self.hang_requests -= 1
            self.held.append((method, h.path))
            return self._hold()
        if method == "GET" and watching:
            return self._watch(h, ns, plural, query)
        if method == "GET" and not name:
            with self.cond:
                items = [copy.deepcopy(o) for (p, n, _), o in sorted(self.objects.items())
                         if p == plural and n == ns and matches_labels(o, query.get("labelSelector"))
                         and matches_fields(o, query.get("fieldSelector"))]
                rv = str(self.rv)
            return self._send(h, 200, {"apiVersion": "v1" if plural in CORE else f"{GROUP}/{VERSION}",
                                       "kind": f"{kind}List",
                                       "metadata": {"resourceVersion": rv}, "items": items})
        if method == "POST":
            body = json.loads(raw or b"{}")
            meta = body.setdefault("metadata", {})
            meta["namespace"] = ns
            if self.before_create:
                hook, self.before_create = self.before_create, None
                hook(copy.deepcopy(body))
            with self.cond:
                if (plural, ns, meta.get("name")) in self.objects:
                    return self._send(h, 409, status_body(
                        409, "AlreadyExists", f'{plural}.{GROUP} "{meta.get("name")}" already exists',
                        meta.get("name"), plural))
                body.pop("status", None)
                admitted = self._admit("create", plural, None, body)
                if isinstance(admitted, Rejected):
                    return self._deny(h, admitted, meta.get("name"), plural)
                body = admitted
                meta = body["metadata"]
                meta.update(uid=str(uuid.uuid4()), generation=1,
                            creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                self.objects[(plural, ns, meta["name"])] = body
                self._record("ADDED", plural, body)
                if self.after_create:
                    self.after_create()
                return self._send(h, 201, copy.deepcopy(body))
        with self.cond:
            obj = self.objects.get((plural, ns, name))
            if obj is None:
                return self._send(h, 404, status_body(404, "NotFound", f'{plural}.{GROUP} "{name}" not found',
                                                      name, plural))
            if method == "GET":
                return self._send(h, 200, copy.deepcopy(obj))
            if method == "DELETE":
                del self.objects[(plural, ns, name)]
                self._record("DELETED", plural, obj)
                return self._send(h, 200, copy.deepcopy(obj))
            if method == "PATCH":
                ctype = h.headers.get("Content-Type", "")
                # A strategic merge patch is served for built-in types only (CRs answer 415, as here); on the
                # objects stored here (ConfigMaps' and Secrets' data maps) it merges as a JSON merge patch does.
                strategic = ctype.startswith("application/strategic-merge-patch+json") and plural in CORE
                if not (ctype.startswith("application/merge-patch+json") or strategic):
                    return self._send(h, 415, status_body(415, "UnsupportedMediaType",
                                                          f"the body of the request was in an unknown format: {ctype}"))
                patch = json.loads(raw or b"{}")
                patch.get("metadata", {}).pop("generation", None)
                patch.pop("status", None)
                updated = merge_patch(obj, patch)
            else:
                updated = json.loads(raw or b"{}")
                updated["status"] = obj.get("status", {})
            for key in ("uid", "creationTimestamp", "name", "namespace"):
                updated["metadata"][key] = obj["metadata"][key]
            admitted = self._admit("update", plural, obj, updated)
            if isinstance(admitted, Rejected):
                return self._deny(h, admitted, name, plural)
            updated = admitted
            if updated.get("spec") != obj.get("spec"):
                updated["metadata"]["generation"] = obj["metadata"]["generation"] + 1
            else:
                updated["metadata"]["generation"] = obj["metadata"]["generation"]
            if updated == obj:
                return self._send(h, 200, copy.deepcopy(obj))  # a no-op write changes nothing, not even the rv
            self.objects[(plural, ns, name)] = updated
            self._record("MODIFIED", plural, updated)
            return self._send(h, 200, copy.deepcopy(updated))

    def _get_generic(self, h: BaseHTTPRequestHandler, key: str, ns: str, name: str | None,
                     selector: str | None) -> None:
        with self.cond:
            if name:
                obj = self.objects.get((key, ns, name))
                if obj is None:
                    return self._send(h, 404, status_body(404, "NotFound", f'{key} "{name}" not found', name))
                return self._send(h, 200, copy.deepcopy(obj))
            items = [copy.deepcopy(o) for (p, n, _), o in sorted(self.objects.items())
                     if p == key and n == ns and matches_labels(o, selector)]
            return self._send(h, 200, {"kind": "List", "apiVersion": "v1",
                                       "metadata": {"resourceVersion": str(self.rv)}, "items": items})

    def _access_review(self, h: BaseHTTPRequestHandler, raw: bytes) -> None:
        """A SelfSubjectAccessReview (authorization.k8s.io/v1), asked as the impersonated user, if any: RBAC's
        RuleAllows over that user's rules (group, resource, verb, resourceNames)."""
        review = json.loads(raw or b"{}")
        attrs = (review.get("spec") or {}).get("resourceAttributes") or {}
        user = h.headers.get("Impersonate-User")
        if user is None:
            allowed = True
        else:
            group, resource, verb, name = (attrs.get("group") or "", attrs.get("resource"), attrs.get("verb"),
                                           attrs.get("name"))
            allowed = any(group in r.groups and (resource in r.resources or "*" in r.resources)
                          and (verb in r.verbs or "*" in r.verbs) and (not r.names or name in r.names)
                          for r in self.subject_rules.get(user, []))
        review["status"] = {"allowed": allowed}
        return self._send(h, 201, review)

    def _get_crd(self, h: BaseHTTPRequestHandler, name: str) -> None:
        """GET a CustomResourceDefinition (cluster-scoped; RBAC may name the one a ClusterRole allows)."""
        if not self._allowed(CRDS, "get", name):
            return self._send(h, 403, status_body(
                403, "Forbidden", f'customresourcedefinitions.apiextensions.k8s.io "{name}" is forbidden: User '
                f'"system:serviceaccount:llm:fma-requester" cannot get resource "customresourcedefinitions" in API '
                f'group "apiextensions.k8s.io" at the cluster scope', name, CRDS))
        with self.cond:
            obj = self.objects.get((CRDS, CLUSTER, name))
            if obj is None:
                return self._send(h, 404, status_body(
                    404, "NotFound", f'customresourcedefinitions.apiextensions.k8s.io "{name}" not found', name, CRDS))
            return self._send(h, 200, copy.deepcopy(obj))

    def _deny(self, h: BaseHTTPRequestHandler, rejected: Rejected, name: str | None, plural: str) -> None:
        code = rejected.code if rejected.code >= 400 else 400
        message = f'admission webhook "{rejected.webhook}" denied the request: {rejected.message}'
        return self._send(h, code, status_body(code, "BadRequest", message, name, plural))

    def _watch(self, h: BaseHTTPRequestHandler, ns: str, plural: str, query: dict[str, str]) -> None:
        since = int(query.get("resourceVersion") or 0)
        timeout = float(query.get("timeoutSeconds") or 300)
        deadline = time.monotonic() + timeout
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        h.wfile.flush()
        if self.hang_watches:  # a half-open connection: nothing more, ever (until the server stops)
            return self._hold()

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
                               for (p, _, _), o in sorted(self.objects.items()) if p == plural and wanted(o)]
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
                        pending = [{"type": kind, "object": obj} for rv, kind, p, obj in self.history
                                   if rv > since and p == plural and wanted(obj)]
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


def write_kubeconfig(path: Path, server: str, *, namespace: str | None = None, token: str = "not-a-secret",
                     user: str = "fma") -> Path:
    """A kubeconfig for one cluster and one bearer token (what the tests hand the real kubernetes client)."""
    context: dict[str, Any] = {"cluster": "fake", "user": user}
    if namespace:
        context["namespace"] = namespace
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "fake", "context": context}]}))
    return path
