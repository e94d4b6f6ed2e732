"""The requester, as the CLI's client commands see it: one HTTP client, errors with one-line reasons.

Where the requester is: ``--url`` / ``FMA_URL``; else, as a kn plugin (or with
``--namespace``) and with a kubeconfig present, the ``status.url`` of the
``fma-requester`` Knative Service; else ``http://localhost:8081``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://localhost:8081"
REQUESTER_SERVICE = "fma-requester"

# Exit codes scripts can rely on (the README lists them).
EXIT_OK = 0
EXIT_HTTP_ERROR = 1  # the requester answered with an error (status and message printed)
EXIT_USAGE = 2  # bad arguments or settings (click's own usage errors are 2 too)
EXIT_UNREACHABLE = 3  # no answer from the URL tried
EXIT_UNKNOWN_MODEL = 4  # the model is not configured (the configured ones are named)


class CliError(Exception):
    """A failure the CLI reports as one line on stderr and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Target:
    url: str
    how: str  # where the URL came from, said on stderr when it was not given explicitly

    @property
    def explicit(self) -> bool:
        return self.how in ("--url", "FMA_URL")


def kubeconfig_present(env: Mapping[str, str]) -> bool:
    paths = env.get("KUBECONFIG")
    if paths:
        return any(Path(p).is_file() for p in paths.split(os.pathsep) if p)
    return (Path(env.get("HOME", str(Path.home()))) / ".kube" / "config").is_file()


def discover(namespace: str | None, timeout: float = 10.0) -> Target:
    """The requester's URL from its Knative Service (namespace: given, else the kubeconfig context's)."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    try:
        _, active = config.list_kube_config_contexts()
        config.load_kube_config()
    except Exception as exc:  # a broken kubeconfig is the user's to fix: say so in one line
        raise CliError(f"cannot read the kubeconfig: {exc}", EXIT_USAGE) from exc
    ns = namespace or (active or {}).get("context", {}).get("namespace") or "default"
    api = client.CustomObjectsApi()
    try:
        svc = api.get_namespaced_custom_object("serving.knative.dev", "v1", ns, "services", REQUESTER_SERVICE,
                                               _request_timeout=timeout)
    except ApiException as exc:
        if exc.status == 404:
            raise CliError(f"no Knative Service {REQUESTER_SERVICE} in namespace {ns} (deploy it with "
                           "`make deploy`, pass --namespace, or give --url)", EXIT_UNREACHABLE) from exc
        raise CliError(f"cannot read Knative Service {ns}/{REQUESTER_SERVICE}: {exc.status} {exc.reason}",
                       EXIT_UNREACHABLE) from exc
    except Exception as exc:  # connection refused, DNS, TLS: the cluster did not answer
        raise CliError(f"cannot reach the cluster in the kubeconfig: {exc}", EXIT_UNREACHABLE) from exc
    url = (svc.get("status") or {}).get("url")
    if not url:
        raise CliError(f"Knative Service {ns}/{REQUESTER_SERVICE} has no URL yet (is it Ready? "
                       f"kubectl get ksvc -n {ns} {REQUESTER_SERVICE})", EXIT_UNREACHABLE)
    return Target(url, f"the {REQUESTER_SERVICE} Knative Service in namespace {ns}")


def resolve(url: str | None, namespace: str | None, kn_plugin: bool, env: Mapping[str, str]) -> Target:
    if url:
        return Target(url, "--url")
    if env.get("FMA_URL"):
        return Target(env["FMA_URL"], "FMA_URL")
    if (kn_plugin or namespace) and kubeconfig_present(env):
        return discover(namespace)
    return Target(DEFAULT_URL, "the default")


class RequesterClient:
    """Talks to one requester; turns every failure into a :class:`CliError` with the reason."""

    def __init__(self, target: Target, *, timeout: float, api_key: str | None = None) -> None:
        self.target = target
        self.api_key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=target.url.rstrip("/"), headers=headers,
                                 timeout=httpx.Timeout(timeout, connect=5.0))

    def __enter__(self) -> RequesterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return self.http.request(method, path, **kw)
        except httpx.TimeoutException as exc:
            raise CliError(f"no answer from {self.target.url} within the timeout ({exc.__class__.__name__}); "
                           "a cold start may need a larger --timeout", EXIT_UNREACHABLE) from exc
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the requester at {self.target.url}: {exc}", EXIT_UNREACHABLE) from exc

    def json(self, method: str, path: str, *, model: str | None = None, **kw: Any) -> Any:
        resp = self.request(method, path, **kw)
        if resp.status_code >= 400:
            raise self.error(resp, model)
        try:
            return resp.json()
        except ValueError as exc:
            raise CliError(f"{self.target.url}{path} answered {resp.status_code} with a body that is not JSON "
                           "(is that URL a requester?)", EXIT_HTTP_ERROR) from exc

    def error(self, resp: httpx.Response, model: str | None = None) -> CliError:
        """The one-line reason for an error answer: status, code and message from the envelope."""
        try:
            err = resp.json()["error"]
            code, message = err.get("code"), err.get("message")
        except (ValueError, KeyError, TypeError):
            code, message = None, resp.text.strip().splitlines()[0][:300] if resp.text.strip() else resp.reason_phrase
        if resp.status_code == 404 and code == "model_not_found" and model is not None:
            return CliError(f"unknown model {model!r}; configured: {', '.join(self.configured()) or 'none'}",
                            EXIT_UNKNOWN_MODEL)
        return CliError(f"{resp.status_code} {code or resp.reason_phrase}: {message}", EXIT_HTTP_ERROR)

    def configured(self) -> list[str]:
        try:
            resp = self.http.get("/v1/models")
            return [m["id"] for m in resp.json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return []
