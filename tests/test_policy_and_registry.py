"""Pure scheduling policy and the models file."""

from __future__ import annotations

import pytest

from fma_common.settings import SettingsError
from fma_requester.policy import WorkerView, backoff_delay, excess_sleepers, idle_expired, pick_eviction
from fma_requester.registry import ModelRegistry


def view(model: str, state: str = "ready", in_flight: int = 0, waiters: int = 0, last_used: float = 0.0,
         idle_timeout: float = 60.0) -> WorkerView:
    return WorkerView(model, state, in_flight, waiters, last_used, idle_timeout)


def test_idle_workers_past_their_timeout_are_reaped_busy_ones_never():
    workers = [view("a", last_used=0), view("b", last_used=0, in_flight=1), view("c", last_used=90),
               view("d", state="sleeping", last_used=0), view("e", state="cold", last_used=0),
               view("f", last_used=0, waiters=2)]
    assert idle_expired(workers, now=100) == ["a", "d"]


def test_room_under_budget_needs_no_eviction():
    assert pick_eviction([view("a"), view("b", state="cold")], max_loaded=2, exclude="b") is True


def test_full_budget_evicts_the_least_recently_used_idle_worker():
    workers = [view("a", last_used=30), view("b", last_used=10), view("c", last_used=5, in_flight=1),
               view("new", state="cold")]
    assert pick_eviction(workers, max_loaded=3, exclude="new") == "b"


def test_full_budget_of_busy_workers_means_wait():
    workers = [view("a", in_flight=1), view("b", state="starting"), view("new", state="cold")]
    assert pick_eviction(workers, max_loaded=2, exclude="new") is None


def test_sleepers_over_budget_go_least_recently_used_first():
    workers = [view("a", "sleeping", last_used=3), view("b", "sleeping", last_used=1),
               view("c", "sleeping", last_used=2)]
    assert excess_sleepers(workers, sleepers=1) == ["b", "c"]
    assert excess_sleepers(workers, sleepers=5) == []


def test_backoff_doubles_and_is_capped():
    assert [backoff_delay(n, 2, 10) for n in range(5)] == [0, 2, 4, 8, 10]


def test_builtin_registry_serves_the_embedded_model():
    reg = ModelRegistry.load(None)
    assert reg.names() == ["smollm2-135m-instruct"]
    spec = reg.get("smollm2-135m-instruct")
    assert spec.idle_timeout == 300 and spec.max_queue == 64 and spec.queue_timeout == 120


def test_model_values_override_defaults():
    reg = ModelRegistry.from_text(
        "defaults: {idle_timeout: 5m, max_queue: 8}\n"
        "models:\n  - {name: m, source: 'embedded:smollm2-135m-instruct', idle_timeout: 30s}\n")
    spec = reg.get("m")
    assert spec.idle_timeout == 30 and spec.max_queue == 8


@pytest.mark.parametrize("text, message", [
    ("models: []", "models"),
    ("models:\n  - {name: m, source: 'nowhere'}", "source"),
    ("models:\n  - {name: m, source: 'embedded:smollm2-135m-instruct', idle_timeout: soon}", "idle_timeout"),
    ("models:\n  - {name: m, source: 'embedded:smollm2-135m-instruct', colour: red}", "colour"),
    ("models:\n  - {name: m, source: 'embedded:smollm2-135m-instruct'}\n"
     "  - {name: m, source: 'embedded:smollm2-135m-instruct'}", "unique"),
    ("[1, 2", "YAML"),
])
def test_bad_models_files_name_the_problem(text, message):
    with pytest.raises(SettingsError, match=message):
        ModelRegistry.from_text(text, "models.yaml")


def test_memory_budget_evicts_until_the_new_model_fits():
    workers = [view("a", last_used=1), view("b", last_used=2), view("new", state="cold")]
    sized = [WorkerView(w.model, w.state, 0, 0, w.last_used, 60, 3000) for w in workers]
    # 2 x 3000 awake + 3000 needed > 8000: the least recently used goes first
    assert pick_eviction(sized, max_loaded=5, exclude="new", memory_budget_mib=8000, need_mib=3000) == "a"
    after = [sized[0].__class__("a", "sleeping", 0, 0, 1, 60, 3000), sized[1], sized[2]]
    assert pick_eviction(after, max_loaded=5, exclude="new", memory_budget_mib=8000, need_mib=3000) is True
