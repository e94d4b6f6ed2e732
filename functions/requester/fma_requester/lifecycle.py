"""The actuation state machine: one per requester, one slot per configured model.

Both actuators are this machine; they differ only in the
:class:`~fma_requester.effects.Effects` it drives (processes, or the
Kubernetes API). The machine is plain Python: it decides, the effects act.

Phases and transitions
----------------------
Every phase change goes through :data:`TRANSITIONS`, the one table of what
may follow what, and each transition emits at most one lifecycle event::

    cold ──activate──> starting ──started──> ready ──sleep──> going_to_sleep ──slept──> sleeping
     ^                    │                   ^ │                 │ (refused: back to ready)   │
     │                    │ start_failed      │ └──stop──┐        │ sleep_failed / stop         │ wake
     │                    v                   │          v        v                             v
     └──stopped── stopping <──────────────────┴──── any running phase ──exited──        waking ──woke──> ready
                    │ cleaned_up                                                          │ wake_failed
                    v                                                                     v
                  failed ──activate (after the backoff)──> starting                     stopping

* A worker keeps what it holds (its memory, its place in ``max_loaded``)
  until the effect that frees it has *completed*: ``going_to_sleep`` and
  ``stopping`` still count. A model has at most one worker: nothing starts
  while its previous worker is still stopping.
* Every failure passes through ``stopping`` (so nothing is left behind) and
  ends in ``failed``, counted once, with a backoff before the next start.
* Every transitional phase has a deadline; :meth:`Lifecycle.tick` enforces
  it whatever the effect is doing, so every activation ends in ``ready`` or
  ``failed``, and every waiting request is answered.

Concurrency model
-----------------
All state is guarded by one condition variable. Decisions are made under it
on current state (a read that gates a mutation never happens on a stale
snapshot); effects run on worker threads (greenlets under gevent) through
an :class:`Executor`, never under the lock, and report back under it. Each
effect carries the slot's ``token`` at the time it was started; a result
arriving after the slot moved on (a release cancelled the start) is
discarded. Requests are :class:`Ticket` s: :meth:`Lifecycle.admit` is
non-blocking and :meth:`Lifecycle.ensure_ready` waits on it, so tests can
drive the machine step by step with a manual executor and a fake clock.
"""

from __future__ import annotations

import copy
import enum
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from fma_common.errors import ApiError, Conflict, ModelNotFound, QueueFull, UpstreamError, WorkerFailed, WorkerNotReady

from . import policy
from . import protocol as p
from .actuator import Actuator, WorkerLease
from .effects import EffectRefused, Effects, WorkerHandle
from .metrics import RequesterMetrics
from .protocol import Actuation, WorkerStatus
from .registry import ModelRegistry, ModelSpec

log = logging.getLogger("fma.requester.lifecycle")


class Phase(enum.StrEnum):
    COLD = "cold"
    STARTING = "starting"
    READY = "ready"
    GOING_TO_SLEEP = "going_to_sleep"
    SLEEPING = "sleeping"
    WAKING = "waking"
    STOPPING = "stopping"
    FAILED = "failed"


class Trigger(enum.StrEnum):
    ACTIVATE = "activate"  # a request needs a cold (or failed, past its backoff) model
    ADOPT = "adopt"  # a running worker was found for a cold model
    ADOPT_ASLEEP = "adopt_asleep"  # ... and it says it is asleep (GET /is_sleeping)
    ADOPT_STOPPING = "adopt_stopping"  # ... and it was released: its pod is on its way out
    FOUND_ASLEEP = "found_asleep"  # a ready worker refused a request because it is asleep
    RECLAIM = "reclaim"  # a request for a model whose stop the platform has not finished: keep that worker
    STARTED = "started"
    START_FAILED = "start_failed"
    SLEEP = "sleep"
    SLEPT = "slept"
    SLEEP_REFUSED = "sleep_refused"  # a requested sleep did not happen; the worker still serves
    SLEEP_FAILED = "sleep_failed"  # the worker's state is unknown (or it was being evicted): stop it
    WAKE = "wake"
    WOKE = "woke"
    WAKE_FAILED = "wake_failed"
    STOP = "stop"  # release, idle timeout, eviction, sleeper budget, shutdown
    STOPPED = "stopped"
    CLEANED_UP = "cleaned_up"  # the stop that follows a failure is done
    EXITED = "exited"  # the worker went away by itself
    GONE = "gone"  # removed behind our back (its Service deleted): nothing left to stop


@dataclass(frozen=True)
class Transition:
    to: Phase
    event: str | None = None  # the one lifecycle CloudEvent this transition emits, if any


_RUNNING = (Phase.READY, Phase.GOING_TO_SLEEP, Phase.SLEEPING)
TRANSITIONS: dict[tuple[Phase, Trigger], Transition] = {
    # started: a start has begun (a cold start's first sign, for dashboards); ready: it can serve.
    (Phase.COLD, Trigger.ACTIVATE): Transition(Phase.STARTING, p.WORKER_STARTED),
    (Phase.FAILED, Trigger.ACTIVATE): Transition(Phase.STARTING, p.WORKER_STARTED),
    (Phase.COLD, Trigger.ADOPT): Transition(Phase.READY, p.WORKER_READY_EVENT),
    (Phase.COLD, Trigger.ADOPT_ASLEEP): Transition(Phase.SLEEPING, p.WORKER_SLEEPING),
    (Phase.COLD, Trigger.ADOPT_STOPPING): Transition(Phase.STOPPING),
    (Phase.READY, Trigger.FOUND_ASLEEP): Transition(Phase.SLEEPING, p.WORKER_SLEEPING),
    (Phase.STOPPING, Trigger.RECLAIM): Transition(Phase.STARTING, p.WORKER_STARTED),
    (Phase.STARTING, Trigger.STARTED): Transition(Phase.READY, p.WORKER_READY_EVENT),
    (Phase.STARTING, Trigger.START_FAILED): Transition(Phase.STOPPING, p.WORKER_FAILED),
    (Phase.STARTING, Trigger.STOP): Transition(Phase.STOPPING),
    (Phase.READY, Trigger.SLEEP): Transition(Phase.GOING_TO_SLEEP),
    (Phase.GOING_TO_SLEEP, Trigger.SLEPT): Transition(Phase.SLEEPING, p.WORKER_SLEEPING),
    (Phase.GOING_TO_SLEEP, Trigger.SLEEP_REFUSED): Transition(Phase.READY),
    (Phase.GOING_TO_SLEEP, Trigger.SLEEP_FAILED): Transition(Phase.STOPPING),
    (Phase.SLEEPING, Trigger.WAKE): Transition(Phase.WAKING),
    (Phase.WAKING, Trigger.WOKE): Transition(Phase.READY, p.WORKER_READY_EVENT),
    (Phase.WAKING, Trigger.WAKE_FAILED): Transition(Phase.STOPPING, p.WORKER_FAILED),
    (Phase.WAKING, Trigger.STOP): Transition(Phase.STOPPING),
    **{(ph, Trigger.STOP): Transition(Phase.STOPPING) for ph in _RUNNING},
    **{(ph, Trigger.EXITED): Transition(Phase.STOPPING, p.WORKER_FAILED) for ph in (*_RUNNING, Phase.WAKING)},
    **{(ph, Trigger.GONE): Transition(Phase.COLD, p.WORKER_RELEASED) for ph in (*_RUNNING, Phase.WAKING)},
    (Phase.STOPPING, Trigger.STOPPED): Transition(Phase.COLD, p.WORKER_RELEASED),
    (Phase.STOPPING, Trigger.CLEANED_UP): Transition(Phase.FAILED),
    (Phase.FAILED, Trigger.STOP): Transition(Phase.COLD, p.WORKER_RELEASED),
}

TRANSITIONAL = frozenset({Phase.STARTING, Phase.GOING_TO_SLEEP, Phase.WAKING, Phase.STOPPING})
_AWAKE = frozenset({Phase.STARTING, Phase.READY, Phase.GOING_TO_SLEEP, Phase.WAKING})
_STATE_OF: dict[Phase, p.State] = {
    Phase.COLD: "cold", Phase.STARTING: "starting", Phase.READY: "ready", Phase.GOING_TO_SLEEP: "sleeping",
    Phase.SLEEPING: "sleeping", Phase.WAKING: "starting", Phase.FAILED: "failed",
}


def state_diagram() -> str:
    """:data:`TRANSITIONS` as a Mermaid state diagram (docs/design.md shows it; a test keeps them equal)."""
    lines = ["stateDiagram-v2", "    [*] --> cold"]
    for (source, trigger), t in TRANSITIONS.items():
        label = trigger.value + (f" / {t.event.rsplit('.', 2)[-2]}.{t.event.rsplit('.', 1)[-1]}" if t.event else "")
        lines.append(f"    {source.value} --> {t.to.value}: {label}")
    return "\n".join(lines) + "\n"


class IllegalTransition(RuntimeError):
    """A bug: the machine tried a transition the table does not have."""


# ---- collaborators ----------------------------------------------------------------------

class Executor(Protocol):
    def submit(self, name: str, job: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """Run ``job`` away from the caller, then ``done(result, exception)``."""


class ThreadExecutor:
    """One daemon thread per effect (a greenlet under gunicorn's gevent worker)."""

    def submit(self, name: str, job: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        def run() -> None:
            try:
                result, error = job(), None
            except BaseException as exc:  # every effect ends, whatever it raises
                result, error = None, exc
            done(result, error)

        threading.Thread(target=run, name=name, daemon=True).start()


EXITED_STOP_GRACE_S = 1.0  # a worker that went away is killed after this, not after the drain timeout
LOST_PROBE_S = 2.0  # a request waits this long at most to learn whether its worker is gone


@dataclass(frozen=True)
class LifecycleConfig:
    restart_backoff_s: float = 2.0
    restart_backoff_max_s: float = 60.0
    evict_sleep_level: int = 2  # 0: evicted workers are stopped, not put to sleep
    drain_timeout_s: float = 30.0  # in-flight requests before a sleep; a stop's grace
    control_timeout_s: float = 120.0  # one sleep call
    reaper_interval_s: float = 1.0

    @classmethod
    def from_settings(cls, settings: Any) -> LifecycleConfig:
        """From the requester's settings (anything with the same attribute names)."""
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


FoundState = Literal["ready", "sleeping", "releasing"]
EventSink = Callable[[str, dict[str, Any]], None]
"""Where lifecycle events go. Called under the machine's lock: it must not block."""


# ---- requests and operations --------------------------------------------------------------

@dataclass(eq=False)
class Ticket:
    """One request waiting for (or holding) a worker."""

    model: str
    created: float
    deadline: float
    joined: Literal["cold", "wake"] | None = None  # the activation it waits for
    attempt: int | None = None
    lease: WorkerLease | None = None
    error: ApiError | None = None
    # The slot it waits in: a models reload may replace the model's slot (removed, then added back), and this
    # request belongs to the one it joined.
    slot: Slot | None = None

    @property
    def done(self) -> bool:
        return self.lease is not None or self.error is not None

    def result(self) -> WorkerLease:
        if self.error is not None:
            raise self.error
        assert self.lease is not None
        return self.lease


@dataclass(eq=False)
class Op:
    """A sleep or release someone waits for."""

    done: bool = False
    error: ApiError | None = None

    def finish(self, error: ApiError | None = None) -> None:
        if not self.done:
            self.done, self.error = True, error


@dataclass
class SleepPlan:
    level: int
    manual: bool  # asked for (POST .../sleep) rather than an eviction
    drain_deadline: float
    issued: bool = False
    ops: list[Op] = field(default_factory=list)


@dataclass
class Activation:
    path: Literal["cold", "wake"]
    started: float
    attempt: int


@dataclass(eq=False)
class Slot:
    spec: ModelSpec
    phase: Phase = Phase.COLD
    handle: WorkerHandle | None = None
    holds: policy.Holds = "none"
    after_stop: Trigger = Trigger.STOPPED  # CLEANED_UP when the stop follows a failure
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    tickets: list[Ticket] = field(default_factory=list)
    wanted: bool = False  # a refused request still wants the model started (max_queue 0, queue_timeout 0)
    in_flight: int = 0
    last_used: float | None = None  # wall clock, for status
    last_used_mono: float = 0.0  # for idle timeouts and LRU
    last_actuation: Actuation | None = None
    last_start: Actuation | None = None  # the last cold start, with its timeline when the effects report one
    activation: Activation | None = None
    attempt: int = 0
    sleep: SleepPlan | None = None
    deadline: float | None = None  # of the current transitional phase
    token: int = 0  # the current effect; results carrying an older one are stale
    stop_ops: list[Op] = field(default_factory=list)
    overdue_logged: bool = False
    waiting_for: str = ""  # why a wanted model has not started yet (the budget)
    sleep_after_start: list[tuple[int, Op]] = field(default_factory=list)  # asked to sleep while starting
    failure: ApiError | None = None  # the typed error of the last failure, if it had one

    @property
    def name(self) -> str:
        return self.spec.name


class Lifecycle(Actuator):
    """The state machine, implementing :class:`Actuator` over one :class:`Effects`."""

    def __init__(self, registry: ModelRegistry, metrics: RequesterMetrics, effects: Effects, *,
                 emit: EventSink | None = None, config: LifecycleConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 executor: Executor | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self.effects = effects
        self.backend = effects.backend
        self.emit = emit or (lambda _type, _data: None)
        self.config = config or LifecycleConfig()
        self.clock = clock
        self.wall = wall
        self.executor = executor or ThreadExecutor()
        self._cond = threading.Condition()
        self._slots: dict[str, Slot] = {spec.name: Slot(spec, last_used_mono=clock()) for spec in registry}
        # Models removed from the models file whose workers are still stopping: they hold what they hold.
        self._retiring: dict[str, Slot] = {}
        self._closing = False
        self._closed = threading.Event()
        self._reaper: threading.Thread | None = None
        budget = registry.budget
        self._budget = policy.Budget(budget.max_loaded, budget.sleepers, budget.memory_mib)
        for name in self._slots:
            metrics.set_worker_state(name, "cold", Phase.COLD)
        effects.bind(self)

    # ==== status ===================================================================================

    def _slot(self, model: str) -> Slot:
        slot = self._slots.get(model)
        if slot is None:
            raise ModelNotFound(f"model {model!r} is not served here; available: {', '.join(self._slots)}",
                                param="model")
        return slot

    @staticmethod
    def _state(slot: Slot) -> p.State:
        if slot.phase == Phase.STOPPING:
            return "failed" if slot.after_stop == Trigger.CLEANED_UP else "cold"
        return _STATE_OF[slot.phase]

    def _status(self, slot: Slot) -> WorkerStatus:
        url = slot.handle.url if slot.handle is not None else None
        detail = None
        if slot.phase in (Phase.STARTING, Phase.WAKING) and slot.handle is not None:
            detail = slot.handle.progress  # e.g. Knative's last condition, or "waiting for a node: ..."
        elif slot.phase == Phase.STOPPING and slot.handle is not None and slot.handle.pending:
            detail = slot.handle.pending  # e.g. "released; Knative removes the pod within ..."
        elif slot.waiting_for and (slot.tickets or slot.wanted):
            detail = slot.waiting_for
        return WorkerStatus(model=slot.name, state=self._state(slot), phase=slot.phase.value, backend=self.backend,
                            url=url, last_used=slot.last_used, in_flight=slot.in_flight, queued=len(slot.tickets),
                            last_actuation=slot.last_actuation, last_start=slot.last_start, error=slot.error,
                            detail=detail,
                            idle_left_s=policy.idle_left(self._view(slot), self.clock()))

    def describe(self, model: str) -> WorkerStatus:
        with self._cond:
            return self._status(self._slot(model))

    def list(self) -> list[WorkerStatus]:
        with self._cond:
            return [self._status(s) for s in self._slots.values()]

    def _views(self) -> list[policy.WorkerView]:
        return [self._view(s) for s in (*self._slots.values(), *self._retiring.values())]

    @staticmethod
    def _view(s: Slot) -> policy.WorkerView:
        memory = s.spec.memory_mib or 0
        asleep = s.spec.sleep_memory_mib if s.spec.sleep_memory_mib is not None else memory
        measured = s.handle.asleep_mib if s.handle is not None and s.holds == "asleep" else None
        if memory and measured is not None:
            asleep = max(asleep, min(memory, math.ceil(measured)))  # what it really kept, never above awake
        return policy.WorkerView(s.name, s.phase.value, s.in_flight, len(s.tickets) + (1 if s.wanted else 0),
                                 s.last_used_mono, s.spec.idle_timeout or 0.0, s.holds, memory, asleep)

    # ==== transitions ==================================================================================

    def _fire(self, slot: Slot, trigger: Trigger, why: str = "") -> None:
        """Apply one transition from the table (under the lock)."""
        transition = TRANSITIONS.get((slot.phase, trigger))
        if transition is None:
            raise IllegalTransition(f"{slot.name}: no transition from {slot.phase} on {trigger}")
        before = slot.phase
        slot.phase = transition.to
        if transition.to in _AWAKE:
            slot.holds = "awake"
        elif transition.to == Phase.SLEEPING:
            slot.holds = "asleep"
        elif transition.to in (Phase.COLD, Phase.FAILED):
            slot.holds = "none"
            slot.handle = None
        slot.deadline = self._deadline_for(slot) if transition.to in TRANSITIONAL else None
        slot.overdue_logged = False
        if transition.to != Phase.GOING_TO_SLEEP:
            slot.sleep = None  # a sleep plan lives exactly as long as going_to_sleep
        log.debug("%s: %s -> %s on %s%s", slot.name, before, transition.to, trigger, f" ({why})" if why else "")
        self.metrics.set_worker_state(slot.name, self._state(slot), slot.phase)
        if transition.event:
            self.emit(transition.event, self._status(slot).as_dict())
        self._cond.notify_all()

    def _deadline_for(self, slot: Slot) -> float:
        now = self.clock()
        cfg = self.config
        if slot.phase in (Phase.STARTING, Phase.WAKING):
            return now + (slot.spec.start_timeout if slot.spec.start_timeout is not None else 600.0)
        if slot.phase == Phase.GOING_TO_SLEEP:
            return now + cfg.drain_timeout_s + cfg.control_timeout_s
        # stopping: the effect's own bound (a Knative release waits for the platform to remove the pod), plus a margin
        return now + self.effects.stop_timeout(slot.spec, self._stop_grace()) + 15.0

    def _stop_grace(self) -> float:
        return self.config.drain_timeout_s

    def _submit(self, slot: Slot, what: str, job: Callable[[], Any], on_result: Callable[[Any], None],
                on_error: Callable[[BaseException], None]) -> None:
        """Run an effect for ``slot`` off the lock; its outcome counts only if nothing newer was started."""
        slot.token += 1
        token = slot.token

        def done(result: Any, error: BaseException | None) -> None:
            with self._cond:
                if slot.token != token:
                    log.debug("%s: stale %s result ignored", slot.name, what)
                    return
                try:
                    if error is None:
                        on_result(result)
                    else:
                        on_error(error)
                except Exception:  # a bug in a handler must not leave the slot stuck
                    log.exception("%s: handling the %s outcome failed", slot.name, what)
                    self._fail_safe(slot, f"internal error after {what}")
                try:
                    self._settle()
                except Exception:
                    log.exception("reconciling after %s of %s failed", what, slot.name)

        try:
            self.executor.submit(f"fma-{what}-{slot.name}", job, done)
        except Exception as exc:  # e.g. no thread could be started
            on_error(exc)

    def _fail_safe(self, slot: Slot, reason: str) -> None:
        if slot.phase in (Phase.COLD, Phase.FAILED, Phase.STOPPING):
            return
        if slot.phase == Phase.STARTING:
            self._start_failed(slot, reason)
        elif slot.phase == Phase.WAKING:
            self._wake_failed(slot, reason)
        else:
            self._begin_stop(slot, reason, failure=reason)

    # ==== requests ===================================================================================

    def admit(self, model: str) -> Ticket:
        """Register a request for ``model`` without waiting (see :meth:`ensure_ready`)."""
        with self._cond:
            slot = self._slot(model)
            now = self.clock()
            if self._closing:
                raise WorkerNotReady("the requester is shutting down", headers={"Retry-After": "5"})
            ticket = Ticket(model, now, now + (slot.spec.queue_timeout if slot.spec.queue_timeout is not None
                                               else 120.0), slot=slot)
            if slot.phase == Phase.READY and not slot.tickets:
                ticket.lease = self._lease(slot, ticket)
                return ticket
            if slot.error is not None and slot.phase in (Phase.FAILED, Phase.STOPPING) and now < slot.retry_at:
                wait = slot.retry_at - now
                self.metrics.rejections.labels(model, "backoff").inc()
                raise self._failure_error(slot, f"{slot.error}; next retry in {wait:.0f} s",
                                          {"Retry-After": str(max(1, int(wait + 0.999)))})
            limit = slot.spec.max_queue if slot.spec.max_queue is not None else 64
            if len(slot.tickets) >= limit:
                slot.wanted = True  # still start it, so a retry finds it warming
                self._settle()
                self.metrics.rejections.labels(model, "queue_full").inc()
                raise QueueFull(f"{len(slot.tickets)} requests already wait for {model}; retry later",
                                retry_after=self._retry_after(slot))
            if slot.phase in (Phase.STARTING, Phase.WAKING) and slot.activation is not None:
                ticket.joined, ticket.attempt = slot.activation.path, slot.activation.attempt
            slot.tickets.append(ticket)
            self.metrics.queued.labels(model).set(len(slot.tickets))
            self._settle()
            return ticket

    def ensure_ready(self, model: str) -> WorkerLease:
        lease = self.wait_for(self.admit(model))
        assert lease is not None  # no timeout: a lease or an exception
        return lease

    def wait_for(self, ticket: Ticket, timeout: float | None = None) -> WorkerLease | None:  # type: ignore[override]
        """Block until the ticket is answered or its deadline passes (or ``timeout``: then None)."""
        with self._cond:
            until = None if timeout is None else self.clock() + timeout
            while not ticket.done:
                now = self.clock()
                if now >= ticket.deadline:
                    self._expire(ticket)
                    break
                if until is not None and now >= until:
                    return None
                self._cond.wait(min(ticket.deadline, until if until is not None else ticket.deadline) - now)
            return ticket.result()

    def abandon(self, ticket: Ticket) -> None:  # type: ignore[override]
        """The client left while it waited: its place in the queue goes, and a lease it got is given back."""
        with self._cond:
            slot = ticket.slot
            assert slot is not None
            if ticket in slot.tickets:
                slot.tickets.remove(ticket)
                self.metrics.queued.labels(slot.name).set(len(slot.tickets))
            if not ticket.done:
                ticket.error = WorkerNotReady("the client went away")
            lease = ticket.lease
            self._settle()
        if lease is not None:
            lease.done()

    def _expire(self, ticket: Ticket) -> None:
        slot = ticket.slot
        assert slot is not None
        if ticket in slot.tickets:
            slot.tickets.remove(ticket)
            self.metrics.queued.labels(slot.name).set(len(slot.tickets))
        if ticket.done:
            return
        self.metrics.rejections.labels(slot.name, "deadline").inc()
        waited = self.clock() - ticket.created
        ticket.error = WorkerNotReady(f"worker for {slot.name} not ready after {waited:.0f} s "
                                      f"({self._waiting_on(slot)}); retry later",
                                      headers={"Retry-After": str(self._retry_after(slot))})

    def _waiting_on(self, slot: Slot) -> str:
        text = f"phase {slot.phase}"
        if slot.handle is not None and slot.phase in (Phase.STARTING, Phase.WAKING):
            text += f"; last seen: {slot.handle.progress}"
        elif slot.waiting_for and slot.phase in (Phase.COLD, Phase.SLEEPING, Phase.FAILED):
            text += f"; {slot.waiting_for}"
        return text

    @staticmethod
    def _retry_after(slot: Slot) -> int:
        """About how long until a retry can succeed: the last cold start's duration, within 1-60 s."""
        last = slot.last_actuation
        guess = last.seconds if last is not None and last.path != "warm" else 5.0
        return int(min(60.0, max(1.0, guess + 0.999)))

    def _fail_tickets(self, slot: Slot, error: ApiError, only_attempt: int | None = None) -> None:
        keep = []
        for t in slot.tickets:
            if only_attempt is None or t.attempt == only_attempt:
                t.error = error
            else:
                keep.append(t)
        slot.tickets = keep
        self.metrics.queued.labels(slot.name).set(len(keep))

    def _lease(self, slot: Slot, ticket: Ticket) -> WorkerLease:
        now = self.clock()
        slot.in_flight += 1
        self._touch(slot)
        self.metrics.in_flight.labels(slot.name).set(slot.in_flight)
        self.metrics.queue_wait.labels(slot.name).observe(now - ticket.created)
        if ticket.joined is not None:
            actuation = Actuation(path=ticket.joined, seconds=now - ticket.created)
        else:
            actuation = Actuation(path="warm", seconds=now - ticket.created)
            self.metrics.actuation.labels(slot.name, "warm").observe(actuation.seconds)
            slot.last_actuation = actuation  # /v1/workers shows the latest request's actuation
        assert slot.handle is not None and slot.handle.url is not None
        # The lease gives back to the slot it came from, which a models reload may have retired or replaced since.
        return WorkerLease(slot.name, slot.handle.url, actuation, lambda lease: self._lease_done(slot, lease),
                           handle=slot.handle, epoch=slot.token)

    def _lease_done(self, slot: Slot, lease: WorkerLease) -> None:
        with self._cond:
            slot.in_flight -= 1
            self._touch(slot)
            self.metrics.in_flight.labels(slot.name).set(slot.in_flight)
            self._settle()

    def _touch(self, slot: Slot) -> None:
        slot.last_used = self.wall()
        slot.last_used_mono = self.clock()

    # ==== reconciling ===============================================================================

    def _settle(self) -> None:
        """After any change: serve, drain, trim and activate until nothing more follows."""
        for _ in range(4 * len(self._slots) + 4):
            if not self._reconcile_once():
                break
        self._cond.notify_all()

    def _reconcile_once(self) -> bool:
        changed = False
        now = self.clock()
        for name, slot in list(self._retiring.items()):
            if slot.phase in (Phase.COLD, Phase.FAILED):
                del self._retiring[name]  # its worker is gone: nothing of it is held any more
        for slot in self._slots.values():
            if slot.phase == Phase.READY:
                slot.wanted = False
            if slot.phase == Phase.READY and slot.tickets:
                tickets, slot.tickets = slot.tickets, []
                for t in tickets:
                    t.lease = self._lease(slot, t)
                self.metrics.queued.labels(slot.name).set(0)
                changed = True
            if slot.phase == Phase.READY and slot.sleep_after_start:
                (level, first), *rest = slot.sleep_after_start
                slot.sleep_after_start = []
                self._begin_sleep(slot, level, manual=True, op=first)
                assert slot.sleep is not None
                slot.sleep.ops.extend(op for _, op in rest)
                changed = True
            if slot.phase == Phase.GOING_TO_SLEEP and slot.sleep and not slot.sleep.issued and slot.in_flight == 0:
                self._issue_sleep(slot)
                changed = True
        if self._closing:
            return changed
        for name in policy.excess_sleepers(self._views(), self._budget.sleepers):
            self._begin_stop(self._slots[name], "over the sleeper budget")
            changed = True
        candidates = sorted(
            (s for s in self._slots.values() if (s.tickets or s.wanted) and (
                s.phase in (Phase.COLD, Phase.SLEEPING) or (s.phase == Phase.FAILED and now >= s.retry_at)
                or self._reclaimable(s, now))),
            key=lambda s: min((t.created for t in s.tickets), default=now))
        reserved: list[policy.WorkerView] = []
        for slot in candidates:
            views = self._views()
            room = policy.plan_room(views, self._budget, slot.name, sleep_level=self.config.evict_sleep_level,
                                    reserved=reserved)
            if room.go:
                slot.waiting_for = ""
                self._activate(slot)
                changed = True
                continue
            slot.waiting_for = room.reason
            for victim, action in room.actions:
                changed = True
                target = self._slots[victim]
                log.info("evicting %s (least recently used, idle) to make room for %s: %s", victim, slot.name,
                         "to sleep" if action == "sleep" else "stopping it")
                self.metrics.evictions.labels(victim).inc()
                if action == "sleep" and target.phase == Phase.READY:
                    self._begin_sleep(target, self.config.evict_sleep_level, manual=False)
                else:
                    self._begin_stop(target, f"evicted for {slot.name}")
            reserved.append(next(v for v in views if v.model == slot.name))
        return changed

    def _reclaimable(self, slot: Slot, now: float) -> bool:
        """A stop the platform is still carrying out may be taken back by a request (Knative: a released worker's
        pod stays until its autoscaler removes it; a start re-pins it) - past the backoff, after a failure."""
        return slot.phase == Phase.STOPPING and self.effects.reclaimable and slot.handle is not None \
            and self.effects.can_reclaim(slot.handle) and (slot.after_stop == Trigger.STOPPED or now >= slot.retry_at)

    def _activate(self, slot: Slot) -> None:
        now = self.clock()
        path: Literal["cold", "wake"] = "wake" if slot.phase == Phase.SLEEPING else "cold"
        slot.attempt += 1
        started = min((t.created for t in slot.tickets), default=now)
        slot.activation = Activation(path, started, slot.attempt)
        slot.wanted = False
        for t in slot.tickets:
            t.joined, t.attempt = path, slot.attempt
        spec = slot.spec
        if path == "wake":
            handle = slot.handle
            assert handle is not None
            self._fire(slot, Trigger.WAKE)
            timeout = (slot.deadline or now) - now
            self._submit(slot, "wake", lambda: self.effects.wake(spec, handle, timeout),
                         lambda _r: self._woke(slot), lambda exc: self._wake_failed(slot, _reason(exc)))
            return
        trigger = Trigger.ACTIVATE
        if slot.phase == Phase.STOPPING:
            # The stop in progress gives up (its outcome is stale from here on); the start brings the same worker
            # back if it is still there. Whoever waited for the release has had it.
            assert slot.handle is not None
            slot.handle.abandon_stop()
            slot.after_stop = Trigger.STOPPED
            for op in slot.stop_ops:
                op.finish()
            slot.stop_ops.clear()
            trigger = Trigger.RECLAIM
            log.info("%s: a request arrived while its worker was being released; keeping it", spec.name)
        handle = WorkerHandle(spec.name)
        slot.handle = handle
        slot.error = None
        self._fire(slot, trigger)
        timeout = (slot.deadline or now) - now
        log.info("%s: cold start begins (attempt %d)", spec.name, slot.attempt)

        def start() -> str:
            try:
                return self.effects.start(spec, handle, timeout)
            except BaseException as exc:
                reason = _reason(exc)
                tail = _safe(lambda: self.effects.read_log(spec, handle, 1500)).strip()
                raise _StartError(f"{reason}; log tail: {tail}" if tail and tail not in reason else reason) from exc

        self._submit(slot, "start", start, lambda url: self._started(slot, handle, url),
                     lambda exc: self._start_failed(slot, _reason(exc), cause=exc.__cause__ or exc))

    def _started(self, slot: Slot, handle: WorkerHandle, url: str) -> None:
        handle.url = url
        activation = slot.activation
        secs = self.clock() - (activation.started if activation else self.clock())
        slot.failures = 0
        slot.error = None
        slot.failure = None
        slot.last_actuation = slot.last_start = Actuation(path="cold", seconds=secs, steps=dict(handle.steps) or None)
        self.metrics.last_time_to_ready.labels(slot.name, "cold").set(secs)
        self._touch(slot)
        self._fire(slot, Trigger.STARTED)
        self.metrics.actuation.labels(slot.name, "cold").observe(secs)
        steps = "".join(f", {k} {v:.3f}" for k, v in handle.steps.items() if k != "total")
        log.info("worker for %s ready in %.3f s (cold start%s)", slot.name, secs, steps)

    def _start_failed(self, slot: Slot, reason: str, cause: BaseException | None = None) -> None:
        self._failed(slot, Trigger.START_FAILED, f"worker for {slot.name} failed to start: {reason}", cause)

    def _wake_failed(self, slot: Slot, reason: str) -> None:
        self._failed(slot, Trigger.WAKE_FAILED, f"worker for {slot.name} failed to wake: {reason}")

    def _failure_error(self, slot: Slot, message: str, headers: dict[str, str] | None = None) -> ApiError:
        """The error waiters and later requests get for the slot's last failure.

        A typed failure (RBAC, a name taken, the platform refusing the worker)
        keeps its class, status and code, so a permanent one stays permanent
        (a CloudEvent gets ``completion.failed``, not a retry); anything else
        is a 503 ``worker_failed``.
        """
        proto = slot.failure
        if proto is None:
            return WorkerFailed(message, headers=headers)
        err = copy.copy(proto)
        err.message, err.args = message, (message,)
        err.headers = {**proto.headers, **(headers or {})}
        return err

    def _failed(self, slot: Slot, trigger: Trigger, message: str, cause: BaseException | None = None) -> None:
        """A start or wake failed: answer its waiters now, then clean up and back off."""
        slot.failure = cause if isinstance(cause, ApiError) else None
        slot.failures += 1
        delay = policy.backoff_delay(slot.failures, self.config.restart_backoff_s, self.config.restart_backoff_max_s)
        slot.retry_at = self.clock() + delay
        slot.error = message[:4000]
        attempt = slot.activation.attempt if slot.activation else None
        self.metrics.rejections.labels(slot.name, "start_failed").inc(
            sum(1 for t in slot.tickets if t.attempt == attempt))
        self._fail_tickets(slot, self._failure_error(slot, slot.error), only_attempt=attempt)
        self._cancel_sleep_ops(slot, self._failure_error(slot, slot.error))
        slot.after_stop = Trigger.CLEANED_UP
        if slot.handle is not None:
            slot.handle.cancel()
        log.warning("%s (failure %d; next start in %.0f s)", message[:300], slot.failures, delay)
        self._fire(slot, trigger, message)
        self._submit_stop(slot)

    def _woke(self, slot: Slot) -> None:
        activation = slot.activation
        secs = self.clock() - (activation.started if activation else self.clock())
        slot.last_actuation = Actuation(path="wake", seconds=secs)
        self.metrics.last_time_to_ready.labels(slot.name, "wake").set(secs)
        self._touch(slot)
        self._fire(slot, Trigger.WOKE)
        self.metrics.actuation.labels(slot.name, "wake").observe(secs)
        log.info("worker for %s awake in %.3f s", slot.name, secs)

    # ==== sleep ===============================================================================

    def _begin_sleep(self, slot: Slot, level: int, *, manual: bool, op: Op | None = None) -> None:
        slot.sleep = SleepPlan(level, manual, self.clock() + self.config.drain_timeout_s,
                               ops=[op] if op is not None else [])
        self._fire(slot, Trigger.SLEEP)

    def _issue_sleep(self, slot: Slot) -> None:
        plan, handle, spec = slot.sleep, slot.handle, slot.spec
        assert plan is not None and handle is not None
        plan.issued = True
        timeout = self.config.control_timeout_s
        self._submit(slot, "sleep", lambda: self.effects.sleep(spec, handle, plan.level, timeout),
                     lambda _r: self._slept(slot, plan), lambda exc: self._sleep_failed(slot, plan, exc))

    def _slept(self, slot: Slot, plan: SleepPlan) -> None:
        self._fire(slot, Trigger.SLEPT)
        held = slot.handle.asleep_mib if slot.handle is not None else None
        declared = slot.spec.sleep_memory_mib
        log.info("worker for %s asleep (level %d%s%s)", slot.name, plan.level, "" if plan.manual else ", evicted",
                 f", still holding {held:.0f} MiB" if held is not None else "")
        if held is not None and slot.spec.memory_mib and declared is not None and held > declared:
            log.warning("%s holds %.0f MiB asleep, more than its sleep_memory_mib %d: the budget counts %.0f",
                        slot.name, held, declared, min(held, slot.spec.memory_mib))
        for op in plan.ops:
            op.finish()

    def _sleep_failed(self, slot: Slot, plan: SleepPlan, exc: BaseException) -> None:
        if plan.manual and isinstance(exc, EffectRefused):
            self._fire(slot, Trigger.SLEEP_REFUSED, str(exc))
            error: ApiError = (Conflict(f"worker for {slot.name} refused to sleep: {exc}")
                               if exc.status is not None else
                               UpstreamError(f"could not reach the worker for {slot.name} to put it to sleep: {exc}"))
        else:
            log.warning("could not put %s to sleep (%s); stopping it instead", slot.name, _reason(exc))
            self._fire(slot, Trigger.SLEEP_FAILED, _reason(exc))
            self._submit_stop(slot)
            error = UpstreamError(f"worker for {slot.name} did not go to sleep ({_reason(exc)}); it was stopped")
        for op in plan.ops:
            op.finish(error)

    def _cancel_sleep_ops(self, slot: Slot, error: ApiError) -> None:
        """Answer everyone waiting for this slot to go to sleep: it will not."""
        for _, op in slot.sleep_after_start:
            op.finish(error)
        slot.sleep_after_start = []
        if slot.sleep is not None:
            for op in slot.sleep.ops:
                op.finish(error)

    # ==== stop ==================================================================================

    def _begin_stop(self, slot: Slot, why: str, *, failure: str | None = None) -> None:
        """Scale ``slot`` to zero: cancel what is in progress, then stop its worker."""
        if slot.phase == Phase.COLD or slot.phase == Phase.STOPPING:
            return
        if slot.phase == Phase.FAILED:
            slot.error, slot.failures, slot.retry_at, slot.failure = None, 0, 0.0, None
            self._fire(slot, Trigger.STOP, why)
            return
        if slot.phase in (Phase.STARTING, Phase.WAKING):
            attempt = slot.activation.attempt if slot.activation else None
            self._fail_tickets(slot, WorkerNotReady(f"the worker for {slot.name} was stopped ({why}) before it was "
                                                    f"ready; retry", headers={"Retry-After": "1"}),
                               only_attempt=attempt)
        self._cancel_sleep_ops(slot, Conflict(f"worker for {slot.name} was stopped ({why}) before it went to sleep"))
        if slot.handle is not None:
            slot.handle.cancel()
        slot.after_stop = Trigger.CLEANED_UP if failure else Trigger.STOPPED
        if failure:
            slot.error = failure
        log.info("stopping worker for %s (%s)", slot.name, why)
        self._fire(slot, Trigger.STOP, why)
        self._submit_stop(slot)

    def _submit_stop(self, slot: Slot, grace: float | None = None) -> None:
        handle, spec = slot.handle, slot.spec
        grace = self._stop_grace() if grace is None else grace
        if handle is None:
            self._stopped(slot)
            return
        self._submit(slot, "stop", lambda: self.effects.stop(spec, handle, grace), lambda _r: self._stopped(slot),
                     lambda exc: self._stop_error(slot, exc))

    def _stop_error(self, slot: Slot, exc: BaseException) -> None:
        log.error("stopping the worker for %s raised (%s); treating it as stopped", slot.name, _reason(exc))
        self._stopped(slot)

    def _stopped(self, slot: Slot) -> None:
        self._fire(slot, slot.after_stop)
        slot.after_stop = Trigger.STOPPED
        for op in slot.stop_ops:
            op.finish()
        slot.stop_ops.clear()

    # ==== the operations of the Actuator interface ===============================================

    def request_release(self, model: str) -> Op:
        """Begin scaling ``model`` to zero; the op is done once its worker is gone (non-blocking)."""
        with self._cond:
            slot = self._slot(model)
            op = Op()
            if slot.phase in (Phase.COLD, Phase.FAILED) or \
                    (slot.phase == Phase.STOPPING and slot.handle is not None and slot.handle.pending):
                self._begin_stop(slot, "released")
                op.finish()  # cold, or a release the platform already has: nothing more to wait for here
            else:
                slot.stop_ops.append(op)
                self._begin_stop(slot, "released")
            self._settle()
            return op

    def release(self, model: str) -> WorkerStatus:
        op = self.request_release(model)
        with self._cond:
            self._wait_op(op, self._stop_grace() + 20.0)
            return self._status(self._slots[model])

    def request_sleep(self, model: str, level: int) -> Op:
        """Begin putting ``model`` to sleep (after a start or wake in progress); non-blocking."""
        with self._cond:
            slot = self._slot(model)
            op = Op()
            if slot.phase in (Phase.COLD, Phase.FAILED, Phase.STOPPING):
                raise Conflict(f"worker for {model} is {self._state(slot)}; nothing to put to sleep")
            if slot.phase == Phase.SLEEPING:
                op.finish()
            elif slot.phase in (Phase.STARTING, Phase.WAKING):
                slot.sleep_after_start.append((level, op))
            elif slot.phase == Phase.GOING_TO_SLEEP and slot.sleep is not None:
                slot.sleep.ops.append(op)
            else:
                self._begin_sleep(slot, level, manual=True, op=op)
            self._settle()
            return op

    def sleep(self, model: str, level: int = 1) -> WorkerStatus:
        op = self.request_sleep(model, level)
        with self._cond:
            slot = self._slots[model]
            start = slot.spec.start_timeout if slot.spec.start_timeout is not None else 600.0
            self._wait_op(op, start + self.config.drain_timeout_s + self.config.control_timeout_s + 5.0)
            if not op.done:
                raise WorkerNotReady(f"worker for {model} is not asleep yet ({self._waiting_on(slot)}); retry later",
                                     headers={"Retry-After": "5"})
            if op.error is not None:
                raise op.error
            return self._status(slot)

    def _wait_op(self, op: Op, timeout: float) -> None:
        deadline = self.clock() + timeout
        while not op.done:
            remaining = deadline - self.clock()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def warm(self, model: str) -> WorkerStatus:
        self.ensure_ready(model).done()
        return self.describe(model)

    # ==== a new models file ==========================================================================

    def reload(self, registry: ModelRegistry) -> list[str]:
        """Serve what a changed models file lists, without a restart; returns what changed.

        A new model is cold; a changed one keeps its worker, and its next
        start uses the new settings; a removed one stops serving at once (its
        waiters get 404) and its worker is stopped - it still counts against
        the budget until it has stopped, and a model added back meanwhile gets
        the same slot, so there is never a second worker for one name.
        """
        with self._cond:
            wanted = {spec.name: spec for spec in registry}
            changes: list[str] = []
            for name, slot in list(self._slots.items()):
                if name in wanted:
                    if wanted[name] != slot.spec:
                        slot.spec = wanted[name]
                        changes.append(f"changed {name}")
                    continue
                del self._slots[name]
                self._retiring[name] = slot
                self._fail_tickets(slot, ModelNotFound(f"model {name!r} is no longer served here", param="model"))
                slot.wanted = False
                self._begin_stop(slot, "removed from the models file")
                changes.append(f"removed {name}")
            for name, spec in wanted.items():
                if name in self._slots:
                    continue
                slot = self._retiring.pop(name, None) or Slot(spec, last_used_mono=self.clock())
                slot.spec = spec
                self._slots[name] = slot
                self.metrics.set_worker_state(name, self._state(slot), slot.phase)
                changes.append(f"added {name}")
            self.registry = registry
            budget = registry.budget
            self._budget = policy.Budget(budget.max_loaded, budget.sleepers, budget.memory_mib)
            self.effects.reload(registry)
            self._settle()
        if changes:
            log.info("models file reloaded: %s", "; ".join(changes))
        return changes

    # ==== what the world tells us (EffectsListener) ==================================================

    def worker_exited(self, handle: WorkerHandle, reason: str) -> None:
        with self._cond:
            slot = self._slots.get(handle.model)
            if slot is None or slot.handle is not handle or slot.phase in (Phase.STOPPING, Phase.COLD, Phase.FAILED):
                return  # an exit we asked for, or of an older incarnation
            log.warning("worker for %s went away: %s", slot.name, reason[:300])
            if slot.phase == Phase.STARTING:
                self._start_failed(slot, reason)
            elif slot.phase == Phase.WAKING:
                self._wake_failed(slot, reason)
            else:
                self.metrics.crashes.labels(slot.name).inc()
                slot.failures += 1
                slot.retry_at = self.clock()  # a crash of a running worker restarts on demand at once
                slot.error = f"worker exited: {reason}"[:4000]
                slot.after_stop = Trigger.CLEANED_UP
                self._cancel_sleep_ops(slot, UpstreamError(f"worker for {slot.name} went away: {reason[:300]}"))
                handle.cancel()
                self._fire(slot, Trigger.EXITED, reason)
                # Whatever is left of it (a process group, a scaled Service): a worker that exited or stopped
                # answering has nothing to drain, so it gets a second, not the drain timeout (a SIGSTOPped
                # one ignores SIGTERM and held its memory for the whole 30 s).
                self._submit_stop(slot, grace=min(EXITED_STOP_GRACE_S, self._stop_grace()))
            self._settle()

    def worker_gone(self, handle: WorkerHandle | None, model: str) -> None:
        with self._cond:
            slot = self._slots.get(model)
            if slot is None or (handle is not None and slot.handle is not handle):
                return
            if (slot.phase, Trigger.GONE) not in TRANSITIONS:
                return  # starting: its own effect sees the removal; stopping: expected
            log.info("worker for %s was removed behind our back; it is cold", model)
            self._cancel_sleep_ops(slot, UpstreamError(f"worker for {model} was removed"))
            slot.token += 1  # whatever effect is in flight no longer matters
            self._fire(slot, Trigger.GONE)
            self._settle()

    def worker_found(self, model: str, handle: WorkerHandle, state: FoundState = "ready") -> None:
        with self._cond:
            slot = self._slots.get(model)
            if slot is None or slot.phase != Phase.COLD or self._closing or not handle.url:
                return
            slot.handle = handle
            self._touch(slot)
            if state == "releasing":
                # Released before this requester started: its worker still holds its memory until it is gone.
                self._fire(slot, Trigger.ADOPT_STOPPING)
                slot.holds = "asleep" if handle.asleep_mib is not None else "awake"
                log.info("found the released worker for %s still running; waiting for it to go", model)
                self._submit_stop(slot)
            else:
                self._fire(slot, Trigger.ADOPT_ASLEEP if state == "sleeping" else Trigger.ADOPT)
                log.info("adopted the %s worker for %s at %s", "sleeping" if state == "sleeping" else "running",
                         model, handle.url)
            self._settle()

    def worker_asleep(self, lease: WorkerLease) -> None:
        """A ready worker refused a request because it is asleep (someone else put it to sleep, or it was
        adopted before it said so): it is sleeping, and the next request wakes it."""
        with self._cond:
            slot = self._slots.get(lease.model)
            if slot is None or slot.handle is not lease.handle or slot.phase != Phase.READY \
                    or lease.epoch != slot.token:
                return  # another request's report already had it woken (the slot moved on since this lease)
            log.warning("the worker for %s answered that it is asleep; waking it for the next request", slot.name)
            self._fire(slot, Trigger.FOUND_ASLEEP)
            self._settle()

    def stop_pending(self, handle: WorkerHandle, detail: str) -> None:
        """The stop was handed to the platform, which finishes it on its own time: a release has happened
        (its callers are answered now); the worker holds its memory until the stop completes."""
        with self._cond:
            slot = self._slots.get(handle.model) or self._retiring.get(handle.model)
            if slot is None or slot.handle is not handle or slot.phase != Phase.STOPPING:
                return
            handle.pending = detail
            for op in slot.stop_ops:
                op.finish()
            slot.stop_ops.clear()
            self._cond.notify_all()

    def worker_lost(self, lease: WorkerLease) -> bool:
        """The request's connection to its worker failed before any answer. True when that worker is gone: the
        probe (the process's exit, then its ``/health``) says so, or the model already has another worker."""
        with self._cond:
            slot = self._slots.get(lease.model) or self._retiring.get(lease.model)
            if slot is None or slot.handle is not lease.handle:
                return True  # replaced (or stopped) since: the worker this request went to is no more
            if slot.phase != Phase.READY:
                return slot.phase in (Phase.STOPPING, Phase.COLD, Phase.FAILED)
            handle, spec = slot.handle, slot.spec
        alive = _safe(lambda: self.effects.probe(spec, handle, LOST_PROBE_S), default=False)
        if not alive:
            self.worker_exited(handle, "the worker stopped answering (a request's connection failed)")
        return not alive

    def worker_unreachable(self, lease: WorkerLease) -> None:
        """A request could not reach its worker: probe it (off the request's path); gone means exited."""
        with self._cond:
            slot = self._slots.get(lease.model)
            if slot is None or slot.handle is not lease.handle or slot.phase != Phase.READY:
                return
            handle, spec = slot.handle, slot.spec

        def gone(alive: Any, error: BaseException | None) -> None:
            if error is None and not alive:
                self.worker_exited(handle, "the worker stopped answering")

        self.executor.submit(f"fma-probe-{spec.name}", lambda: self.effects.probe(spec, handle, 5.0), gone)

    # ==== background ==================================================================================

    def tick(self) -> None:
        """Enforce deadlines and idle timeouts (the reaper calls this; tests call it with a fake clock)."""
        with self._cond:
            now = self.clock()
            for slot in self._slots.values():
                for t in [t for t in slot.tickets if now >= t.deadline]:
                    self._expire(t)
                self._enforce_deadline(slot, now)
            if not self._closing:
                for name in policy.idle_expired(self._views(), now):
                    slot = self._slots[name]
                    log.info("scaling %s to zero after %.0f s idle", name, slot.spec.idle_timeout or 0)
                    self.metrics.idle_stops.labels(name).inc()
                    self._begin_stop(slot, "idle")
            self._settle()

    def _enforce_deadline(self, slot: Slot, now: float) -> None:
        if slot.phase == Phase.GOING_TO_SLEEP and slot.sleep is not None and not slot.sleep.issued \
                and now >= slot.sleep.drain_deadline:
            plan = slot.sleep
            error = Conflict(f"{slot.in_flight} request(s) still in flight on {slot.name} after "
                             f"{self.config.drain_timeout_s:.0f} s; sleep cancelled")
            if plan.manual:
                self._fire(slot, Trigger.SLEEP_REFUSED, "drain deadline")
            else:
                self._fire(slot, Trigger.SLEEP_FAILED, "drain deadline")
                self._submit_stop(slot)
            for op in plan.ops:
                op.finish(error)
            return
        if slot.deadline is None or now < slot.deadline:
            return
        if slot.phase == Phase.STARTING:
            progress = slot.handle.progress if slot.handle else "-"
            self._start_failed(slot, f"not ready after {slot.spec.start_timeout or 600:.0f} s (last seen: {progress})")
        elif slot.phase == Phase.WAKING:
            self._wake_failed(slot, f"not awake after {slot.spec.start_timeout or 600:.0f} s")
        elif slot.phase == Phase.GOING_TO_SLEEP and slot.sleep is not None:
            self._sleep_failed(slot, slot.sleep, TimeoutError(f"no answer to sleep within "
                                                              f"{self.config.control_timeout_s:.0f} s"))
        elif slot.phase == Phase.STOPPING and not slot.overdue_logged:
            slot.overdue_logged = True
            log.error("worker for %s is still stopping after its deadline; the effect is overdue", slot.name)

    def start(self) -> None:
        self.effects.open(self.registry)
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap_loop, name="fma-reaper", daemon=True)
            self._reaper.start()
        for spec in self.registry:
            if spec.preload:
                threading.Thread(target=self._preload, args=(spec.name,), name=f"fma-preload-{spec.name}",
                                 daemon=True).start()

    def _preload(self, model: str) -> None:
        try:
            self.warm(model)
        except ApiError as exc:  # reported in the slot's status and log
            log.warning("preload of %s failed: %s", model, exc.message)

    def _reap_loop(self) -> None:
        while not self._closed.wait(self.config.reaper_interval_s):
            try:
                self.tick()
                self.effects.housekeeping()
            except Exception:  # keep reaping; a bug here must not stop idle scale-to-zero
                log.exception("reaper tick failed")

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closing = True
            self._closed.set()
            for slot in self._slots.values():
                self._fail_tickets(slot, WorkerNotReady("the requester is shutting down",
                                                        headers={"Retry-After": "5"}))
                slot.wanted = False
                if self.effects.stop_on_shutdown and slot.phase not in (Phase.COLD, Phase.FAILED):
                    self._begin_stop(slot, "shutting down")
            self._settle()
            deadline = self.clock() + timeout + 15.0
            # A stop already handed to the platform (a Knative release waiting for its pod to go) is the platform's
            # to finish: the requester does not wait for it.
            while any(s.phase == Phase.STOPPING and not (s.handle is not None and s.handle.pending)
                      for s in self._slots.values()):
                remaining = deadline - self.clock()
                if remaining <= 0:
                    log.error("workers still stopping at the shutdown deadline: %s",
                              ", ".join(s.name for s in self._slots.values() if s.phase == Phase.STOPPING))
                    break
                self._cond.wait(remaining)
            stopped = sum(1 for s in self._slots.values() if s.phase == Phase.COLD)
        self.effects.close()
        log.info("actuator closed (%d model(s) cold)", stopped)

    # ==== for tests and invariants ================================================================

    def slot_snapshot(self) -> dict[str, dict[str, Any]]:
        with self._cond:
            return {name: {"phase": s.phase, "holds": s.holds, "tickets": len(s.tickets), "in_flight": s.in_flight,
                           "deadline": s.deadline, "handle": s.handle} for name, s in self._slots.items()}


class _StartError(RuntimeError):
    pass


def _reason(exc: BaseException) -> str:
    """One line saying what went wrong, for statuses, waiters and logs."""
    if isinstance(exc, ApiError):
        return exc.message
    text = str(exc).split("\n", 1)[0].strip()
    if text and isinstance(exc, (_StartError, EffectRefused, RuntimeError, TimeoutError)):
        return text  # these carry a message meant for people
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _safe(fn: Callable[[], Any], default: Any = "") -> Any:
    try:
        return fn()
    except Exception:
        return default
