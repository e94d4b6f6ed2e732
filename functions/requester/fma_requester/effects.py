"""The one seam between the actuation state machine and the world.

The state machine (``lifecycle.py``) decides; an :class:`Effects`
implementation acts: ``LocalEffects`` with processes and the pre-warmed
launcher, ``KnativeEffects`` with the Kubernetes API, and the tests'
recording fake. Like llama-swap's ``Effects``, every call that touches the
world goes through here, and nothing here decides anything.

Rules every implementation keeps (the machine relies on them):

* Calls are made on a worker thread, never under the machine's lock, and
  may take as long as they need, but each is bounded by the deadline it is
  given (``start``/``wake``/``sleep``) or by its own grace (``stop``).
* ``stop(handle)`` may be called while a ``start(handle)`` is still running
  (a release, or a start past its deadline). It must return only when no
  worker for that handle is left, including one the start may still be
  about to create: a start that finds its handle cancelled stops what it
  made and raises. That is how "at most one worker per model" holds.
* Anything raised is a failure of that call; :class:`EffectRefused` says the
  worker was not reached or said no, so its state did not change.
* Notifications the world sends on its own (a process exited, a Service was
  deleted, a running worker was found at start-up) go to the
  :class:`EffectsListener` given to :meth:`Effects.bind`.
"""

from __future__ import annotations

import abc
import itertools
import threading
from typing import Any, Protocol

from .registry import ModelRegistry, ModelSpec

_serials = itertools.count(1)


class WorkerHandle:
    """One incarnation of a model's worker, from its start until it is gone.

    Created by the state machine before it asks for a start; the effects
    fill in what they made (``url``, and their own ``data``: a process, a
    log path, a Service name). ``cancel`` tells a start still in progress
    to give up.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self.serial = next(_serials)
        self.url: str | None = None
        self.progress = "not started"  # last thing seen while starting, for deadline messages
        self.steps: dict[str, float] = {}  # where the start spent its seconds, when the effects can tell
        # What the worker still holds while asleep, as it measured it after its last sleep (MiB of device memory
        # on an accelerator, else resident memory); None if unknown. The budget counts the larger of this and
        # the model's declared sleep_memory_mib, so a model is admitted only once the memory really came back.
        self.asleep_mib: float | None = None
        self.data: dict[str, Any] = {}
        self.pending: str | None = None  # a stop handed to the platform, still in progress: what it waits for
        self.lock = threading.Lock()  # held by effects while they create or destroy what the handle owns
        self._cancelled = threading.Event()
        self._stop_abandoned = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def cancel_event(self) -> threading.Event:
        return self._cancelled

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def stop_abandoned(self) -> threading.Event:
        """Set when a request took the worker back while its stop was still waiting on the platform."""
        return self._stop_abandoned

    def abandon_stop(self) -> None:
        self._stop_abandoned.set()

    def __repr__(self) -> str:
        return f"<worker {self.model} #{self.serial}>"


class EffectRefused(Exception):
    """The worker was not reached or refused; whatever it was doing, it still does."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EffectsListener(Protocol):
    """What the world can tell the state machine on its own."""

    def worker_exited(self, handle: WorkerHandle, reason: str) -> None:
        """The worker went away unexpectedly (a crash, a failed revision)."""

    def worker_gone(self, handle: WorkerHandle | None, model: str) -> None:
        """The worker was removed behind our back (e.g. its Service deleted): the model is cold."""

    def worker_found(self, model: str, handle: WorkerHandle, state: str = "ready") -> None:
        """A worker for a cold model is already there (found at start-up): adopt it as ``ready``,
        ``sleeping``, or ``releasing`` (released, not gone yet: it still holds its memory)."""

    def stop_pending(self, handle: WorkerHandle, detail: str) -> None:
        """The stop was handed to the platform and is now only waited for (``detail`` says on what)."""


class Effects(abc.ABC):
    """Start, stop, sleep, wake, probe and read the log of workers."""

    backend = "abstract"
    # Stop every worker when the requester shuts down (local processes), or
    # leave them to the platform (Knative scales them down by itself).
    stop_on_shutdown = True
    # A request may take back a worker whose stop is still waiting on the platform (``stop_abandoned`` tells the
    # stop to give up; a start then brings the same worker back): Knative, where a release ends when the
    # autoscaler removes the pod, a minute or more later.
    reclaimable = False

    def can_reclaim(self, handle: WorkerHandle) -> bool:
        """Whether this stop in progress may still be taken back (with ``reclaimable``)."""
        return self.reclaimable

    def stop_timeout(self, spec: ModelSpec, grace: float) -> float:
        """How long :meth:`stop` may take: its grace, unless the platform needs longer to remove the worker."""
        return grace

    def bind(self, listener: EffectsListener) -> None:
        self.listener = listener

    @abc.abstractmethod
    def start(self, spec: ModelSpec, handle: WorkerHandle, timeout: float) -> str:
        """Start a worker and return its URL once it is ready to serve."""

    @abc.abstractmethod
    def stop(self, spec: ModelSpec, handle: WorkerHandle, grace: float) -> None:
        """Stop the worker (draining for up to ``grace`` seconds); never raises."""

    @abc.abstractmethod
    def sleep(self, spec: ModelSpec, handle: WorkerHandle, level: int, timeout: float) -> None:
        """Put the worker to sleep at ``level`` (vLLM's sleep API); set ``handle.asleep_mib`` if it can tell."""

    @abc.abstractmethod
    def wake(self, spec: ModelSpec, handle: WorkerHandle, timeout: float) -> None:
        """Wake a sleeping worker; return once it serves again."""

    @abc.abstractmethod
    def probe(self, spec: ModelSpec, handle: WorkerHandle, timeout: float) -> bool:
        """Is the worker still there and answering?"""

    @abc.abstractmethod
    def read_log(self, spec: ModelSpec, handle: WorkerHandle, limit: int) -> str:
        """The end of the worker's log (or the platform's last word on it), for error messages."""

    def open(self, registry: ModelRegistry) -> None:  # noqa: B027 - optional hook
        """Begin background work (pre-warming for these models, watching the cluster)."""

    def reload(self, registry: ModelRegistry) -> None:  # noqa: B027 - optional hook
        """The models file changed (called under the machine's lock: must not block)."""

    def housekeeping(self) -> None:  # noqa: B027 - optional hook
        """Periodic upkeep outside the machine's lock (log rotation)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the effects hold (after the workers are stopped)."""
