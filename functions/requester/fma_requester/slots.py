"""Per-model slots and the single-flight wait that both actuators share.

A :class:`SlotActuator` owns one :class:`Slot` per configured model, guarded by
one condition variable. ``ensure_ready`` is the whole admission protocol:

* ``ready`` -> a lease at once (``warm``);
* ``cold`` / ``sleeping`` / ``failed`` past its backoff -> the subclass's
  :meth:`SlotActuator._begin_actuation` starts (or wakes) one worker, under
  the lock, and the caller waits with everyone else (single flight);
* a failure of the attempt a caller waited for wakes it at once with the
  reason; a failure before the backoff has passed is refused with
  ``Retry-After``; waiting is bounded in number (``max_queue`` -> 429) and
  in time (``queue_timeout`` -> 503 with the last state seen).

Subclasses decide *how* a worker starts (a process, a Knative Service) and
publish the outcome with :meth:`SlotActuator._set_state` under the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from fma_common.errors import Conflict, ModelNotFound, QueueFull, UpstreamError, WorkerFailed, WorkerNotReady

from .actuator import Actuation, Actuator, State, WorkerLease, WorkerStatus
from .metrics import RequesterMetrics
from .registry import ModelRegistry, ModelSpec


@dataclass
class Slot:
    spec: ModelSpec
    state: State = "cold"
    url: str | None = None
    error: str | None = None
    attempt: int = 0  # bumped by each start, wake or stop; waiters fail fast only on their own attempt's failure
    failures: int = 0
    retry_at: float = 0.0
    waiters: int = 0
    in_flight: int = 0
    last_used: float | None = None  # wall clock, for status
    last_used_mono: float = field(default_factory=time.monotonic)  # for idle timeouts and LRU
    last_actuation: Actuation | None = None


EventSink = Callable[[str, dict[str, Any]], None]


class SlotActuator(Actuator):
    def __init__(self, registry: ModelRegistry, metrics: RequesterMetrics, slots: dict[str, Slot], *,
                 emit: EventSink | None = None, connect_timeout_s: float = 10.0) -> None:
        self.registry = registry
        self.metrics = metrics
        self.emit = emit or (lambda _type, _data: None)
        self._cond = threading.Condition()
        self._slots = slots
        self._closing = False
        # Control calls to workers (sleep, wake); generous read timeout: a level-2 wake reloads weights.
        self._http = httpx.Client(timeout=httpx.Timeout(120.0, connect=connect_timeout_s))
        for name in slots:
            metrics.set_worker_state(name, "cold")

    # ---- hooks -------------------------------------------------------------------

    def _begin_actuation(self, slot: Slot) -> bool:
        """Under the lock: start or wake ``slot``'s worker now (moving it to
        ``starting`` and bumping ``attempt``), or return False to wait."""
        raise NotImplementedError

    def _waiting_on(self, slot: Slot) -> str:
        """The last state seen, for a deadline message."""
        return f"state {slot.state}"

    def _after_sleep(self) -> None:
        """Under the lock, after a worker went to sleep (e.g. enforce a sleeper budget)."""

    # ---- status --------------------------------------------------------------------

    def _slot(self, model: str) -> Slot:
        slot = self._slots.get(model)
        if slot is None:
            raise ModelNotFound(f"model {model!r} is not served here; available: {', '.join(self._slots)}",
                                param="model")
        return slot

    def _status(self, slot: Slot) -> WorkerStatus:
        return WorkerStatus(model=slot.spec.name, state=slot.state, backend=self.backend,
                            url=slot.url if slot.state in ("ready", "sleeping", "starting") else None,
                            last_used=slot.last_used, in_flight=slot.in_flight, queued=slot.waiters,
                            last_actuation=slot.last_actuation, error=slot.error)

    def _set_state(self, slot: Slot, state: State) -> None:
        slot.state = state
        self.metrics.set_worker_state(slot.spec.name, state)
        self._cond.notify_all()

    def describe(self, model: str) -> WorkerStatus:
        with self._cond:
            return self._status(self._slot(model))

    def list(self) -> list[WorkerStatus]:
        with self._cond:
            return [self._status(s) for s in self._slots.values()]

    # ---- ensure_ready --------------------------------------------------------------

    def ensure_ready(self, model: str) -> WorkerLease:
        started = time.monotonic()
        with self._cond:
            slot = self._slot(model)
            if self._closing:
                raise WorkerNotReady("the requester is shutting down", headers={"Retry-After": "5"})
            deadline = started + (slot.spec.queue_timeout or 120.0)
            my_attempt: int | None = None
            waited = False
            while True:
                if slot.state == "ready" and slot.url:
                    return self._lease(slot, started, waited)
                if slot.state == "failed" and my_attempt == slot.attempt:
                    self.metrics.rejections.labels(model, "start_failed").inc()
                    raise WorkerFailed(f"worker for {model} failed to start: {slot.error}")
                if slot.state in ("cold", "failed", "sleeping"):
                    if slot.state == "failed" and time.monotonic() < slot.retry_at:
                        wait = slot.retry_at - time.monotonic()
                        self.metrics.rejections.labels(model, "backoff").inc()
                        raise WorkerFailed(f"worker for {model} failed to start: {slot.error}; "
                                           f"next retry in {wait:.0f} s",
                                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})
                    if self._begin_actuation(slot):
                        my_attempt = slot.attempt
                elif slot.state == "starting" and my_attempt is None:
                    my_attempt = slot.attempt
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.metrics.rejections.labels(model, "deadline").inc()
                    raise WorkerNotReady(f"worker for {model} not ready after {time.monotonic() - started:.0f} s "
                                         f"({self._waiting_on(slot)}); retry later", headers={"Retry-After": "5"})
                if slot.waiters >= (slot.spec.max_queue if slot.spec.max_queue is not None else 64):
                    self.metrics.rejections.labels(model, "queue_full").inc()
                    raise QueueFull(f"{slot.waiters} requests already wait for {model}; retry later",
                                    retry_after=5)
                slot.waiters += 1
                self.metrics.queued.labels(model).set(slot.waiters)
                waited = True
                try:
                    self._cond.wait(min(remaining, 1.0))
                finally:
                    slot.waiters -= 1
                    self.metrics.queued.labels(model).set(slot.waiters)

    def _lease(self, slot: Slot, started: float, waited: bool) -> WorkerLease:
        slot.in_flight += 1
        self._touch(slot)
        self.metrics.in_flight.labels(slot.spec.name).set(slot.in_flight)
        if waited and slot.last_actuation is not None:
            # This request waited for the cold start or wake that just finished.
            actuation = Actuation(slot.last_actuation.path, time.monotonic() - started)
        else:
            actuation = Actuation("warm", time.monotonic() - started)
            self.metrics.actuation.labels(slot.spec.name, "warm").observe(actuation.seconds)
            slot.last_actuation = actuation  # /v1/workers shows the latest request's actuation
        assert slot.url is not None
        return WorkerLease(slot.spec.name, slot.url, actuation, self._done)

    def _done(self, model: str) -> None:
        with self._cond:
            slot = self._slots[model]
            slot.in_flight -= 1
            self._touch(slot)
            self.metrics.in_flight.labels(model).set(slot.in_flight)
            self._cond.notify_all()

    @staticmethod
    def _touch(slot: Slot) -> None:
        slot.last_used = time.time()
        slot.last_used_mono = time.monotonic()

    # ---- sleep ---------------------------------------------------------------------

    def sleep(self, model: str, level: int = 1) -> WorkerStatus:
        with self._cond:
            slot = self._slot(model)
            deadline = time.monotonic() + 120
            while slot.state == "starting":  # let a start or wake in progress finish first
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise WorkerNotReady(f"worker for {model} is still starting; retry later",
                                         headers={"Retry-After": "5"})
            if slot.state in ("cold", "failed"):
                raise Conflict(f"worker for {model} is {slot.state}; nothing to put to sleep")
            if slot.state == "sleeping":
                return self._status(slot)
            url, attempt = slot.url, slot.attempt
        try:
            resp = self._http.post(f"{url}/sleep", params={"level": level})
        except httpx.HTTPError as exc:
            raise UpstreamError(f"could not reach the worker for {model} to put it to sleep: {exc}") from None
        if resp.status_code != 200:
            raise Conflict(f"worker for {model} refused to sleep: {resp.text[:300]}")
        with self._cond:
            if slot.attempt == attempt and slot.state == "ready":
                self._set_state(slot, "sleeping")
                self._after_sleep()
            status = self._status(slot)
        self.emit("ai.llm-d.fma.worker.sleeping", status.as_dict())
        return status
