"""The one interface between the requester's edges and whatever runs workers.

The HTTP and CloudEvents edges (through the data plane) only ever see
:class:`Actuator`. Its implementation is the actuation state machine
(``lifecycle.Lifecycle``), driven by one :class:`~fma_requester.effects.Effects`:
``LocalActuator`` (child processes) and ``KnativeActuator`` (one Knative
Service per model) are that machine with their effects plugged in.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from typing import Any

from .protocol import Actuation, ActuationPath, State, WorkerStatus

__all__ = ["Actuation", "ActuationPath", "Actuator", "State", "WorkerLease", "WorkerStatus"]


class WorkerLease:
    """A ready worker, held for one request. ``done()`` must be called once the
    request (or stream) ends; until then the worker counts as in flight and is
    never put to sleep, evicted or scaled to zero. Calling it twice is harmless."""

    def __init__(self, model: str, url: str, actuation: Actuation, on_done: Callable[[WorkerLease], None],
                 handle: object | None = None, epoch: int | None = None) -> None:
        self.model = model
        self.url = url
        self.actuation = actuation
        self.handle = handle  # the worker incarnation this lease is on
        self.epoch = epoch  # the actuator's count of effects on it when leased (a later report may be stale)
        self._on_done = on_done
        self._done = False
        self._lock = threading.Lock()

    @property
    def is_done(self) -> bool:
        return self._done

    def done(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._on_done(self)


class _Answered:
    """A ticket that already has its lease."""

    def __init__(self, lease: WorkerLease) -> None:
        self.lease = lease
        self.done = True

    def result(self) -> WorkerLease:
        return self.lease


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

    def worker_asleep(self, lease: WorkerLease) -> None:  # noqa: B027 - optional hook
        """The leased worker refused a request because it is asleep: the next request must wake it."""

    @abc.abstractmethod
    def release(self, model: str) -> WorkerStatus:
        """Scale the model's worker to zero now (idempotent); cancels a start in progress."""

    @abc.abstractmethod
    def sleep(self, model: str, level: int = 1) -> WorkerStatus:
        """Put a running worker to sleep; ``Conflict`` if it is cold."""

    @abc.abstractmethod
    def describe(self, model: str) -> WorkerStatus:
        """The current status of one configured model."""

    @abc.abstractmethod
    def list(self) -> list[WorkerStatus]:
        """One status per configured model, cold ones included."""

    def admit(self, model: str) -> Any:
        """Register a request without waiting for its worker; refusals (429, backoff) are raised at once.

        The default waits (an actuator without queues needs nothing more);
        the state machine answers at once and lets :meth:`wait_for` wait.
        """
        return _Answered(self.ensure_ready(model))

    def wait_for(self, ticket: Any, timeout: float | None = None) -> WorkerLease | None:
        """The ticket's lease; None if ``timeout`` passed first; raises if its start failed or timed out."""
        return ticket.result()

    def abandon(self, ticket: Any) -> None:
        """The client left: stop waiting, and give back the lease if one was given."""
        lease = getattr(ticket, "lease", None)
        if lease is not None:
            lease.done()

    def reload(self, registry: Any) -> list[str]:
        """Serve what a changed models file lists, without a restart; returns what changed."""
        raise NotImplementedError(f"the {self.backend} actuator cannot reload its models")

    def worker_unreachable(self, lease: WorkerLease) -> None:  # noqa: B027 - optional hook
        """A request could not reach its worker: check whether the worker is still there."""

    def worker_lost(self, lease: WorkerLease) -> bool:
        """A request's connection to its worker failed before any answer: is that worker gone (so nothing can be
        working on the request)? Asks now; a gone worker is replaced. The default only probes later."""
        self.worker_unreachable(lease)
        return False

    def start(self) -> None:  # noqa: B027 - optional hook
        """Begin background work (reaper, preloads)."""

    def shutdown(self, timeout: float = 30.0) -> None:  # noqa: B027 - optional hook
        """Stop every worker this actuator started (where the platform does not)."""
