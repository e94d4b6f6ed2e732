"""The state machine under random interleavings (hypothesis stateful testing).

Requests, deliveries of effect outcomes in any order, scripted failures,
releases, sleeps, crashes, finished requests and the passing of time are
mixed at random, with every other public event of the machine: a models file
reloaded (models removed, added back, changed), a worker removed behind its
back (``worker_gone``), a running worker found (``worker_found``, in each of
its states), a request that could not reach its worker
(``worker_unreachable``), a worker found asleep (``worker_asleep``), a stop the
platform finishes (``stop_pending``), leases that end after their model changed. After
every step the machine must keep its promises:

* at most one worker process per model, ever;
* awake workers within ``max_loaded`` and the memory budget, counting the
  ones that are starting, going to sleep or stopping, and those of removed
  models until they have stopped;
* no slot in a transitional phase past its deadline;
* every request answered (a lease or an error) or still waiting within its
  own deadline, and each slot's in-flight count equal to the leases taken from
  it and never below zero.

Physics of the fake world: a stop always completes within its grace (as
SIGKILL guarantees); any other effect may answer late or never.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from machine_harness import EffectRefused, harness

from fma_common.errors import ApiError
from fma_requester.effects import WorkerHandle
from fma_requester.lifecycle import TRANSITIONAL, Phase
from fma_requester.registry import ModelRegistry

MODELS = ("a", "b", "c")
MAX_LOADED, SLEEPERS, MEMORY, AWAKE_MIB, ASLEEP_MIB = 2, 1, 2000, 800, 300


def models_yaml(models: tuple[str, ...] = MODELS, idle: str = "120s") -> str:
    return (f"budget: {{max_loaded: {MAX_LOADED}, sleepers: {SLEEPERS}, memory_mib: {MEMORY}}}\n"
            f"defaults: {{idle_timeout: {idle}, queue_timeout: 30s, max_queue: 4, start_timeout: 60s}}\nmodels:\n"
            + "".join(f"  - {{name: {m}, source: 'embedded:smollm2-135m-instruct', memory_mib: {AWAKE_MIB},"
                      f" sleep_memory_mib: {ASLEEP_MIB}}}\n" for m in models))


YAML = models_yaml()
GRACE = 10.0  # the harness's drain timeout: a stop's grace

OUTCOMES = {
    "start": st.sampled_from(["ok", "ok", RuntimeError("load failed"), KeyError("boom")]),
    "sleep": st.sampled_from(["ok", "ok", EffectRefused("unreachable"), EffectRefused("busy", status=409),
                              TimeoutError("hung")]),
    "wake": st.sampled_from(["ok", "ok", RuntimeError("wake failed")]),
}


class ActuationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = harness(YAML, drain_timeout_s=GRACE, control_timeout_s=20.0, restart_backoff_s=1.0)
        self.tickets: list = []
        self.leases: list = []
        self.ops: list = []
        self.violations: list[str] = []
        self.lease_slot: dict[int, object] = {}  # id(lease) -> the slot it was taken from
        self.h.effects.on_sleep = self._sleep_begins

    def _sleep_begins(self, model: str) -> None:
        busy = [lease for lease in self.leases if lease.model == model and not lease.is_done]
        if busy:
            self.violations.append(f"{model} was put to sleep with {len(busy)} request(s) in flight")

    # ---- rules ------------------------------------------------------------------------------

    def _slots(self) -> list:
        """Every slot the machine holds: served models, and removed ones whose workers are still stopping."""
        return [*self.h.machine._slots.values(), *self.h.machine._retiring.values()]

    @rule(model=st.sampled_from(MODELS))
    def request(self, model: str) -> None:
        try:
            self.tickets.append(self.h.machine.admit(model))
        except ApiError as exc:
            assert exc.status in (404, 429, 503), exc  # refused at once: retryable, or a model no longer served

    @rule(data=st.data())
    def deliver_an_effect(self, data: st.DataObject) -> None:
        pending = self.h.executor.pending()
        if pending:
            self.h.executor.deliver(data.draw(st.sampled_from(pending)))

    @rule(effect=st.sampled_from(sorted(OUTCOMES)), model=st.sampled_from(MODELS), data=st.data())
    def script_the_next_outcome(self, effect: str, model: str, data: st.DataObject) -> None:
        self.h.effects.script(effect, model, data.draw(OUTCOMES[effect]))

    @rule(data=st.data())
    def finish_a_request(self, data: st.DataObject) -> None:
        if self.leases:
            lease = data.draw(st.sampled_from(self.leases))
            self.leases.remove(lease)
            lease.done()

    @rule(model=st.sampled_from(MODELS))
    def release(self, model: str) -> None:
        try:
            self.ops.append(self.h.machine.request_release(model))
        except ApiError as exc:
            assert exc.status == 404

    @rule(model=st.sampled_from(MODELS), level=st.sampled_from([1, 2]))
    def sleep(self, model: str, level: int) -> None:
        try:
            self.ops.append(self.h.machine.request_sleep(model, level))
        except ApiError as exc:
            assert exc.status in (404, 409)

    def _handle(self, model: str) -> WorkerHandle | None:
        slot = self.h.machine._slots.get(model)
        return slot.handle if slot is not None else None

    @rule(model=st.sampled_from(MODELS))
    def crash(self, model: str) -> None:
        handle = self._handle(model)
        if handle is not None and self.h.effects.alive(model):
            self.h.crash(model, "killed")

    @rule(keep=st.sets(st.sampled_from(MODELS), min_size=1), changed=st.booleans())
    def reload(self, keep: set[str], changed: bool) -> None:
        """A new models file: some models removed (their waiters get 404), some added back, settings changed."""
        models = tuple(m for m in MODELS if m in keep)
        self.h.machine.reload(ModelRegistry.from_text(models_yaml(models, "90s" if changed else "120s")))

    @rule(model=st.sampled_from(MODELS))
    def worker_gone(self, model: str) -> None:
        """The worker was removed behind the machine's back (its Knative Service deleted)."""
        handle = self._handle(model)
        if handle is not None and self.h.effects.alive(model):
            self.h.effects.kill(model)
            self.h.machine.worker_gone(handle, model)

    @rule(model=st.sampled_from(MODELS), state=st.sampled_from(["ready", "sleeping", "releasing"]))
    def worker_found(self, model: str, state: str) -> None:
        """A worker already running is found for a model the machine thinks cold (a requester restart)."""
        slot = self.h.machine._slots.get(model)
        if slot is None or slot.phase != Phase.COLD or self.h.effects.alive(model):
            return
        slots = self._slots()
        awake = sum(1 for s in slots if s.holds == "awake")
        used = awake * AWAKE_MIB + sum(ASLEEP_MIB for s in slots if s.holds == "asleep")
        if awake + 1 > MAX_LOADED or used + AWAKE_MIB > MEMORY:
            return  # a world that starts over its budget is not the machine's doing (see docs/design.md)
        found = WorkerHandle(model)
        found.url = f"http://fake/{model}/{found.serial}"
        self.h.effects.processes.setdefault(model, set()).add(found.serial)
        self.h.machine.worker_found(model, found, state)
        if slot.handle is not found:  # not adopted after all: nothing runs it
            self.h.effects.processes[model].discard(found.serial)

    @rule(data=st.data())
    def a_request_could_not_reach_its_worker(self, data: st.DataObject) -> None:
        if self.leases:
            self.h.machine.worker_unreachable(data.draw(st.sampled_from(self.leases)))

    @rule(data=st.data())
    def a_request_found_its_worker_asleep(self, data: st.DataObject) -> None:
        """The worker answered 503 worker_sleeping (someone else put it to sleep)."""
        if self.leases:
            self.h.machine.worker_asleep(data.draw(st.sampled_from(self.leases)))

    @rule(model=st.sampled_from(MODELS))
    def the_platform_has_the_stop(self, model: str) -> None:
        """A stop handed to the platform (a Knative release waiting for its pod): its callers are answered."""
        slot = self.h.machine._slots.get(model)
        if slot is not None and slot.phase == Phase.STOPPING and slot.handle is not None:
            self.h.machine.stop_pending(slot.handle, "released; waiting for the platform")

    @rule(seconds=st.sampled_from([0.5, 3.0, 11.0, 25.0, 61.0, 130.0]))
    def time_passes(self, seconds: float) -> None:
        self.h.clock.advance(seconds)
        for job in self.h.executor.pending("stop"):  # a stop never outlives its grace (SIGKILL)
            if job.submitted + GRACE + 5.0 <= self.h.clock():
                self.h.executor.deliver(job)
        self.h.machine.tick()

    def _collect(self) -> None:
        for t in [t for t in self.tickets if t.done]:
            self.tickets.remove(t)
            if t.lease is not None:
                self.leases.append(t.lease)
                self.lease_slot[id(t.lease)] = self.h.machine._slots[t.model]  # leased in this very step

    # ---- invariants -------------------------------------------------------------------------------

    @invariant()
    def at_most_one_worker_process_per_model(self) -> None:
        for m in MODELS:
            assert self.h.effects.alive(m) <= 1, f"{m} has {self.h.effects.alive(m)} processes"

    @invariant()
    def awake_workers_within_the_budget_transitional_ones_included(self) -> None:
        slots = self._slots()
        awake = [s.name for s in slots if s.holds == "awake"]
        asleep = [s.name for s in slots if s.holds == "asleep"]
        assert len(awake) <= MAX_LOADED, (awake, asleep)
        assert len(awake) * AWAKE_MIB + len(asleep) * ASLEEP_MIB <= MEMORY, (awake, asleep)
        # A worker alive in the world is one the machine counts.
        for m in MODELS:
            if self.h.effects.alive(m):
                held = [s for s in slots if s.name == m and s.phase not in (Phase.COLD, Phase.FAILED)
                        and s.holds != "none"]
                assert held, (m, [(s.name, s.phase, s.holds) for s in slots])

    @invariant()
    def no_slot_in_a_transitional_phase_past_its_deadline(self) -> None:
        now = self.h.clock()
        for m, s in self.h.machine.slot_snapshot().items():
            if s["phase"] in TRANSITIONAL:
                assert s["deadline"] is not None and now < s["deadline"], (m, s, now)

    @invariant()
    def every_request_is_answered_or_waits_within_its_deadline(self) -> None:
        self._collect()
        now = self.h.clock()
        snap = self.h.machine.slot_snapshot()
        for t in self.tickets:
            slot = self.h.machine._slots.get(t.model)
            assert slot is not None and t in slot.tickets, "a waiting request was dropped"
            assert now < t.deadline or not t.done
        for slot in self._slots():
            held = sum(1 for lease in self.leases if self.lease_slot.get(id(lease)) is slot and not lease.is_done)
            assert slot.in_flight >= 0, (slot.name, slot.in_flight)
            assert slot.in_flight == held, (slot.name, slot.in_flight, held, snap.get(slot.name))

    @invariant()
    def a_request_whose_start_failed_is_answered_at_once(self) -> None:
        for t in self.tickets:
            slot = self.h.machine._slots.get(t.model)
            if slot is not None and not t.done and t.attempt is not None:
                assert slot.phase in (Phase.STARTING, Phase.WAKING) and slot.activation.attempt == t.attempt, \
                    (t, slot.phase)

    @invariant()
    def no_worker_sleeps_under_a_request(self) -> None:
        assert not self.violations, self.violations

    @invariant()
    def statuses_keep_the_five_client_states(self) -> None:
        for status in self.h.machine.list():
            assert status.state in ("cold", "starting", "ready", "sleeping", "failed")
            assert (status.state == "failed") == bool(status.error) or status.phase == "stopping"

    def teardown(self) -> None:
        # Whatever happened, the machine can still be driven to rest: nothing hangs forever.
        for lease in self.leases:
            lease.done()
        for _ in range(12):
            self.time_passes(61.0)
            self.h.executor.run_until_quiet(500)
        for m, s in self.h.machine.slot_snapshot().items():
            assert s["phase"] not in TRANSITIONAL, (m, s)
        assert not [t for t in self.tickets if not t.done]
        assert all(op.done for op in self.ops), "every release and sleep was answered"


# 300 examples: with reloads among the events, the search found a lease ending after its model was removed and added
# back (in_flight -1, a KeyError) at example 90 of a derandomized run, before the fix; about 10 s here.
ActuationMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
test_the_state_machine_keeps_its_promises_under_random_interleavings = ActuationMachine.TestCase
