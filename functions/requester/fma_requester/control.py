"""Control calls to a worker over HTTP: the vLLM sleep API and liveness.

Both effects implementations reach their workers the same way (an address
in the handle); this is that one client, with the classification the state
machine relies on: a worker that cannot be reached, or that answers with an
error, did not change state (:class:`EffectRefused`); a wake that fails is a
failure (the worker's state is unknown).
"""

from __future__ import annotations

from typing import Any

import httpx

from . import protocol as p
from .effects import EffectRefused, WorkerHandle


def error_text(resp: httpx.Response) -> str:
    """The worker's error message (from its envelope, else its text), shortened."""
    try:
        return str(resp.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return resp.text[:300]


def held_after_sleep(resp: httpx.Response) -> float | None:
    """MiB the worker says it still holds asleep: device memory on an accelerator, else its resident memory."""
    try:
        body = resp.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    for key in ("device_memory_allocated", "resident_bytes"):
        value = body.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            return value / 2**20
    return None


class WorkerControl:
    def __init__(self, timeout_s: float, connect_timeout_s: float, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s), headers=headers)

    def _post(self, url: str | None, path: str, timeout: float,
              params: dict[str, Any] | None = None) -> httpx.Response:
        if not url:
            raise EffectRefused("the worker has no address")
        try:
            return self._http.post(f"{url}{path}", params=params, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise EffectRefused(f"could not reach {url}: {exc}") from None

    def sleep(self, handle: WorkerHandle, level: int, timeout: float, url: str | None = None) -> None:
        """``POST /sleep`` at ``url`` (default: the handle's address)."""
        resp = self._post(url or handle.url, p.WORKER_SLEEP, timeout, {"level": level})
        if resp.status_code != 200:
            raise EffectRefused(f"{resp.status_code}: {error_text(resp)}", status=resp.status_code)
        handle.asleep_mib = held_after_sleep(resp)

    def wake(self, handle: WorkerHandle, timeout: float, url: str | None = None) -> None:
        resp = self._post(url or handle.url, p.WORKER_WAKE, timeout)
        if resp.status_code != 200:
            raise RuntimeError(f"the worker answered {resp.status_code} to {p.WORKER_WAKE}: {error_text(resp)}")

    def is_sleeping(self, url: str, timeout: float) -> bool | None:
        """``GET /is_sleeping`` at ``url``: the worker's own word, or None if it could not be had."""
        try:
            resp = self._http.get(f"{url}{p.WORKER_IS_SLEEPING}", timeout=timeout)
            resp.raise_for_status()
            value = resp.json().get("is_sleeping")
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return value if isinstance(value, bool) else None

    def start_report(self, url: str, timeout: float) -> dict[str, Any]:
        """The worker's account of its own start (``GET /ready?wait=``: its boot and load phases), {} if none."""
        try:
            resp = self._http.get(f"{url}{p.WORKER_READY}", params={"wait": "0.01"}, timeout=timeout)
            resp.raise_for_status()
            start = resp.json().get("start")
        except (httpx.HTTPError, ValueError, AttributeError):
            return {}
        return start if isinstance(start, dict) else {}

    def alive(self, handle: WorkerHandle, timeout: float, url: str | None = None) -> bool:
        target = url or handle.url
        if not target:
            return False
        try:
            self._http.get(f"{target}{p.PATH_HEALTH}", timeout=timeout).raise_for_status()
        except httpx.HTTPError:
            return False
        return True

    def close(self) -> None:
        self._http.close()
