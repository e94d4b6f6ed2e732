"""A deterministic harness for the actuation state machine: a fake clock, a
manual executor and recording effects that model worker processes.

Effects *begin* when the machine submits them (a start spawns its "process"
at once) and *complete* when the test delivers them (a stop removes the
process only then), so a test decides the order of every outcome and can
check, at each step, what exists in the world - without threads or sleeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fma_requester.effects import EffectRefused, Effects, WorkerHandle
from fma_requester.lifecycle import Lifecycle, LifecycleConfig
from fma_requester.metrics import RequesterMetrics
from fma_requester.registry import ModelRegistry, ModelSpec


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Job:
    name: str
    result: Any
    error: BaseException | None
    done: Callable[[Any, BaseException | None], None]
    submitted: float
    finalizers: list[Callable[[], None]] = field(default_factory=list)
    delivered: bool = False

    @property
    def kind(self) -> str:
        return self.name.split("-")[1]  # fma-<kind>-<model>

    @property
    def model(self) -> str:
        return self.name.split("-", 2)[2]


class ManualExecutor:
    """Runs each effect when it is submitted; delivers its outcome when told to."""

    def __init__(self, effects: RecordingEffects, clock: FakeClock) -> None:
        self.effects = effects
        self.clock = clock
        self.jobs: list[Job] = []

    def submit(self, name: str, job: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        try:
            result, error = job(), None
        except BaseException as exc:
            result, error = None, exc
        self.jobs.append(Job(name, result, error, done, self.clock(), self.effects.take_finalizers()))

    def pending(self, kind: str | None = None, model: str | None = None) -> list[Job]:
        return [j for j in self.jobs if not j.delivered and (kind is None or j.kind == kind)
                and (model is None or j.model == model)]

    def deliver(self, job: Job) -> None:
        assert not job.delivered
        job.delivered = True
        for fin in job.finalizers:
            fin()
        job.done(job.result, job.error)

    def deliver_next(self, kind: str, model: str) -> Job:
        (job, *_) = self.pending(kind, model) or [None]
        assert job is not None, f"no pending {kind} for {model}; pending: {[j.name for j in self.pending()]}"
        self.deliver(job)
        return job

    def run_until_quiet(self, limit: int = 100) -> None:
        for _ in range(limit):
            jobs = self.pending()
            if not jobs:
                return
            self.deliver(jobs[0])
        raise AssertionError("effects kept coming")


class RecordingEffects(Effects):
    """Fake workers: a start spawns one, a completed stop removes it."""

    backend = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.stop_graces: list[float] = []  # each stop's grace, in order
        self.processes: dict[str, set[int]] = {}
        self.outcomes: dict[tuple[str, str], list[Any]] = {}  # (effect, model) -> scripted outcomes
        self.on_sleep: Callable[[str], None] | None = None  # lets a test look at the world as a sleep begins
        self._finalizers: list[Callable[[], None]] = []

    def script(self, effect: str, model: str, *outcomes: Any) -> None:
        """The next outcomes of ``effect`` for ``model``: "ok", an exception to raise, or a callable."""
        self.outcomes.setdefault((effect, model), []).extend(outcomes)

    def _outcome(self, effect: str, model: str) -> None:
        queue = self.outcomes.get((effect, model))
        outcome = queue.pop(0) if queue else "ok"
        if isinstance(outcome, BaseException):
            raise outcome
        if callable(outcome):
            outcome()

    def take_finalizers(self) -> list[Callable[[], None]]:
        out, self._finalizers = self._finalizers, []
        return out

    def alive(self, model: str) -> int:
        return len(self.processes.get(model, set()))

    def start(self, spec: ModelSpec, handle: WorkerHandle, timeout: float) -> str:
        self.calls.append(("start", spec.name))
        if handle.cancelled:
            raise RuntimeError("cancelled before it started")
        self.processes.setdefault(spec.name, set()).add(handle.serial)
        self._outcome("start", spec.name)
        return f"http://fake/{spec.name}/{handle.serial}"

    def stop(self, spec: ModelSpec, handle: WorkerHandle, grace: float) -> None:
        self.calls.append(("stop", spec.name))
        self.stop_graces.append(grace)
        self._finalizers.append(lambda: self.processes.get(spec.name, set()).discard(handle.serial))

    def sleep(self, spec: ModelSpec, handle: WorkerHandle, level: int, timeout: float) -> None:
        self.calls.append(("sleep", spec.name))
        if self.on_sleep is not None:
            self.on_sleep(spec.name)
        self._outcome("sleep", spec.name)

    def wake(self, spec: ModelSpec, handle: WorkerHandle, timeout: float) -> None:
        self.calls.append(("wake", spec.name))
        self._outcome("wake", spec.name)

    def probe(self, spec: ModelSpec, handle: WorkerHandle, timeout: float) -> bool:
        return handle.serial in self.processes.get(spec.name, set())

    def read_log(self, spec: ModelSpec, handle: WorkerHandle, limit: int) -> str:
        return "fake log tail"

    def kill(self, model: str) -> None:
        """The model's process dies behind the machine's back."""
        self.processes.pop(model, None)


@dataclass
class Harness:
    machine: Lifecycle
    effects: RecordingEffects
    executor: ManualExecutor
    clock: FakeClock
    events: list[tuple[str, dict[str, Any]]]

    def phase(self, model: str) -> str:
        return self.machine.describe(model).phase

    def handle(self, model: str) -> WorkerHandle | None:
        return self.machine.slot_snapshot()[model]["handle"]

    def crash(self, model: str, why: str = "killed") -> None:
        handle = self.handle(model)
        assert handle is not None
        self.effects.kill(model)
        self.machine.worker_exited(handle, why)

    def event_types(self) -> list[str]:
        return [t.rsplit(".", 1)[-1] for t, _ in self.events]


def harness(models_yaml: str, **config: Any) -> Harness:
    clock = FakeClock()
    effects = RecordingEffects()
    executor = ManualExecutor(effects, clock)
    events: list[tuple[str, dict[str, Any]]] = []
    cfg = LifecycleConfig(**{"restart_backoff_s": 2.0, "drain_timeout_s": 10.0, "control_timeout_s": 20.0,
                             **config})
    machine = Lifecycle(ModelRegistry.from_text(models_yaml), RequesterMetrics(), effects,
                        emit=lambda t, d: events.append((t, d)), config=cfg, clock=clock, wall=clock,
                        executor=executor)
    return Harness(machine, effects, executor, clock, events)


__all__ = ["EffectRefused", "FakeClock", "Harness", "ManualExecutor", "RecordingEffects", "harness"]
