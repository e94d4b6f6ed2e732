"""The requester's Kubernetes client: Knative Services in one namespace, every call bounded.

One place for every API call the Knative actuator makes, through the
official ``kubernetes`` client's ``CustomObjectsApi``:

* each call carries ``_request_timeout`` (a hung API server is a failed
  call, not a hung thread); a watch also asks the server to end it
  (``timeoutSeconds``) and bounds each read a little beyond that;
* ``ApiException.status`` is kept: 403 becomes an error naming the missing
  RBAC verb, 5xx/429 and transport errors are retried with bounded
  backoff, 404 and 409 are answers (``None`` / :class:`AlreadyExists`),
  anything else is raised as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from fma_common.errors import ApiError

log = logging.getLogger("fma.requester.kube")

GROUP, VERSION, PLURAL = "serving.knative.dev", "v1", "services"


class KnativeError(ApiError):
    status = 503
    type = "service_unavailable_error"
    code = "knative_error"


class AlreadyExists(Exception):
    """A create found an object of that name (HTTP 409)."""


def load_api() -> Any:
    """The CustomObjectsApi: in-cluster config first, kubeconfig as the fallback."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


class KubeClient:
    def __init__(self, api: Any, namespace: str, *, retries: int = 4, timeout_s: float = 30.0) -> None:
        self.api = api
        self.namespace = namespace
        self.retries = retries
        self.timeout_s = timeout_s

    def _call(self, verb: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
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
                    raise KnativeError(
                        f"RBAC: the requester's ServiceAccount may not {verb} services.serving.knative.dev in "
                        f"namespace {self.namespace} (403 Forbidden); grant the verb {verb!r} in the "
                        f"fma-requester Role", code="forbidden") from None
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

    def watch(self, *, resource_version: str | None, timeout_s: float, field_selector: str | None = None,
              label_selector: str | None = None) -> Iterator[dict[str, Any]]:
        """Events from ``resource_version`` on, for at most ``timeout_s`` (raises ApiException 410 when expired).

        403 is named like any other call's; the stream stops when the
        generator is closed.
        """
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        seconds = max(1, int(timeout_s))
        kwargs: dict[str, Any] = {"resource_version": resource_version, "timeout_seconds": seconds,
                                  # connect like any call; each read may wait for the server's own timeout
                                  "_request_timeout": (min(self.timeout_s, 10.0), seconds + 10)}
        if field_selector:
            kwargs["field_selector"] = field_selector
        if label_selector:
            kwargs["label_selector"] = label_selector
        w = watch.Watch()
        try:
            yield from w.stream(self.api.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
                                **kwargs)
        except ApiException as exc:
            if exc.status == 403:
                raise KnativeError(f"RBAC: the requester's ServiceAccount may not watch services.serving.knative.dev "
                                   f"in namespace {self.namespace} (403)", code="forbidden") from None
            raise
        finally:
            w.stop()
