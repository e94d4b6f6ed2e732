"""The state machine under random interleavings (hypothesis stateful testing).

Requests, deliveries of effect outcomes in any order, scripted failures,
releases, sleeps, crashes, finished requests and the passing of time are
mixed at random; after every step the machine must keep its promises:

* at most one worker process per model, ever;
* awake workers within ``max_loaded`` and the memory budget, counting the
  ones that are starting, going to sleep or stopping;
* no slot in a transitional phase past its deadline;
* every request answered (a lease or an error) or still waiting within its
  own deadline, and the in-flight count equal to the leases held.

Physics of the fake world: a stop always completes within its grace (as
SIGKILL guarantees); any other effect may answer late or never.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from machine_harness import EffectRefused, harness

from fma_common.errors import ApiError
from fma_requester.lifecycle import TRANSITIONAL, Phase

MODELS = ("a", "b", "c")
MAX_LOADED, SLEEPERS, MEMORY, AWAKE_MIB, ASLEEP_MIB = 2, 1, 2000, 800, 300
YAML = (f"budget: {{max_loaded: {MAX_LOADED}, sleepers: {SLEEPERS}, memory_mib: {MEMORY}}}\n"
        "defaults: {idle_timeout: 120s, queue_timeout: 30s, max_queue: 4, start_timeout: 60s}\nmodels:\n"
        + "".join(f"  - {{name: {m}, source: 'embedded:smollm2-135m-instruct', memory_mib: {AWAKE_MIB},"
                  f" sleep_memory_mib: {ASLEEP_MIB}}}\n" for m in MODELS))
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
        self.h.effects.on_sleep = self._sleep_begins

    def _sleep_begins(self, model: str) -> None:
        busy = [lease for lease in self.leases if lease.model == model and not lease.is_done]
        if busy:
            self.violations.append(f"{model} was put to sleep with {len(busy)} request(s) in flight")

    # ---- rules ------------------------------------------------------------------------------

    @rule(model=st.sampled_from(MODELS))
    def request(self, model: str) -> None:
        try:
            self.tickets.append(self.h.machine.admit(model))
        except ApiError as exc:
            assert exc.status in (429, 503), exc  # refused at once, with a retryable status

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
        self.ops.append(self.h.machine.request_release(model))

    @rule(model=st.sampled_from(MODELS), level=st.sampled_from([1, 2]))
    def sleep(self, model: str, level: int) -> None:
        try:
            self.ops.append(self.h.machine.request_sleep(model, level))
        except ApiError as exc:
            assert exc.status == 409

    @rule(model=st.sampled_from(MODELS))
    def crash(self, model: str) -> None:
        handle = self.h.handle(model)
        if handle is not None and self.h.effects.alive(model):
            self.h.crash(model, "killed")

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

    # ---- invariants -------------------------------------------------------------------------------

    @invariant()
    def at_most_one_worker_process_per_model(self) -> None:
        for m in MODELS:
            assert self.h.effects.alive(m) <= 1, f"{m} has {self.h.effects.alive(m)} processes"

    @invariant()
    def awake_workers_within_the_budget_transitional_ones_included(self) -> None:
        snap = self.h.machine.slot_snapshot()
        awake = [m for m, s in snap.items() if s["holds"] == "awake"]
        asleep = [m for m, s in snap.items() if s["holds"] == "asleep"]
        assert len(awake) <= MAX_LOADED, snap
        assert len(awake) * AWAKE_MIB + len(asleep) * ASLEEP_MIB <= MEMORY, snap
        # A worker alive in the world is one the machine counts.
        for m, s in snap.items():
            if self.h.effects.alive(m):
                assert s["phase"] not in (Phase.COLD, Phase.FAILED) and s["holds"] != "none", (m, s)

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
            assert t in self.h.machine._slots[t.model].tickets, "a waiting request was dropped"
            assert now < t.deadline or not t.done
        for m in MODELS:
            held = sum(1 for lease in self.leases if lease.model == m and not lease.is_done)
            assert snap[m]["in_flight"] == held, (m, snap[m], held)

    @invariant()
    def a_request_whose_start_failed_is_answered_at_once(self) -> None:
        for t in self.tickets:
            slot = self.h.machine._slots[t.model]
            if not t.done and t.attempt is not None:
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


ActuationMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
test_the_state_machine_keeps_its_promises_under_random_interleavings = ActuationMachine.TestCase
