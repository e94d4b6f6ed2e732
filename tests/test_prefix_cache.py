"""The prefix cache: kept prompts, what a new prompt takes from them, and the real model answering the same
with a hit as without one."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from conftest import loaded_engine
from fma_common.wire import SamplingParams
from fma_worker.engine import Engine
from fma_worker.prefix_cache import PrefixStore, cache_from, cache_from_rows, shared_length, usable_hit

# ---- the store, on small tensors ------------------------------------------------------------------------------


def kv(tokens: list[int], layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values whose every column holds its token id, so a slice can be checked by eye."""
    col = torch.tensor(tokens, dtype=torch.float32)[None, None, :, None].expand(1, 2, len(tokens), 4)
    return [(col.clone() + i, col.clone() - i) for i in range(layers)]


OWNER = object()
BASE = list(range(100, 140))  # 40 tokens: a "system prompt"


def test_shared_length_and_the_hit_a_prompt_may_take():
    assert shared_length([1, 2, 3], [1, 2, 4]) == 2
    assert shared_length([1, 2], [1, 2, 3]) == 2
    assert shared_length([], [1]) == 0
    assert usable_hit(40, 60) == 40
    assert usable_hit(60, 60) == 59, "the prompt's last token is always computed: its logits are the answer"
    assert usable_hit(15, 60) == 0, "below the minimum a pass of its own costs more than it saves"


def test_a_new_prompt_takes_the_longest_beginning_any_kept_prompt_shares_with_it():
    store = PrefixStore(budget=1000)
    store.remember(OWNER, [*BASE, 1, 2, 3], kv([*BASE, 1, 2, 3]))
    store.remember(OWNER, BASE[:20] + [9] * 30, kv(BASE[:20] + [9] * 30))
    hit = store.match([*BASE, 1, 2, 7, 7])
    assert hit is not None and hit.length == 42
    cache = cache_from(hit)
    assert len(cache.layers) == 2
    keys = cache.layers[1].keys
    assert keys.shape == (1, 2, 42, 4) and keys[0, 0, :, 0].tolist() == [t + 1 for t in [*BASE, 1, 2]]
    assert store.match([5] * 50) is None
    assert store.match(BASE[:10] + [0] * 40) is None, "10 shared tokens are below the minimum"


def test_entries_answer_only_for_the_model_object_that_computed_them():
    store = PrefixStore(budget=1000)
    store.remember(OWNER, [*BASE, 1], kv([*BASE, 1]))
    assert store.owned_by(OWNER) and not store.owned_by(object())
    other = object()
    store.remember(other, [*BASE, 2], kv([*BASE, 2]))  # weights loaded again: the old entries go
    assert store.entries == 1 and store.owned_by(other)


def test_a_prompt_held_already_is_not_kept_twice_and_a_longer_one_replaces_its_beginning():
    store = PrefixStore(budget=1000)
    store.remember(OWNER, [*BASE, 1, 2], kv([*BASE, 1, 2]))
    store.remember(OWNER, [*BASE, 1], kv([*BASE, 1]))  # a beginning of the first
    assert (store.entries, store.tokens) == (1, 42)
    store.remember(OWNER, [*BASE, 1, 2, 3, 4], kv([*BASE, 1, 2, 3, 4]))  # the next turn of a conversation
    assert (store.entries, store.tokens) == (1, 44)


def test_the_store_keeps_to_its_budget_least_recently_used_out_first():
    store = PrefixStore(budget=100)
    a, b, c = [*BASE, 1], [7] * 41, [8] * 41
    store.remember(OWNER, a, kv(a))
    store.remember(OWNER, b, kv(b))
    assert store.match([*a, 5]) is not None  # a used again: b is now the least recently used
    store.remember(OWNER, c, kv(c))
    assert store.tokens <= 100
    assert store.match([*b, 5]) is None and store.match([*a, 5]) is not None and store.match([*c, 5]) is not None


def test_a_prompt_longer_than_the_budget_keeps_its_beginning_and_none_is_kept_at_zero():
    store = PrefixStore(budget=30)
    store.remember(OWNER, BASE, kv(BASE))
    assert store.tokens == 30
    hit = store.match([*BASE, 1])
    assert hit is not None and hit.length == 30 and cache_from(hit).layers[0].keys.shape[2] == 30
    off = PrefixStore(budget=0)
    off.remember(OWNER, BASE, kv(BASE))
    assert off.entries == 0 and off.match([*BASE, 1]) is None


# ---- the real model -------------------------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "You are a careful assistant for a travel company. Answer briefly, in "
          "plain words, and say so when you do not know. " * 4}


@pytest.fixture(scope="module")
def engine(converted_model_dir: Path):
    with loaded_engine(converted_model_dir) as eng:
        yield eng


def hit_tokens(engine: Engine) -> float:
    return engine.metrics.registry.get_sample_value("fma_worker_prefix_cache_hit_tokens_total",
                                                    {"model": "smollm2-135m-instruct"}) or 0.0


def answer(engine: Engine, messages: list[dict], max_tokens: int = 16) -> str:
    text = ""
    for step in engine.generate(engine.render_chat(messages), SamplingParams(max_tokens=max_tokens, temperature=0.0)):
        text += "".join(d.text for d in step)
    return text


def without_cache(engine: Engine, messages: list[dict]) -> str:
    store = engine.batcher.prefixes
    budget, store.budget = store.budget, 0
    try:
        return answer(engine, messages)
    finally:
        store.budget = budget


def assert_kept_as_prefilled_alone(engine: Engine, prompts: list[list[int]]) -> None:
    """Each prompt is kept whole (as itself or the beginning of a longer entry), and its keys and values equal
    those of the prompt prefilled alone."""
    store = engine.batcher.prefixes
    lm = engine._loaded()
    for prompt in prompts:
        hit = store.match([*prompt, 0])
        assert hit is not None and hit.length == len(prompt)
        with torch.inference_mode():
            out = lm.model(input_ids=torch.tensor([prompt]), use_cache=True)
        for (keys, values), layer in zip(hit.entry.layers, getattr(out, lm.cache_kw).layers, strict=True):
            assert keys[:, :, :len(prompt)].shape == layer.keys.shape
            assert torch.allclose(keys[:, :, :len(prompt)].float(), layer.keys.float(), atol=2e-2, rtol=1e-2)
            assert torch.allclose(values[:, :, :len(prompt)].float(), layer.values.float(), atol=2e-2, rtol=1e-2)


def test_a_shared_system_prompt_is_computed_once_and_the_answers_match_those_without_the_cache(engine: Engine):
    engine.batcher.prefixes.forget()
    questions = ["What is the capital of France?", "Name three rivers in Germany.", "Is Rome far from Naples?"]
    chats = [[SYSTEM, {"role": "user", "content": q}] for q in questions]
    before = hit_tokens(engine)
    with_hits = [answer(engine, chat) for chat in chats]
    system_tokens = len(engine.render_chat([SYSTEM]))
    taken = hit_tokens(engine) - before
    assert taken >= 2 * (system_tokens - 4), "the second and third prompts began from the first one's columns"
    assert with_hits == [without_cache(engine, chat) for chat in chats]


def test_the_next_turn_of_a_conversation_takes_the_whole_previous_prompt(engine: Engine):
    engine.batcher.prefixes.forget()
    turn1 = [SYSTEM, {"role": "user", "content": "Suggest a city for a weekend trip."}]
    reply = answer(engine, turn1)
    turn2 = [*turn1, {"role": "assistant", "content": reply}, {"role": "user", "content": "Why that one?"}]
    before = hit_tokens(engine)
    second = answer(engine, turn2)
    assert hit_tokens(engine) - before >= len(engine.render_chat(turn1))
    assert second == without_cache(engine, turn2)


def test_a_hit_joins_a_running_batch_and_answers_as_alone(engine: Engine):
    engine.batcher.prefixes.forget()
    first = [SYSTEM, {"role": "user", "content": "Tell me about trains in Europe."}]
    answer(engine, first, 4)  # kept now
    later = [SYSTEM, {"role": "user", "content": "And buses?"}]
    alone = without_cache(engine, later)
    long_running = engine.generate(engine.encode("Once upon a time"),
                                   SamplingParams(max_tokens=40, temperature=0.0))
    it = iter(long_running)
    next(it)  # running in the batch now
    before = hit_tokens(engine)
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(answer(engine, later)))
    t.start()
    for _ in it:  # the running request goes on while the hit is prefilled and joins
        pass
    t.join(60)
    assert hit_tokens(engine) > before
    assert result == [alone]


def test_sleep_gives_the_kept_prompts_back(engine: Engine):
    answer(engine, [SYSTEM, {"role": "user", "content": "Hello"}], 2)
    assert engine.batcher.prefixes.entries >= 1
    engine.sleep(1)
    try:
        assert engine.batcher.prefixes.entries == 0
    finally:
        engine.wake()
    before = hit_tokens(engine)
    answer(engine, [SYSTEM, {"role": "user", "content": "Hello again"}], 2)
    assert hit_tokens(engine) == before, "nothing kept from before the sleep is used"


def test_prompts_prefilled_together_are_kept_with_their_own_columns(engine: Engine, prefill_path: str):
    """A group, ragged or left-padded: each row's prompt is its last len(prompt) columns; kept, they must equal the
    keys and values of the prompt prefilled alone."""
    engine.batcher.prefixes.forget()
    prompts = [engine.render_chat([{"role": "user", "content": q}]) for q in
               ("Hi", "Tell me about the rivers of Germany and France, please.", "What is the capital of Italy?")]
    assert len({len(p) for p in prompts}) == 3 and 3 * max(len(p) for p in prompts) <= engine.settings.prefill_chunk
    params = SamplingParams(max_tokens=2, temperature=0.0)
    with engine.batcher._cond:  # all three wait before the scheduler looks: one group, one pass
        streams = [engine.generate(p, params) for p in prompts]
    for s in streams:
        list(s)
    store = engine.batcher.prefixes
    assert store.entries == 3
    assert_kept_as_prefilled_alone(engine, prompts)


def test_a_group_start_cache_holds_each_hit_right_aligned_behind_zeros():
    store = PrefixStore(1000)
    store.remember(OWNER, BASE, kv(BASE))
    store.remember(OWNER, [7] * 20, kv([7] * 20))
    long_hit, short_hit = store.match([*BASE, 1]), store.match([*[7] * 20, 1])
    cache, width = cache_from_rows(torch, [short_hit, None, long_hit])
    assert width == 40
    keys = cache.layers[0].keys
    assert keys.shape == (3, 2, 40, 4)
    assert keys[0, 0, :, 0].tolist() == [0.0] * 20 + [7.0] * 20
    assert keys[1].abs().sum() == 0
    assert keys[2, 0, :, 0].tolist() == [float(t) for t in BASE]
    assert cache_from_rows(torch, [None, None]) == (None, 0)


# ---- hits prefilled together -----------------------------------------------------------------------------------


def mixed_hit_group(engine: Engine) -> list[list[int]]:
    """Five prompts that, once a conversation turn and a question without our system prompt are kept, begin as
    kept prompts for different lengths, from two entries, or not at all: the whole turn, a shorter hit in the
    same entry, a hit in the other entry (the template's own system prompt), none (plain text), and the same
    shorter hit again. Padded, rows with a shorter hit and a shorter rest than the longest have a gap; ragged,
    rows share an entry's columns as far as each one's hit."""
    engine.batcher.prefixes.forget()
    turn1 = [SYSTEM, {"role": "user", "content": "Suggest a city for a weekend trip."}]
    reply = answer(engine, turn1, 8)  # kept now
    answer(engine, [{"role": "user", "content": "Tell me a joke."}], 2)  # kept: the template's system prompt
    chats = [[*turn1, {"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}],
             [SYSTEM, {"role": "user", "content": "Name a river."}],
             [{"role": "user", "content": "Say hello to my friend from Lisbon, who is visiting."}],
             None,
             [SYSTEM, {"role": "user", "content": "Name a mountain in Spain, and how high it is."}]]
    return [engine.render_chat(chat) if chat else engine.encode(
        "Once upon a time, in a small village by the sea, there lived an old fisherman and his clever daughter.")
            for chat in chats]


def prefill_together(engine: Engine, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch,
                     params: SamplingParams) -> tuple[list[dict[int, str]], list[int]]:
    """The prompts submitted while the scheduler waits, so it finds them all at once; each one's text per choice,
    and the size of every group the scheduler prefilled."""
    groups: list[int] = []
    prefill = engine.batcher._prefill

    def counted(lm, group):
        groups.append(len(group))
        return prefill(lm, group)

    with monkeypatch.context() as patched:
        patched.setattr(engine.batcher, "_prefill", counted)
        with engine.batcher._cond:
            streams = [engine.generate(p, params) for p in prompts]
        texts = []
        for stream in streams:
            text: dict[int, str] = {}
            for step in stream:
                for d in step:
                    text[d.index] = text.get(d.index, "") + d.text
            texts.append(text)
    return texts, groups


@pytest.fixture(params=["ragged", "padded"])
def prefill_path(request: pytest.FixtureRequest, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a group is prefilled: as one sequence under a block mask (what this model does), and as
    left-padded rows (what a model with a sliding window or a flash-attention kernel does)."""
    monkeypatch.setattr(engine._loaded(), "ragged_prefill", request.param == "ragged")
    return request.param


def test_prompts_beginning_as_kept_prompts_are_prefilled_together_and_answer_as_without_the_cache(
        engine: Engine, monkeypatch: pytest.MonkeyPatch, prefill_path: str):
    prompts = mixed_hit_group(engine)
    store = engine.batcher.prefixes
    hits = [store.match(p) for p in prompts]
    assert hits[0].length > hits[1].length > 0 and hits[4].length == hits[1].length and hits[3] is None
    assert hits[2] is not None and hits[2].entry is not hits[0].entry and hits[1].entry is hits[0].entry
    rests = [len(p) - (h.length if h else 0) for p, h in zip(prompts, hits, strict=True)]
    assert len(rests) * max(rests) <= engine.settings.prefill_chunk, "one padded pass"
    before = hit_tokens(engine)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    texts, groups = prefill_together(engine, prompts, monkeypatch, params)
    assert groups == [5], "one pass for all five, hits and the prompt without one"
    assert hit_tokens(engine) - before == sum(h.length for h in hits if h is not None)
    budget, store.budget = store.budget, 0
    try:
        alone = ["".join(d.text for step in engine.generate(p, params) for d in step) for p in prompts]
    finally:
        store.budget = budget
    assert [t[0] for t in texts] == alone


def test_a_group_mixing_hits_keeps_each_prompt_with_its_own_columns(engine: Engine, monkeypatch: pytest.MonkeyPatch,
                                                                    prefill_path: str):
    """After the pass each row's columns are gathered, right-aligned, in order: from the one sequence (ragged), or
    closing the gap between a short hit and a short rest (padded). Kept, every prompt's keys and values must equal
    those of the prompt prefilled alone (they do not when a gap is left in, or columns are taken out of order)."""
    prompts = mixed_hit_group(engine)
    _texts, groups = prefill_together(engine, prompts, monkeypatch, SamplingParams(max_tokens=1, temperature=0.0))
    assert groups == [5]
    assert_kept_as_prefilled_alone(engine, prompts)


def test_n_seeded_choices_from_a_hit_sample_as_without_the_cache(engine: Engine, monkeypatch: pytest.MonkeyPatch):
    engine.batcher.prefixes.forget()
    answer(engine, [SYSTEM, {"role": "user", "content": "Hello"}], 2)
    prompt = engine.render_chat([SYSTEM, {"role": "user", "content": "Write a line about the sea."}])
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=11, n=2)
    before = hit_tokens(engine)
    with_hit, _ = prefill_together(engine, [prompt], monkeypatch, params)
    assert hit_tokens(engine) > before
    store = engine.batcher.prefixes
    budget, store.budget = store.budget, 0
    try:
        without, _ = prefill_together(engine, [prompt], monkeypatch, params)
    finally:
        store.budget = budget
    assert with_hit == without and len(with_hit[0]) == 2
