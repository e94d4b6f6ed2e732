"""The actuation state machine, scenario by scenario, with recording effects.

Every test drives the machine step by step (``tests/machine_harness.py``): a
request is a ticket, an effect's outcome arrives when the test delivers it,
time moves when the test says so. No threads, no sleeps.
"""

from __future__ import annotations

import pytest
from machine_harness import EffectRefused, Harness, harness

from fma_common.errors import Conflict, QueueFull, UpstreamError, WorkerFailed, WorkerNotReady
from fma_requester.lifecycle import TRANSITIONS, Phase

ONE = "models:\n  - {name: a, source: 'embedded:smollm2-135m-instruct', start_timeout: 60s}\n"
TWO = ("budget: {max_loaded: 1, sleepers: 1}\nmodels:\n"
       "  - {name: a, source: 'embedded:smollm2-135m-instruct'}\n"
       "  - {name: b, source: 'embedded:smollm2-135m-instruct'}\n")


def ready(h: Harness, model: str = "a") -> None:
    """Bring ``model`` to ready and leave it idle."""
    ticket = h.machine.admit(model)
    h.executor.deliver_next("start", model)
    ticket.result().done()
    assert h.phase(model) == "ready"


# ---- cold starts ------------------------------------------------------------------------------

def test_concurrent_first_requests_join_one_cold_start():
    h = harness(ONE)
    tickets = [h.machine.admit("a") for _ in range(5)]
    assert h.effects.calls == [("start", "a")] and h.effects.alive("a") == 1
    assert h.machine.describe("a").queued == 5
    h.clock.advance(0.8)
    h.executor.deliver_next("start", "a")
    leases = [t.result() for t in tickets]
    assert {lease.actuation.path for lease in leases} == {"cold"}
    assert leases[0].actuation.seconds == pytest.approx(0.8)
    assert h.machine.describe("a").in_flight == 5 and h.event_types() == ["started", "ready"]


def test_a_waiter_reports_the_activation_it_waited_for_never_warm_with_a_cold_duration():
    h = harness(ONE)
    first = h.machine.admit("a")
    h.clock.advance(1.0)
    second = h.machine.admit("a")
    h.clock.advance(1.0)
    h.executor.deliver_next("start", "a")
    assert first.result().actuation.path == "cold" and first.result().actuation.seconds == pytest.approx(2.0)
    assert second.result().actuation.path == "cold" and second.result().actuation.seconds == pytest.approx(1.0)
    third = h.machine.admit("a")
    assert third.result().actuation.path == "warm" and third.result().actuation.seconds == 0.0
    assert h.machine.describe("a").last_actuation.path == "warm"


def test_a_failed_start_is_counted_once_answers_its_waiters_at_once_and_backs_off():
    h = harness(ONE)
    h.effects.script("start", "a", RuntimeError("model failed to load"))
    waiting = h.machine.admit("a")
    # The start job failed at once; its outcome arrives now.
    h.executor.deliver_next("start", "a")
    with pytest.raises(WorkerFailed, match="model failed to load; log tail: fake log tail"):
        waiting.result()
    status = h.machine.describe("a")
    assert status.state == "failed" and status.phase == "stopping", "the failed worker is cleaned up first"
    h.executor.deliver_next("stop", "a")
    assert h.phase("a") == "failed" and h.effects.alive("a") == 0
    assert h.event_types() == ["started", "failed"]
    assert h.machine._slots["a"].failures == 1
    with pytest.raises(WorkerFailed) as info:
        h.machine.admit("a")
    assert info.value.headers["Retry-After"] == "2", "the first backoff is the base delay, not twice it"
    h.clock.advance(2.0)
    h.machine.admit("a")
    assert h.effects.calls.count(("start", "a")) == 2


@pytest.mark.parametrize("error", [KeyError("FMA_MODEL"), PermissionError(13, "Permission denied", "/logs"),
                                   ZeroDivisionError("oops"), SystemExit(3)])
def test_a_start_that_raises_anything_ends_failed(error):
    h = harness(ONE)
    h.effects.script("start", "a", error)
    ticket = h.machine.admit("a")
    h.executor.run_until_quiet()
    with pytest.raises(WorkerFailed):
        ticket.result()
    assert h.phase("a") == "failed" and h.machine.describe("a").error
    assert h.effects.alive("a") == 0


def test_a_start_that_never_answers_fails_at_its_deadline_and_its_worker_is_stopped():
    h = harness(ONE)
    ticket = h.machine.admit("a")  # the start job spawned its worker, then hangs
    h.clock.advance(59)
    h.machine.tick()
    assert h.phase("a") == "starting"
    h.clock.advance(2)
    h.machine.tick()
    with pytest.raises(WorkerFailed, match="not ready after 60 s"):
        ticket.result()
    assert h.phase("a") == "stopping" and h.effects.alive("a") == 1
    h.executor.deliver_next("stop", "a")
    assert h.phase("a") == "failed" and h.effects.alive("a") == 0
    h.executor.deliver_next("start", "a")  # the hung start answers after all: too late, ignored
    assert h.phase("a") == "failed" and h.event_types() == ["started", "failed"]


def test_queue_timeout_zero_starts_the_model_and_answers_at_once():
    h = harness("models:\n  - {name: a, source: 'embedded:smollm2-135m-instruct', queue_timeout: 0s}\n")
    with pytest.raises(WorkerNotReady, match="not ready after 0 s"):
        h.machine.ensure_ready("a")
    assert h.phase("a") == "starting", "the refused request still started the model"
    h.executor.deliver_next("start", "a")
    assert h.machine.ensure_ready("a").actuation.path == "warm"


def test_max_queue_zero_refuses_with_429_but_starts_the_model():
    h = harness("models:\n  - {name: a, source: 'embedded:smollm2-135m-instruct', max_queue: 0}\n")
    with pytest.raises(QueueFull):
        h.machine.admit("a")
    assert h.phase("a") == "starting"
    h.executor.deliver_next("start", "a")
    assert h.phase("a") == "ready" and h.machine.describe("a").queued == 0
    h.machine.admit("a").result().done()
    h.clock.advance(301)
    h.machine.tick()
    assert h.phase("a") == "stopping", "a model started for a refused request still goes idle"


# ---- release, crash ----------------------------------------------------------------------------

def test_release_during_start_cancels_it_and_the_next_start_waits_for_the_stop():
    h = harness(ONE)
    waiting = h.machine.admit("a")
    first = h.handle("a")
    op = h.machine.request_release("a")
    assert first.cancelled
    with pytest.raises(WorkerNotReady, match="stopped \\(released\\) before it was ready"):
        waiting.result()
    assert h.phase("a") == "stopping" and h.machine.describe("a").state == "cold"
    again = h.machine.admit("a")  # a new request while the old worker still stops
    assert h.effects.calls.count(("start", "a")) == 1 and h.effects.alive("a") == 1, \
        "no second worker while the first still holds its memory"
    h.executor.deliver_next("stop", "a")
    assert op.done and h.effects.alive("a") == 1 and h.effects.calls.count(("start", "a")) == 2
    h.executor.deliver_next("start", "a")  # the cancelled start's outcome: stale
    assert h.phase("a") == "starting"
    h.executor.deliver_next("start", "a")
    assert again.result().actuation.path == "cold"
    assert h.event_types() == ["started", "released", "started", "ready"]


def test_release_is_idempotent_and_clears_a_failure():
    h = harness(ONE)
    assert h.machine.request_release("a").done and h.phase("a") == "cold" and h.events == []
    h.effects.script("start", "a", RuntimeError("boom"))
    h.machine.admit("a")
    h.executor.run_until_quiet()
    assert h.phase("a") == "failed"
    h.machine.request_release("a")
    assert h.phase("a") == "cold" and h.machine.describe("a").error is None
    h.machine.admit("a")  # no backoff after an explicit release
    assert h.phase("a") == "starting"


def test_crash_during_start_fails_once():
    h = harness(ONE)
    ticket = h.machine.admit("a")
    h.crash("a", "exited with code 1; log tail: CUDA out of memory")
    with pytest.raises(WorkerFailed, match="out of memory"):
        ticket.result()
    h.executor.deliver_next("stop", "a")
    h.executor.deliver_next("start", "a")  # the start job notices the exit too: stale
    assert h.phase("a") == "failed" and h.event_types() == ["started", "failed"] and h.machine._slots["a"].failures == 1


def test_crash_of_a_ready_worker_is_cleaned_up_and_restarted_on_the_next_request_at_once():
    h = harness(ONE)
    ready(h)
    h.crash("a", "exited with code -9")
    status = h.machine.describe("a")
    assert status.state == "failed" and "code -9" in status.error
    assert h.effects.calls[-1] == ("stop", "a"), "whatever is left of it is stopped"
    assert h.effects.stop_graces[-1] <= 1.0, "nothing to drain in a worker that went away: no 30 s grace"
    h.executor.deliver_next("stop", "a")
    ticket = h.machine.admit("a")
    assert h.phase("a") == "starting"
    h.executor.deliver_next("start", "a")
    assert ticket.result().actuation.path == "cold"
    assert h.event_types() == ["started", "ready", "failed", "started", "ready"]


def test_an_unreachable_worker_that_is_gone_is_replaced():
    h = harness(ONE)
    ready(h)
    lease = h.machine.admit("a").result()
    h.effects.kill("a")  # dead, and nobody noticed yet
    h.machine.worker_unreachable(lease)
    h.executor.deliver_next("probe", "a")
    lease.done()
    assert h.machine.describe("a").state == "failed"
    h.executor.run_until_quiet()
    h.machine.admit("a")
    assert h.effects.calls.count(("start", "a")) == 2


def test_a_worker_removed_behind_our_back_is_cold():
    h = harness(ONE)
    ready(h)
    h.machine.worker_gone(h.handle("a"), "a")
    assert h.phase("a") == "cold" and h.handle("a") is None and h.event_types() == ["started", "ready", "released"]


# ---- a platform that finishes stops on its own time (Knative) --------------------------------------

def test_a_release_handed_to_the_platform_answers_at_once_and_holds_the_budget_until_done():
    h = harness(TWO)
    ready(h, "a")
    op = h.machine.request_release("a")
    handle = h.handle("a")
    h.machine.stop_pending(handle, "released; waiting for its pods to go")
    assert op.done, "whoever released it is answered once the platform has the release"
    status = h.machine.describe("a")
    assert status.phase == "stopping" and status.detail == "released; waiting for its pods to go"
    waiting = h.machine.admit("b")
    assert h.effects.calls.count(("start", "b")) == 0, "b waits: a still holds its place until its worker is gone"
    h.executor.deliver_next("stop", "a")
    h.executor.deliver_next("start", "b")
    assert waiting.result().actuation.path == "cold" and h.phase("a") == "cold"


def test_a_second_release_while_the_platform_finishes_the_first_answers_at_once():
    h = harness(ONE)
    ready(h, "a")
    h.machine.request_release("a")
    h.machine.stop_pending(h.handle("a"), "released")
    assert h.machine.request_release("a").done, "nothing more to wait for: the platform has the release"


def test_no_reclaim_when_the_platform_is_removing_the_worker_whatever_happens():
    h = harness(ONE)
    h.effects.reclaimable = True
    h.effects.can_reclaim = lambda handle: not handle.data.get("deleted")
    ready(h, "a")
    h.machine.request_release("a")
    h.handle("a").data["deleted"] = True  # e.g. a release by deleting the Service
    ticket = h.machine.admit("a")
    assert h.phase("a") == "stopping" and h.effects.calls.count(("start", "a")) == 1, "it waits for the stop"
    h.executor.deliver_next("stop", "a")
    h.executor.deliver_next("start", "a")
    assert ticket.result().actuation.path == "cold"


def test_a_late_report_that_the_worker_sleeps_does_not_undo_the_wake_it_caused():
    h = harness(ONE)
    ready(h, "a")
    first, second = h.machine.admit("a").result(), h.machine.admit("a").result()
    h.machine.worker_asleep(first)  # both got 503 worker_sleeping; the first report has it woken
    first.done()
    woken = h.machine.admit("a")
    h.executor.deliver_next("wake", "a")
    woken.result().done()
    h.machine.worker_asleep(second)  # the second report arrives after the wake
    second.done()
    assert h.phase("a") == "ready"


def test_shutdown_does_not_wait_for_a_release_the_platform_is_finishing():
    import time

    h = harness(ONE)
    ready(h, "a")
    h.machine.request_release("a")
    h.machine.stop_pending(h.handle("a"), "released")
    began = time.monotonic()
    h.machine.shutdown(timeout=30)
    assert time.monotonic() - began < 1, "the pod's removal is Knative's business once released"


def test_a_request_during_a_platform_release_takes_the_worker_back_without_waiting_for_the_stop():
    h = harness(ONE)
    h.effects.reclaimable = True
    ready(h, "a")
    h.machine.request_release("a")
    old = h.handle("a")
    h.machine.stop_pending(old, "released")
    ticket = h.machine.admit("a")
    assert old.stop_abandoned.is_set(), "the stop in progress is told to give up"
    assert h.phase("a") == "starting" and h.effects.calls.count(("start", "a")) == 2
    h.executor.deliver_next("stop", "a")  # the abandoned stop returns: stale, ignored
    assert h.phase("a") == "starting"
    h.executor.deliver_next("start", "a")
    assert ticket.result().actuation.path == "cold" and h.phase("a") == "ready"
    assert h.event_types() == ["started", "ready", "started", "ready"]


def test_a_reclaim_after_a_crash_waits_for_the_backoff_of_a_failed_start():
    h = harness(ONE)
    h.effects.reclaimable = True
    h.effects.script("start", "a", RuntimeError("model failed to load"))
    first = h.machine.admit("a")
    h.executor.deliver_next("start", "a")
    with pytest.raises(WorkerFailed):
        first.result()
    assert h.phase("a") == "stopping"
    with pytest.raises(WorkerFailed, match="next retry in"):
        h.machine.admit("a")
    h.clock.advance(2.0)
    h.machine.admit("a")
    assert h.phase("a") == "starting", "past the backoff, the stop still in progress is taken back"


@pytest.mark.parametrize(("state", "phase", "event"), [("ready", "ready", "ready"),
                                                       ("sleeping", "sleeping", "sleeping"),
                                                       ("releasing", "stopping", None)])
def test_a_worker_found_at_start_up_is_adopted_in_its_true_state(state, phase, event):
    from fma_requester.effects import WorkerHandle

    h = harness(ONE)
    found = WorkerHandle("a")
    found.url = "http://fake/a/found"
    h.machine.worker_found("a", found, state)
    assert h.phase("a") == phase
    assert h.event_types() == ([event] if event else [])
    if state == "releasing":
        assert h.effects.calls == [("stop", "a")], "a released worker is followed until it is gone"
    if state == "sleeping":
        ticket = h.machine.admit("a")
        h.executor.deliver_next("wake", "a")
        assert ticket.result().actuation.path == "wake"


def test_a_ready_worker_that_answers_it_is_asleep_is_woken_by_the_next_request():
    h = harness(ONE)
    ready(h, "a")
    lease = h.machine.admit("a").result()
    h.machine.worker_asleep(lease)
    lease.done()
    assert h.phase("a") == "sleeping"
    ticket = h.machine.admit("a")
    h.executor.deliver_next("wake", "a")
    assert ticket.result().actuation.path == "wake"


# ---- sleep and wake ----------------------------------------------------------------------------

def test_manual_sleep_waits_for_requests_in_flight():
    h = harness(ONE)
    ready(h)
    lease = h.machine.admit("a").result()
    op = h.machine.request_sleep("a", 1)
    assert h.phase("a") == "going_to_sleep" and ("sleep", "a") not in h.effects.calls
    late = h.machine.admit("a")
    assert not late.done, "no new lease on a worker going to sleep"
    lease.done()
    assert h.effects.calls[-1] == ("sleep", "a")
    h.executor.deliver_next("sleep", "a")
    assert op.done and op.error is None
    # The request that came during the sleep now wakes it.
    assert h.phase("a") == "waking"
    h.executor.deliver_next("wake", "a")
    assert late.result().actuation.path == "wake"
    assert h.event_types() == ["started", "ready", "sleeping", "ready"]


def test_manual_sleep_with_requests_still_running_at_the_drain_deadline_is_refused():
    h = harness(ONE)
    ready(h)
    lease = h.machine.admit("a").result()
    op = h.machine.request_sleep("a", 2)
    h.clock.advance(11)
    h.machine.tick()
    assert op.done and isinstance(op.error, Conflict) and "still in flight" in op.error.message
    assert h.phase("a") == "ready"
    lease.done()
    assert ("sleep", "a") not in h.effects.calls


def test_a_worker_that_refuses_to_sleep_keeps_serving_one_that_hangs_is_stopped():
    h = harness(ONE)
    ready(h)
    h.effects.script("sleep", "a", EffectRefused("could not reach it"))
    op = h.machine.request_sleep("a", 1)
    h.executor.deliver_next("sleep", "a")
    assert isinstance(op.error, UpstreamError) and op.error.status == 502 and h.phase("a") == "ready"
    op = h.machine.request_sleep("a", 1)  # this one never answers
    h.clock.advance(31)
    h.machine.tick()
    assert op.done and op.error is not None and h.phase("a") == "stopping"


def test_sleep_of_a_cold_worker_is_a_conflict_and_a_sleeping_one_is_idempotent():
    h = harness(ONE)
    with pytest.raises(Conflict):
        h.machine.request_sleep("a", 1)
    ready(h)
    h.machine.request_sleep("a", 1)
    h.executor.deliver_next("sleep", "a")
    assert h.machine.request_sleep("a", 2).done and h.effects.calls.count(("sleep", "a")) == 1


def test_sleep_asked_during_a_start_happens_after_it():
    h = harness(ONE)
    ticket = h.machine.admit("a")
    op = h.machine.request_sleep("a", 1)
    h.executor.deliver_next("start", "a")
    lease = ticket.result()
    assert h.phase("a") == "going_to_sleep", "the requests that waited are served, then it drains"
    lease.done()
    h.executor.deliver_next("sleep", "a")
    assert op.done and op.error is None and h.phase("a") == "sleeping"


def test_wake_racing_an_eviction_sleep_wakes_after_the_sleep_completes():
    h = harness(TWO)
    ready(h, "a")
    b = h.machine.admit("b")  # needs a's place: a goes to sleep first
    assert h.phase("a") == "going_to_sleep" and ("start", "b") not in h.effects.calls
    h.clock.advance(0.1)
    a_again = h.machine.admit("a")  # and now a is wanted again, mid-sleep
    h.executor.deliver_next("sleep", "a")
    # b was first in line: it starts now that a is asleep; a waits for b to be done.
    assert h.phase("b") == "starting" and h.phase("a") == "sleeping"
    h.executor.deliver_next("start", "b")
    b.result().done()
    assert h.phase("b") == "going_to_sleep" and not a_again.done
    h.executor.deliver_next("sleep", "b")
    assert h.phase("a") == "waking"
    h.executor.deliver_next("wake", "a")
    assert a_again.result().actuation.path == "wake"
    assert h.phase("b") == "sleeping"


# ---- the budget -------------------------------------------------------------------------------

def test_evict_then_rewake_never_exceeds_the_budget():
    h = harness(TWO)
    ready(h, "a")
    b = h.machine.admit("b")
    assert h.machine.slot_snapshot()["a"]["holds"] == "awake", "going to sleep still holds its place"
    h.executor.deliver_next("sleep", "a")
    h.executor.deliver_next("start", "b")
    b.result().done()
    a = h.machine.admit("a")
    assert h.phase("b") == "going_to_sleep"
    h.executor.deliver_next("sleep", "b")
    h.executor.deliver_next("wake", "a")
    assert a.result().actuation.path == "wake"
    assert h.machine.describe("a").state == "ready" and h.machine.describe("b").state == "sleeping"


def test_eviction_never_touches_a_busy_worker_it_waits_for_it_to_go_idle():
    h = harness(TWO)
    ready(h, "a")
    busy = h.machine.admit("a").result()
    b = h.machine.admit("b")
    assert h.phase("a") == "ready" and h.effects.calls == [("start", "a")]
    assert "busy" in h.machine._waiting_on(h.machine._slots["b"])
    busy.done()
    assert h.phase("a") == "going_to_sleep"
    h.executor.deliver_next("sleep", "a")
    h.executor.deliver_next("start", "b")
    assert b.result().actuation.path == "cold"


def test_a_stopping_worker_still_counts_against_the_memory_budget():
    h = harness("budget: {max_loaded: 5, sleepers: 0, memory_mib: 1000}\nmodels:\n"
                "  - {name: a, source: 'embedded:smollm2-135m-instruct', memory_mib: 800}\n"
                "  - {name: b, source: 'embedded:smollm2-135m-instruct', memory_mib: 800}\n")
    ready(h, "a")
    h.machine.admit("b")
    assert h.phase("a") == "stopping", "no sleepers allowed: a is stopped to make room"
    assert ("start", "b") not in h.effects.calls, "b must not start while a still holds 800 MiB"
    h.executor.deliver_next("stop", "a")
    assert h.effects.calls[-1] == ("start", "b")


@pytest.mark.parametrize("asleep, action", [(100, "going_to_sleep"), (300, "stopping")])
def test_a_sleeper_counts_its_sleeping_footprint(asleep: int, action: str):
    h = harness("budget: {max_loaded: 5, sleepers: 2, memory_mib: 1000}\nmodels:\n"
                "  - {name: a, source: 'embedded:smollm2-135m-instruct', memory_mib: 800,"
                f" sleep_memory_mib: {asleep}}}\n"
                "  - {name: b, source: 'embedded:smollm2-135m-instruct', memory_mib: 800}\n")
    ready(h, "a")
    h.machine.admit("b")
    # 100 MiB asleep + 800 for b fit in 1000: a sleeps. 300 + 800 do not: sleeping would not be enough.
    assert h.phase("a") == action
    h.executor.run_until_quiet()
    assert h.phase("b") == "ready"
    assert h.phase("a") == ("sleeping" if asleep == 100 else "cold")


def test_a_sleeper_that_kept_more_memory_than_declared_is_stopped_before_the_next_model_starts():
    """The worker's own measurement after the sleep wins over the models file: b starts only once the memory
    really came back (a CPU level-1 sleep, say, frees nothing)."""
    h = harness("budget: {max_loaded: 5, sleepers: 2, memory_mib: 1000}\nmodels:\n"
                "  - {name: a, source: 'embedded:smollm2-135m-instruct', memory_mib: 800, sleep_memory_mib: 100}\n"
                "  - {name: b, source: 'embedded:smollm2-135m-instruct', memory_mib: 800}\n")
    ready(h, "a")
    handle = h.machine._slots["a"].handle
    h.effects.script("sleep", "a", lambda: setattr(handle, "asleep_mib", 790.0))
    h.machine.admit("b")
    assert h.phase("a") == "going_to_sleep", "declared: 100 MiB asleep + 800 fit in 1000"
    h.executor.deliver_next("sleep", "a")
    assert ("start", "b") not in h.effects.calls, "a still holds 790 MiB: b must not start"
    assert h.phase("a") == "stopping"
    h.executor.run_until_quiet()
    assert h.phase("b") == "ready" and h.phase("a") == "cold"


def test_sleepers_beyond_the_budget_are_stopped_least_recently_used_first():
    h = harness("budget: {max_loaded: 3, sleepers: 1}\nmodels:\n"
                "  - {name: a, source: 'embedded:smollm2-135m-instruct'}\n"
                "  - {name: b, source: 'embedded:smollm2-135m-instruct'}\n")
    ready(h, "a")
    ready(h, "b")
    h.machine.request_sleep("a", 1)
    h.executor.deliver_next("sleep", "a")
    h.clock.advance(1)
    h.machine.request_sleep("b", 1)
    h.executor.deliver_next("sleep", "b")
    assert h.phase("a") == "stopping" and h.phase("b") == "sleeping"


def test_idle_workers_scale_to_zero_after_their_timeout():
    h = harness("models:\n  - {name: a, source: 'embedded:smollm2-135m-instruct', idle_timeout: 5s}\n")
    ready(h)
    h.clock.advance(4)
    h.machine.tick()
    assert h.phase("a") == "ready"
    h.clock.advance(1)
    h.machine.tick()
    assert h.phase("a") == "stopping"
    h.executor.deliver_next("stop", "a")
    assert h.phase("a") == "cold" and h.effects.alive("a") == 0


def test_status_counts_down_the_idle_time_left_and_says_nothing_while_busy_or_cold():
    h = harness("models:\n  - {name: a, source: 'embedded:smollm2-135m-instruct', idle_timeout: 5s}\n")
    assert h.machine.describe("a").idle_left_s is None
    ready(h)
    h.clock.advance(2)
    assert h.machine.describe("a").idle_left_s == pytest.approx(3.0)
    busy = h.machine.admit("a").result()
    assert h.machine.describe("a").idle_left_s is None, "a worker with a request in flight is not idling"
    h.clock.advance(1)
    busy.done()
    assert h.machine.describe("a").idle_left_s == pytest.approx(5.0), "the clock restarts after the last request"


def test_metrics_time_to_ready_counts_from_the_first_request_once_and_queue_wait_every_request():
    h = harness(TWO)
    ready(h, "a")
    first = h.machine.admit("b")  # a must go to sleep first: b's start waits for room
    h.clock.advance(1.0)
    h.executor.deliver_next("sleep", "a")
    h.clock.advance(0.5)
    h.executor.deliver_next("start", "b")
    first.result().done()
    second = h.machine.admit("b").result()  # warm: its own observation, path warm
    second.done()
    registry = h.machine.metrics.registry
    cold = {"model": "b", "path": "cold"}
    assert registry.get_sample_value("fma_actuation_seconds_sum", cold) == pytest.approx(1.5), \
        "from the request's arrival (it waited for room), not from when the worker was asked to start"
    assert registry.get_sample_value("fma_actuation_seconds_count", cold) == 1
    assert registry.get_sample_value("fma_last_time_to_ready_seconds", cold) == pytest.approx(1.5)
    assert registry.get_sample_value("fma_queue_wait_seconds_count", {"model": "b"}) == 2
    assert registry.get_sample_value("fma_queue_wait_seconds_sum", {"model": "b"}) == pytest.approx(1.5)
    assert registry.get_sample_value("fma_workers", {"state": "ready"}) == 1
    assert registry.get_sample_value("fma_workers", {"state": "sleeping"}) == 1


# ---- the whole machine ----------------------------------------------------------------------------

def test_shutdown_answers_every_waiter_and_stops_every_worker():
    h = harness(TWO.replace("max_loaded: 1", "max_loaded: 2"))
    ready(h, "a")
    waiting = h.machine.admit("b")
    h.executor.jobs.clear()  # b's start hangs forever; a's stop is delivered below
    import threading

    t = threading.Thread(target=h.machine.shutdown, args=(0.1,))
    t.start()
    for _ in range(200):
        if h.executor.pending("stop"):
            break
        t.join(0.01)
    for job in h.executor.pending("stop"):
        h.executor.deliver(job)
    t.join(30)
    assert not t.is_alive()
    with pytest.raises(WorkerNotReady, match="shutting down"):
        waiting.result()
    assert h.effects.alive("a") == 0 and h.effects.alive("b") == 0


def test_the_transition_table_is_the_only_way_phases_change():
    h = harness(ONE)
    with pytest.raises(Exception, match="no transition from cold on slept"):
        h.machine._fire(h.machine._slots["a"], next(t for p, t in TRANSITIONS if t.value == "slept"))
    reachable = {to.to for to in TRANSITIONS.values()} | {Phase.COLD}
    assert reachable == set(Phase), "every phase can be reached"


def test_slow_effects_never_run_under_the_lock():
    """Real threads: while one model's stop takes its time, the others are served at once."""
    import threading
    import time

    from machine_harness import RecordingEffects

    from fma_requester.lifecycle import Lifecycle, LifecycleConfig
    from fma_requester.metrics import RequesterMetrics
    from fma_requester.registry import ModelRegistry

    gate = threading.Event()

    class SlowStop(RecordingEffects):
        def stop(self, spec, handle, grace):
            gate.wait(30)  # a worker draining its requests for a long time
            self.processes.get(spec.name, set()).discard(handle.serial)

    effects = SlowStop()
    machine = Lifecycle(ModelRegistry.from_text(TWO.replace("max_loaded: 1", "max_loaded: 2")), RequesterMetrics(),
                        effects, config=LifecycleConfig())
    try:
        machine.ensure_ready("a").done()
        releasing = threading.Thread(target=machine.release, args=("a",))
        releasing.start()
        deadline = time.monotonic() + 10
        while machine.describe("a").phase != "stopping":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        lease = machine.ensure_ready("b")
        assert machine.describe("a").phase == "stopping" and time.monotonic() - started < 1.0
        lease.done()
    finally:
        gate.set()
        releasing.join(10)
    assert machine.describe("a").phase == "cold" and effects.alive("a") == 0


def test_design_md_shows_the_transition_table_as_it_is():
    from conftest import REPO
    from fma_cli.docs import diagram_block, diagram_in

    assert diagram_in((REPO / "docs" / "design.md").read_text()) == diagram_block(), "run `make docs`"


def test_a_waiter_can_wait_a_while_and_give_up_without_leaking_its_place_or_lease():
    h = harness(ONE)
    ticket = h.machine.admit("a")
    assert h.machine.wait_for(ticket, timeout=0) is None, "not ready yet: no answer, no error"
    h.machine.abandon(ticket)
    assert h.machine.describe("a").queued == 0
    h.executor.deliver_next("start", "a")
    assert h.machine.describe("a").in_flight == 0, "nobody waits for it any more"
    late = h.machine.admit("a")
    h.machine.abandon(late)  # leased at once, then abandoned: the lease goes back
    assert h.machine.describe("a").in_flight == 0


def test_a_reloaded_models_file_adds_changes_and_removes_models_without_a_second_worker():
    from fma_common.errors import ModelNotFound
    from fma_requester.registry import ModelRegistry

    h = harness(TWO)
    ready(h, "a")
    waiting = h.machine.admit("b")  # b waits for a to go to sleep (max_loaded 1)
    changes = h.machine.reload(ModelRegistry.from_text(
        "budget: {max_loaded: 1, sleepers: 1}\nmodels:\n"
        "  - {name: a, source: 'embedded:smollm2-135m-instruct', idle_timeout: 5s}\n"
        "  - {name: c, source: 'embedded:smollm2-135m-instruct'}\n"))
    assert changes == ["changed a", "removed b", "added c"]
    with pytest.raises(ModelNotFound, match="no longer served"):
        waiting.result()
    assert [s.model for s in h.machine.list()] == ["a", "c"]
    assert h.machine._slots["a"].spec.idle_timeout == 5, "the new settings apply to the running worker"
    with pytest.raises(ModelNotFound):
        h.machine.admit("b")


def test_a_removed_model_still_holds_its_place_until_its_worker_has_stopped():
    from fma_requester.registry import ModelRegistry

    h = harness(TWO)
    ready(h, "a")
    h.machine.reload(ModelRegistry.from_text(
        "budget: {max_loaded: 1, sleepers: 1}\nmodels:\n  - {name: b, source: 'embedded:smollm2-135m-instruct'}\n"))
    h.machine.admit("b")
    assert ("start", "b") not in h.effects.calls, "a's worker is still stopping: b must wait for it"
    h.executor.deliver_next("stop", "a")
    assert h.effects.calls[-1] == ("start", "b")


def test_a_request_that_ends_after_its_model_was_removed_ends_cleanly():
    """Issue 21, defect 1: lease.done() indexed the models by name, so it raised KeyError once a reload had
    removed the model (a finished answer became a 500), and abandoning a queued request raised too."""
    from fma_requester.registry import ModelRegistry

    h = harness(TWO)
    ready(h, "a")
    lease = h.machine.admit("a").result()
    queued = h.machine.admit("b")  # b waits: a holds the only awake place
    h.machine.reload(ModelRegistry.from_text("models:\n  - {name: c, source: 'embedded:smollm2-135m-instruct'}\n"))
    lease.done()  # no KeyError: it gives back to the slot it came from
    h.machine.abandon(queued)
    h.executor.run_until_quiet()
    assert h.effects.alive("a") == 0 and "a" not in h.machine._retiring


def test_a_request_that_ends_after_its_model_was_removed_and_added_back_leaves_the_new_slot_alone():
    """Issue 21, defect 1: the old lease decremented the new slot: in_flight -1, never idle again."""
    from fma_requester.registry import ModelRegistry

    h = harness(ONE)
    ready(h, "a")
    lease = h.machine.admit("a").result()
    h.machine.reload(ModelRegistry.from_text("models:\n  - {name: b, source: 'embedded:smollm2-135m-instruct'}\n"))
    h.executor.run_until_quiet()  # a's worker stops; its slot is gone
    h.machine.reload(ModelRegistry.from_text(ONE))
    lease.done()
    assert h.machine.describe("a").in_flight == 0
    ready(h, "a")
    h.clock.advance(301)
    h.machine.tick()
    assert h.phase("a") == "stopping", "idle again: scaled to zero after its idle timeout"


def test_a_model_added_back_while_its_worker_stops_gets_the_same_slot():
    from fma_requester.registry import ModelRegistry

    h = harness(ONE)
    ready(h)
    none = ModelRegistry.from_text("models:\n  - {name: z, source: 'embedded:smollm2-135m-instruct'}\n")
    h.machine.reload(none)
    h.machine.reload(ModelRegistry.from_text(ONE))
    h.machine.admit("a")
    assert h.phase("a") == "stopping" and h.effects.calls.count(("start", "a")) == 1
    h.executor.deliver_next("stop", "a")
    assert h.effects.calls.count(("start", "a")) == 2 and h.effects.alive("a") == 1
