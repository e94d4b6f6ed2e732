"""The batch's KV cache keeps room at its right: a decode step writes its column in place (kv_room.py).

Before, every step appended with ``torch.cat`` (transformers' ``DynamicLayer``), a copy of every layer's whole
cache per step: a third of a decode step at 16 rows x 400 columns on this CPU.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from conftest import loaded_engine
from fma_common.wire import SamplingParams
from fma_worker.engine import Engine
from fma_worker.kv_room import ROOM, RoomyLayer, ensure_room


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def kv(rows: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, columns, 8, generator=g), torch.randn(rows, 3, columns, 8, generator=g)


class FakeCache:
    def __init__(self, layers: list) -> None:
        self.layers = layers


def test_a_roomy_layer_holds_what_a_plain_one_holds_and_writes_each_step_in_place():
    keys, values = kv(4, 10, 0)
    plain = DynamicLayer()
    plain.update(keys, values)
    roomy = RoomyLayer.around(keys, values, capacity=16)
    where = storage(roomy.keys)
    for step in range(6):
        k, v = kv(4, 1, 100 + step)
        want = plain.update(k, v)
        got = roomy.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert storage(roomy.keys) == where, "a step within the room copied the cache"
    assert roomy.free() == 0
    k, v = kv(4, 1, 200)  # past the room: appended, as a plain layer does, never lost
    want, got = plain.update(k, v), roomy.update(k, v)
    assert torch.equal(got[0], want[0]) and storage(roomy.keys) != where


def test_selecting_rows_and_trimming_padding_keep_the_room_and_the_values():
    keys, values = kv(5, 12, 1)
    roomy = RoomyLayer.around(keys, values, capacity=20)
    roomy.trim_left(3)
    assert torch.equal(roomy.keys, keys[:, :, 3:])
    assert roomy.capacity == 17 and roomy.free() == 8
    index = torch.tensor([0, 2, 4])
    roomy.select_rows(index)
    assert torch.equal(roomy.keys, keys[:, :, 3:].index_select(0, index))
    assert torch.equal(roomy.values, values[:, :, 3:].index_select(0, index))
    assert roomy.free() == 8
    k, v = kv(3, 1, 7)
    roomy.update(k, v)
    assert torch.equal(roomy.keys[:, :, -1:], k)


def test_trimming_the_left_copies_nothing():
    keys, values = kv(2, 12, 2)
    roomy = RoomyLayer.around(keys, values, capacity=20)
    before = storage(roomy.keys)
    roomy.trim_left(5)
    assert storage(roomy.keys) == before and roomy.keys.shape[-2] == 7


def test_a_layer_whose_keys_were_replaced_appends_until_ensure_room_gives_it_room_again_within_reach():
    keys, values = kv(2, 10, 3)
    roomy = RoomyLayer.around(keys, values, capacity=12)
    roomy.keys, roomy.values = keys[:, :, 1:], values[:, :, 1:]  # surgery elsewhere (a join) replaced them
    assert roomy.free() == 0
    k, v = kv(2, 1, 4)
    out = roomy.update(k, v)
    assert torch.equal(out[0], torch.cat([keys[:, :, 1:], k], dim=-2))
    cache = FakeCache([roomy, DynamicLayer()])  # an uninitialised layer is left alone
    assert ensure_room(cache, lambda: 14) == 14, "room never reaches past what the batch can grow to"
    assert isinstance(cache.layers[0], RoomyLayer) and cache.layers[0].free() == 14 - 10
    assert type(cache.layers[1]) is DynamicLayer
    cache = FakeCache([cache.layers[0]])
    plain = DynamicLayer()
    plain.update(*kv(2, 10, 5))
    cache.layers.append(plain)
    assert ensure_room(cache, lambda: 1000) == 10 + ROOM


def test_a_sliding_window_layer_is_left_to_transformers():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    layer = DynamicSlidingWindowLayer(sliding_window=4)
    layer.update(*kv(1, 3, 6))
    cache = FakeCache([layer])
    assert ensure_room(cache, lambda: 100) == 0 and cache.layers[0] is layer


@pytest.fixture(scope="module")
def engine(converted_model_dir: Path):
    with loaded_engine(converted_model_dir) as eng:
        yield eng


def test_a_steady_batchs_decode_steps_write_the_cache_in_place(engine: Engine):
    """Two requests decoding side by side for 40 steps: the cache's storage changes only when the room runs
    out (every ``ROOM`` steps), not on every step as ``torch.cat`` made it."""
    where: list[tuple[int, int]] = []
    engine.batcher._on_step = lambda rows: where.append(
        (rows, storage(engine.batcher._cache.layers[0].keys)))
    params = SamplingParams(max_tokens=40, temperature=0.0, logit_bias={2: -100.0})
    ids = engine.encode("The capital of France is")
    start = threading.Barrier(2)
    texts: list[int] = []

    def one() -> None:
        start.wait()
        texts.append(sum(len(step) for step in engine.generate(ids, params)))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    engine.batcher._on_step = lambda rows: None
    assert texts == [40, 40]
    steady = [ptr for rows, ptr in where if rows == 2]
    assert len(steady) >= 30, where
    moves = sum(1 for a, b in itertools.pairwise(steady) if a != b)
    assert moves <= len(steady) // ROOM + 1, f"the cache was copied on {moves} of {len(steady)} steps"


def test_a_row_that_ends_at_its_first_token_leaves_no_padding_behind_in_the_batch(engine: Engine):
    """Prefilled together, a long prompt asking for one token and a short one asking for 20: the long one ends
    in the prefill; the short one's cache must then be as wide as itself, not as the long prompt (padding kept
    there would be copied and attended over on every step, and the room measured from the wrong width)."""
    long_ids = engine.encode("The history of the Roman empire " * 20)
    short_ids = engine.encode("Hi")
    assert len(long_ids) > 60 and len(long_ids) + len(short_ids) < engine.batcher.prefill_chunk
    widths: list[tuple[int, int]] = []
    engine.batcher._on_step = lambda rows: widths.append((rows, int(engine.batcher._mask.shape[1])))
    engine.batcher.prefill_chunk, chunk = 4096, engine.batcher.prefill_chunk
    start = threading.Barrier(2)
    done: list[int] = []

    def one(ids: list[int], n: int) -> None:
        start.wait()
        done.append(sum(len(step) for step in engine.generate(ids, SamplingParams(max_tokens=n, temperature=0.0,
                                                                                  logit_bias={2: -100.0}))))

    threads = [threading.Thread(target=one, args=(long_ids, 1)), threading.Thread(target=one, args=(short_ids, 20))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    engine.batcher._on_step = lambda rows: None
    engine.batcher.prefill_chunk = chunk
    assert sorted(done) == [1, 20]
    alone = [w for rows, w in widths if rows == 1]
    assert alone and alone[0] <= len(short_ids) + 2, f"the short row kept {alone[0]} columns: {widths[:3]}"
