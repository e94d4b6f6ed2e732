"""The requester's Kubernetes client: Knative Services and Revisions in one namespace, every call bounded.

One place for every API call the Knative actuator makes, through the
official ``kubernetes`` client's ``CustomObjectsApi``:

* each call carries ``_request_timeout`` (a hung API server is a failed
  call, not a hung thread); a watch asks the server to end it
  (``timeoutSeconds``), bounds every read a little beyond that (a half-open
  connection is abandoned, not waited on), and can be closed from another
  thread (a release stops the start's watch at once);
* ``ApiException.status`` is kept: 403 becomes an error naming the missing
  RBAC verb, 5xx/429 and transport errors are retried with bounded
  backoff, 404 and 409 are answers (``None`` / :class:`AlreadyExists`), a
  4xx from an admission webhook is a permanent :class:`Rejected`, anything
  else is raised as it is.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fma_common.errors import ApiError

log = logging.getLogger("fma.requester.kube")

GROUP, VERSION, PLURAL = "serving.knative.dev", "v1", "services"
REVISIONS = "revisions"
CRDS = "customresourcedefinitions"
# The API group each resource the requester touches lives in (for messages naming an RBAC grant).
_GROUP_OF = {"pods": "", CRDS: ".apiextensions.k8s.io"}


class KnativeError(ApiError):
    """The platform did not do what the requester asked: worth retrying later."""

    status = 503
    type = "service_unavailable_error"
    code = "knative_error"


class KnativeConfigError(KnativeError):
    """What the requester asks for is refused as such (RBAC, a name taken, the webhook):
    retrying the same request fails the same way until someone changes the setup."""

    status = 500
    type = "server_error"
    code = "knative_config_error"


class AlreadyExists(Exception):
    """A create found an object of that name (HTTP 409)."""


# Pod-spec fields Knative allows only behind a config-features flag (knative/serving pkg/apis/serving/fieldmask.go,
# pkg/apis/config/features.go), as its webhook names them in "must not set the field(s): ...".
FEATURE_FLAGS = {
    "nodeSelector": "kubernetes.podspec-nodeselector", "affinity": "kubernetes.podspec-affinity",
    "tolerations": "kubernetes.podspec-tolerations", "fieldRef": "kubernetes.podspec-fieldref",
    "resourceFieldRef": "kubernetes.podspec-fieldref", "runtimeClassName": "kubernetes.podspec-runtimeclassname",
    "topologySpreadConstraints": "kubernetes.podspec-topologyspreadconstraints",
    "priorityClassName": "kubernetes.podspec-priorityclassname", "schedulerName": "kubernetes.podspec-schedulername",
    "initContainers": "kubernetes.podspec-init-containers", "hostAliases": "kubernetes.podspec-hostaliases",
}


def feature_hint(message: str) -> str:
    """Which config-features flags would let a refused field through, as a sentence to append."""
    flags = []
    for fields in re.findall(r"must not set the field\(s\): ([^\n]+)", message):
        for path in fields.split(","):
            flag = FEATURE_FLAGS.get(path.strip().rsplit(".", 1)[-1])
            if flag and flag not in flags:
                flags.append(flag)
    if not flags:
        return ""
    return (f"; enable {', '.join(flags)} in the config-features ConfigMap of knative-serving "
            f"(kubectl patch configmap config-features -n knative-serving --type merge "
            f"--patch-file knative/cluster/config-features.yaml)")


def _status_message(exc: Any) -> str:
    """The ``message`` of a Kubernetes Status body, else the exception's reason."""
    try:
        return str(json.loads(exc.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(getattr(exc, "reason", None) or exc)


def _socket_of(resp: Any) -> socket.socket | None:
    """The socket under a streaming urllib3 response (urllib3 exposes it in one of these places)."""
    for path in (("connection", "sock"), ("_fp", "fp", "raw", "_sock")):
        obj = resp
        for attr in path:
            obj = getattr(obj, attr, None)
        if isinstance(obj, socket.socket):
            return obj
    return None


class WatchStream:
    """One watch request: events as dicts, stoppable from another thread.

    ``close`` from another thread shuts the socket down, which wakes the
    read blocked in the iterating thread (closing the response there would
    wait for that read's lock); the iterating thread then releases it.
    """

    def __init__(self, resp: Any) -> None:
        self._resp = resp
        self._closed = False
        self._reading = False
        self._released = False
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        pending = b""
        self._reading = True
        try:
            for chunk in self._resp.stream(4096, decode_content=False):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        obj = event.get("object") or {}
                        raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: "
                                                                          f"{obj.get('message')}")
                    yield event
                if self._closed:
                    return
        except Exception:
            if self._closed:
                return  # stopped on purpose: the interrupted read is not an error
            raise
        finally:
            self._reading = False
            self._release()

    def close(self) -> None:
        self._closed = True
        sock = _socket_of(self._resp)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if not self._reading:
            self._release()

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        try:
            self._resp.close()
            self._resp.release_conn()
        except Exception:  # releasing is best effort
            pass


def custom_objects_api(configuration: Any) -> Any:
    """A CustomObjectsApi whose calls are each tried once by urllib3: :class:`KubeClient` does the retrying.

    urllib3's default (3 retries, read errors included for GET) would multiply
    our own attempts and make a hung API server cost 4x ``FMA_KUBE_TIMEOUT``
    per attempt instead of one ``FMA_KUBE_TIMEOUT``.
    """
    from kubernetes import client

    configuration.retries = False
    return client.CustomObjectsApi(client.ApiClient(configuration))


def load_configuration() -> Any:
    """The requester's credentials: in-cluster config first, kubeconfig as the fallback."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return configuration


def load_api() -> Any:
    """The CustomObjectsApi with the requester's credentials."""
    return custom_objects_api(load_configuration())


class KubeClient:
    def __init__(self, api: Any, namespace: str, *, retries: int = 4, timeout_s: float = 30.0) -> None:
        self.api = api
        self.namespace = namespace
        self.retries = retries
        self.timeout_s = timeout_s

    def _call(self, verb: str, fn: Callable[..., Any], *args: Any, resource: str = PLURAL, **kwargs: Any) -> Any:
        """One API call with RBAC errors named and transient failures retried."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError as TransportError

        kwargs.setdefault("_request_timeout", self.timeout_s)
        delay = 0.25
        for attempt in range(1, self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                if exc.status == 403:
                    group = _GROUP_OF.get(resource, ".serving.knative.dev")
                    where = "at the cluster scope" if resource == CRDS else f"in namespace {self.namespace}"
                    role = "the fma-requester-knative-version ClusterRole" if resource == CRDS else \
                        "the fma-requester Role"
                    raise KnativeConfigError(
                        f"RBAC: the requester's ServiceAccount may not {verb} {resource}{group} {where} "
                        f"(403 Forbidden); grant the verb {verb!r} on {resource!r} in {role}",
                        code="forbidden") from None
                if exc.status in (400, 422) and "admission webhook" in _status_message(exc):
                    text = _status_message(exc)
                    one_line = " ".join(text.split())  # the webhook joins its errors with newlines
                    raise KnativeConfigError(f"Knative refused the worker Service: {one_line}{feature_hint(text)}",
                                             code="webhook_rejected") from None
                if ((exc.status or 0) >= 500 or exc.status == 429) and attempt < self.retries:
                    log.warning("kube %s failed with %s (attempt %d); retrying in %.2f s", verb, exc.status,
                                attempt, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                raise
            except TransportError as exc:
                if attempt < self.retries:
                    log.warning("kube %s transport error (attempt %d): %s", verb, attempt, exc)
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                raise KnativeError(f"the Kubernetes API is unreachable: {exc}") from None
        raise AssertionError("unreachable: the loop returns or raises")

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._call("get", self.api.get_namespaced_custom_object, GROUP, VERSION, self.namespace,
                              PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._call("create", self.api.create_namespaced_custom_object, GROUP, VERSION, self.namespace,
                              PLURAL, body)
        except ApiException as exc:
            if exc.status == 409:
                raise AlreadyExists(body["metadata"]["name"]) from None
            raise

    def patch(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386: ``None`` removes a key)."""
        return self._call("patch", self.api.patch_namespaced_custom_object, GROUP, VERSION, self.namespace,
                          PLURAL, name, patch)

    def delete(self, name: str) -> bool:
        """False if there was nothing to delete."""
        from kubernetes.client.exceptions import ApiException

        try:
            self._call("delete", self.api.delete_namespaced_custom_object, GROUP, VERSION, self.namespace,
                       PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def list(self, label_selector: str) -> dict[str, Any]:
        return self._call("list", self.api.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
                          label_selector=label_selector)

    def get_revision(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._call("get", self.api.get_namespaced_custom_object, GROUP, VERSION, self.namespace,
                              REVISIONS, name, resource=REVISIONS)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_revision(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A merge patch of a Revision (its metadata: a Revision's spec is immutable)."""
        return self._call("patch", self.api.patch_namespaced_custom_object, GROUP, VERSION, self.namespace,
                          REVISIONS, name, patch, resource=REVISIONS)

    def list_pods(self, label_selector: str) -> list[dict[str, Any]]:
        """Pods by label (core v1), as plain dicts."""
        return list(self.pod_list(label_selector).get("items", []))

    def pod_list(self, label_selector: str) -> dict[str, Any]:
        """The PodList (items and ``metadata.resourceVersion``, to watch from)."""
        from kubernetes import client

        core = client.CoreV1Api(self.api.api_client)
        resp = self._call("list", core.list_namespaced_pod, self.namespace, label_selector=label_selector,
                          _preload_content=False, resource="pods")
        return dict(json.loads(resp.data))

    def watch_pods(self, label_selector: str, *, resource_version: str | None, timeout_s: float,
                   read_grace_s: float = 10.0) -> WatchStream:
        """Pod events by label from ``resource_version`` on, bounded like :meth:`watch`."""
        from kubernetes import client

        core = client.CoreV1Api(self.api.api_client)
        seconds = max(1, int(timeout_s))
        kwargs: dict[str, Any] = {"watch": True, "_preload_content": False, "timeout_seconds": seconds,
                                  "label_selector": label_selector,
                                  "_request_timeout": (min(self.timeout_s, 10.0), seconds + read_grace_s)}
        if resource_version:
            kwargs["resource_version"] = resource_version
        return WatchStream(self._call("watch", core.list_namespaced_pod, self.namespace, resource="pods", **kwargs))

    def get_crd(self, name: str) -> dict[str, Any] | None:
        """A CustomResourceDefinition (cluster-scoped), or None if there is none of that name."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        ext = client.ApiextensionsV1Api(self.api.api_client)
        try:
            resp = self._call("get", ext.read_custom_resource_definition, name, _preload_content=False,
                              resource=CRDS)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(json.loads(resp.data))

    def watch(self, *, resource_version: str | None, timeout_s: float, field_selector: str | None = None,
              label_selector: str | None = None, read_grace_s: float = 10.0) -> WatchStream:
        """Events from ``resource_version`` on, for at most ``timeout_s``.

        The server is asked to end the watch then (``timeoutSeconds``), and no
        read may wait longer than that plus ``read_grace_s``: a connection that
        went half-open raises instead of hanging. An expired resourceVersion
        raises ApiException 410; 403 is named like any other call's.
        """
        seconds = max(1, int(timeout_s))
        kwargs: dict[str, Any] = {"watch": True, "_preload_content": False, "timeout_seconds": seconds,
                                  "_request_timeout": (min(self.timeout_s, 10.0), seconds + read_grace_s)}
        if resource_version:
            kwargs["resource_version"] = resource_version
        if field_selector:
            kwargs["field_selector"] = field_selector
        if label_selector:
            kwargs["label_selector"] = label_selector
        resp = self._call("watch", self.api.list_namespaced_custom_object, GROUP, VERSION, self.namespace,
                          PLURAL, **kwargs)
        return WatchStream(resp)


@dataclass(frozen=True)
class Access:
    """One (API group, resource, verb) the requester uses; the shipped Role and ClusterRoles grant exactly these
    (tests/test_manifests.py) and ``fma doctor`` asks the cluster whether it does (a SelfSubjectAccessReview)."""

    group: str
    resource: str
    verb: str
    namespaced: bool = True
    name: str | None = None  # a resourceNames grant

    def __str__(self) -> str:
        what = f"{self.resource}.{self.group}" if self.group else self.resource
        return f"{self.verb} {what}{'/' + self.name if self.name else ''}"


REQUESTER_ACCESS: tuple[Access, ...] = (
    *(Access("serving.knative.dev", "services", verb) for verb in ("get", "list", "watch", "create", "patch",
                                                                    "delete")),
    Access("serving.knative.dev", "revisions", "get"),
    Access("serving.knative.dev", "revisions", "patch"),
    Access("", "pods", "list"),
    Access("", "pods", "watch"),
    Access("authentication.k8s.io", "tokenreviews", "create", namespaced=False),
    Access("apiextensions.k8s.io", "customresourcedefinitions", "get", namespaced=False,
           name="services.serving.knative.dev"),
)
