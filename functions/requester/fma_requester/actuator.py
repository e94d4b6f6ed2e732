"""The one interface between the requester and whatever runs workers.

``LocalActuator`` runs workers as child processes; ``KnativeActuator`` (later)
creates one Knative Service per model. The HTTP edge only ever sees this
interface, so both are driven by the same routes and tests.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from typing import Any, Literal

State = Literal["cold", "starting", "ready", "sleeping", "failed"]
ActuationPath = Literal["cold", "wake", "warm"]


@dataclass(frozen=True)
class Actuation:
    path: ActuationPath
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "seconds": round(self.seconds, 4)}


@dataclass(frozen=True)
class WorkerStatus:
    """The worker status of design.md, one per configured model."""

    model: str
    state: State
    backend: str
    url: str | None
    last_used: float | None
    in_flight: int
    queued: int
    last_actuation: Actuation | None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model, "state": self.state, "backend": self.backend, "url": self.url,
            "last_used": self.last_used, "in_flight": self.in_flight, "queued": self.queued,
            "last_actuation": self.last_actuation.as_dict() if self.last_actuation else None,
        }
        if self.state == "failed":
            out["error"] = self.error or "unknown error"
        return out


class WorkerLease:
    """A ready worker, held for one request. ``done()`` must be called once the
    request (or stream) ends; until then the worker counts as in flight and is
    never evicted or scaled to zero."""

    def __init__(self, model: str, url: str, actuation: Actuation, on_done: Any) -> None:
        self.model = model
        self.url = url
        self.actuation = actuation
        self._on_done = on_done
        self._done = False
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._on_done(self.model)


class Actuator(abc.ABC):
    """Lifecycle of per-model workers. Every method is safe to call concurrently."""

    backend: str = "abstract"

    @abc.abstractmethod
    def ensure_ready(self, model: str) -> WorkerLease:
        """Return a lease on a ready worker, starting or waking one if needed.

        Concurrent callers for a cold model join one activation (single
        flight). Raises ``ModelNotFound``, ``QueueFull`` (429), ``WorkerFailed``
        or ``WorkerNotReady`` (503, with the last state seen) at the deadline.
        """

    @abc.abstractmethod
    def release(self, model: str) -> WorkerStatus:
        """Scale the model's worker to zero now (idempotent)."""

    @abc.abstractmethod
    def sleep(self, model: str, level: int = 1) -> WorkerStatus:
        """Put a running worker to sleep; ``Conflict`` if it is cold."""

    @abc.abstractmethod
    def describe(self, model: str) -> WorkerStatus:
        """The current status of one configured model."""

    @abc.abstractmethod
    def list(self) -> list[WorkerStatus]:
        """One status per configured model, cold ones included."""

    def start(self) -> None:  # noqa: B027 - optional hook
        """Begin background work (reaper, preloads)."""

    def shutdown(self, timeout: float = 30.0) -> None:  # noqa: B027 - optional hook
        """Stop every worker this actuator started."""
