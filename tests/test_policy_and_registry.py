"""Pure scheduling policy and the models file."""

from __future__ import annotations

import pytest

from fma_common.settings import SettingsError
from fma_requester.policy import Budget, WorkerView, backoff_delay, excess_sleepers, idle_expired, plan_room
from fma_requester.registry import ModelRegistry

HOLDS = {"starting": "awake", "ready": "awake", "going_to_sleep": "awake", "waking": "awake", "sleeping": "asleep"}


def view(model: str, phase: str = "ready", in_flight: int = 0, waiters: int = 0, last_used: float = 0.0,
         idle_timeout: float = 60.0, memory: int = 0, asleep: int | None = None, holds: str | None = None,
         ) -> WorkerView:
    return WorkerView(model, phase, in_flight, waiters, last_used, idle_timeout,
                      holds or HOLDS.get(phase, "none"), memory, memory if asleep is None else asleep)


def test_idle_workers_past_their_timeout_are_reaped_busy_ones_never():
    workers = [view("a", last_used=0), view("b", last_used=0, in_flight=1), view("c", last_used=90),
               view("d", phase="sleeping", last_used=0), view("e", phase="cold", last_used=0),
               view("f", last_used=0, waiters=2), view("g", phase="stopping", last_used=0, holds="awake")]
    assert idle_expired(workers, now=100) == ["a", "d"]


def test_room_under_budget_needs_no_eviction():
    assert plan_room([view("a"), view("b", phase="cold")], Budget(2, 1), "b", sleep_level=2).go


def test_full_budget_puts_the_least_recently_used_idle_worker_to_sleep():
    workers = [view("a", last_used=30), view("b", last_used=10), view("c", last_used=5, in_flight=1),
               view("new", phase="cold")]
    room = plan_room(workers, Budget(3, 1), "new", sleep_level=2)
    assert not room.go and room.actions == (("b", "sleep"),)


def test_full_sleeper_budget_stops_the_victim_instead():
    workers = [view("a", last_used=1), view("z", phase="sleeping"), view("new", phase="cold")]
    assert plan_room(workers, Budget(1, 1), "new", sleep_level=2).actions == (("a", "stop"),)
    assert plan_room(workers[:1] + workers[2:], Budget(1, 1), "new", sleep_level=0).actions == (("a", "stop"),)


def test_full_budget_of_busy_workers_means_wait_and_nothing_is_evicted():
    workers = [view("a", in_flight=1), view("b", phase="starting"), view("c", last_used=0), view("new", phase="cold")]
    room = plan_room(workers, Budget(2, 2), "new", sleep_level=2)
    assert not room.go and room.actions == () and "busy" in room.reason


def test_a_worker_still_going_to_sleep_or_stopping_holds_its_place_until_done():
    for phase in ("going_to_sleep", "stopping"):
        workers = [view("a", phase=phase, holds="awake"), view("new", phase="cold")]
        room = plan_room(workers, Budget(1, 1), "new", sleep_level=2)
        assert not room.go and room.actions == () and "finish" in room.reason, phase


def test_waking_needs_only_the_difference_between_asleep_and_awake_memory():
    workers = [view("a", memory=6000, last_used=1), view("me", phase="sleeping", memory=6000, asleep=500)]
    assert plan_room(workers, Budget(5, 2, memory_mib=12000), "me", sleep_level=2).go
    assert not plan_room(workers, Budget(5, 2, memory_mib=11000), "me", sleep_level=2).go


def test_sleepers_count_against_the_memory_budget():
    workers = [view("z", phase="sleeping", memory=4000, last_used=1), view("new", phase="cold", memory=5000)]
    room = plan_room(workers, Budget(5, 2, memory_mib=8000), "new", sleep_level=2)
    assert room.actions == (("z", "stop"),), "an idle sleeper's memory is freed when nothing else fits"


def test_sleeping_frees_nothing_when_it_keeps_everything_so_the_victim_is_stopped():
    workers = [view("a", memory=3000, last_used=1), view("b", memory=3000, last_used=2),
               view("new", phase="cold", memory=3000)]
    room = plan_room(workers, Budget(5, 2, memory_mib=8000), "new", sleep_level=2)
    assert room.actions == (("a", "stop"),)
    light = [view("a", memory=3000, asleep=200, last_used=1), workers[1], workers[2]]
    assert plan_room(light, Budget(5, 2, memory_mib=8000), "new", sleep_level=2).actions == (("a", "sleep"),)


def test_models_ahead_in_line_are_counted_as_awake():
    workers = [view("x", phase="cold"), view("new", phase="cold")]
    assert plan_room(workers, Budget(1, 1), "new", sleep_level=2).go
    assert not plan_room(workers, Budget(1, 1), "new", sleep_level=2, reserved=[workers[0]]).go


def test_sleepers_over_budget_go_least_recently_used_first():
    workers = [view("a", "sleeping", last_used=3), view("b", "sleeping", last_used=1),
               view("c", "sleeping", last_used=2), view("d", "stopping", holds="asleep")]
    assert excess_sleepers(workers, sleepers=1) == ["b", "c"]
    assert excess_sleepers(workers, sleepers=5) == []


def test_a_sleeper_about_to_wake_does_not_push_another_one_out():
    workers = [view("a", "sleeping", waiters=1, last_used=0), view("b", "sleeping", last_used=5)]
    assert excess_sleepers(workers, sleepers=1) == []


def test_backoff_starts_at_the_base_doubles_and_is_capped():
    assert [backoff_delay(n, 2, 10) for n in range(5)] == [0, 2, 4, 8, 10]


def test_builtin_registry_serves_both_embedded_models_a_chat_and_an_embedding_one():
    reg = ModelRegistry.load(None)
    assert reg.names() == ["smollm2-135m-instruct", "all-minilm-l6-v2"]
    spec = reg.get("smollm2-135m-instruct")
    assert spec.idle_timeout == 300 and spec.max_queue == 64 and spec.queue_timeout == 120
    assert spec.model_kind == "chat" and not spec.preload
    embed = reg.get("all-minilm-l6-v2")
    assert embed.model_kind == "embedding" and not embed.preload and embed.knative.gpus == 0
    assert reg.resolve("sentence-transformers/all-MiniLM-L6-v2") == "all-minilm-l6-v2"
    assert reg.resolve("no-such-model") == "no-such-model"


def test_an_embedded_models_kind_is_its_own_unless_the_file_says_otherwise():
    reg = ModelRegistry.from_text("models:\n  - {name: e, source: 'embedded:all-minilm-l6-v2'}\n"
                                  "  - {name: c, source: 'embedded:smollm2-135m-instruct', kind: completion}\n")
    assert reg.get("e").model_kind == "embedding" and reg.get("c").model_kind == "completion"


@pytest.mark.parametrize("models, message", [
    ("  - {name: a, source: 'embedded:smollm2-135m-instruct', aliases: [b]}\n"
     "  - {name: b, source: 'embedded:smollm2-135m-instruct'}\n", "alias 'b' is already a model's name"),
    ("  - {name: a, source: 'embedded:smollm2-135m-instruct', aliases: [x]}\n"
     "  - {name: b, source: 'embedded:smollm2-135m-instruct', aliases: [x]}\n", "alias 'x' is already an alias of a"),
    ("  - {name: a, source: 'embedded:smollm2-135m-instruct', kind: vision}\n", "kind"),
])
def test_aliases_are_unique_across_names_and_aliases_and_kinds_are_known(models, message):
    with pytest.raises(SettingsError) as err:
        ModelRegistry.from_text("models:\n" + models)
    assert message in str(err.value)


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


def test_a_model_bigger_than_the_memory_budget_is_refused_at_start_up():
    with pytest.raises(SettingsError, match="could never start"):
        ModelRegistry.from_text("budget: {memory_mib: 1000}\n"
                                "models:\n  - {name: m, source: 'embedded:smollm2-135m-instruct', memory_mib: 2000}\n")
