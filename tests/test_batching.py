"""Continuous batching on the real embedded model, in process: alone and batched must agree.

Each test runs requests one at a time, then the same requests at once (threads,
as gunicorn's would), and compares. The batcher's step hook records how many
rows each forward pass carried, so a test knows the requests did share steps.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from conftest import loaded_engine, wait_for
from fma_common.wire import SamplingParams
from fma_worker.engine import Engine
from fma_worker.text import StopTextTracker

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):",
           "A long, long time ago, in a galaxy far away, there was a small planet whose people"]


@pytest.fixture(scope="module")
def engine(converted_model_dir: Path):
    with loaded_engine(converted_model_dir, FMA_PREFILL_CHUNK="8") as eng:
        yield eng


def run(engine: Engine, prompt: str, params: SamplingParams, *, close_after: int | None = None) -> list[str]:
    texts = [""] * params.n
    stream = engine.generate(engine.encode(prompt), params)
    for i, step in enumerate(stream):
        for d in step:
            texts[d.index] += d.text
        if close_after is not None and i + 1 >= close_after:
            stream.close()
            break
    return texts


def together(engine: Engine, jobs: list[tuple[str, SamplingParams]], *,
             errors_too: bool = False) -> tuple[list[list[str]], int]:
    """Run every job at once; the answers (an exception where one failed, with ``errors_too``), and the most
    rows one step carried."""
    widest = [0]
    engine.batcher._on_step = lambda rows: widest.__setitem__(0, max(widest[0], rows))
    results: list[list[str] | BaseException] = [[] for _ in jobs]
    start = threading.Barrier(len(jobs))

    def one(i: int) -> None:
        start.wait()
        try:
            results[i] = run(engine, *jobs[i])
        except BaseException as exc:  # surfaced below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    engine.batcher._on_step = lambda rows: None
    for r in results:
        if isinstance(r, BaseException) and not errors_too:
            raise r
    return results, widest[0]  # type: ignore[return-value]


def test_greedy_text_is_the_same_alone_and_batched(engine: Engine):
    params = SamplingParams(max_tokens=24, temperature=0.0)
    alone = [run(engine, p, params) for p in PROMPTS]
    batched, widest = together(engine, [(p, params) for p in PROMPTS])
    assert widest >= 3, "the requests shared forward passes"
    assert batched == alone


def test_each_request_keeps_its_own_parameters_in_one_batch(engine: Engine):
    jobs = [
        ("Once upon a time", SamplingParams(max_tokens=40, temperature=0.0, stop=(",",))),
        ("The capital of France is", SamplingParams(max_tokens=3, temperature=0.0)),
        ("def fibonacci(n):", SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=1234)),
        ("A small planet", SamplingParams(max_tokens=16, temperature=1.0, seed=7, n=3)),
        ("Hello", SamplingParams(max_tokens=12, temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5,
                                 logit_bias={11: -100.0})),
    ]
    alone = [run(engine, p, params) for p, params in jobs]
    batched, widest = together(engine, jobs)
    assert widest >= 4
    assert batched == alone, "stop, max_tokens, seeds, n and penalties each honoured, batched or not"
    assert "," not in batched[0][0]
    assert len(engine.encode(batched[1][0])) <= 4
    assert len(set(batched[3])) > 1, "n=3 sampled choices differ"
    assert "," not in "".join(batched[4]), "logit_bias -100 on ',' keeps it out"


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(engine: Engine):
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)  # ~60 tokens, chunk is 8
    params = SamplingParams(max_tokens=16, temperature=0.0)
    alone = [run(engine, p, params) for p in (long_prompt, "Once upon a time")]
    batched, _ = together(engine, [(long_prompt, params), ("Once upon a time", params)])
    assert batched == alone


def test_a_client_that_leaves_frees_its_rows_at_the_next_step(engine: Engine):
    params = SamplingParams(max_tokens=200, temperature=0.0)
    run(engine, "Tell me a story", params, close_after=2)
    wait_for(lambda: engine.batcher.rows == 0, 5, "the rows of a stream closed after two steps to go")


def test_a_request_that_fails_fails_alone(engine: Engine, monkeypatch: pytest.MonkeyPatch):
    original = StopTextTracker.push

    def push(self, piece, *, final=False):
        if "BOOM" in self.stops:
            raise RuntimeError("a broken stop tracker")
        return original(self, piece, final=final)

    monkeypatch.setattr(StopTextTracker, "push", push)
    good = SamplingParams(max_tokens=24, temperature=0.0)
    expected = run(engine, "Once upon a time", good)
    outcome: dict[str, object] = {}

    def bad() -> None:
        try:
            run(engine, "The capital of France is", SamplingParams(max_tokens=24, temperature=0.0, stop=("BOOM",)))
        except Exception as exc:
            outcome["bad"] = exc

    t = threading.Thread(target=bad)
    t.start()
    assert run(engine, "Once upon a time", good) == expected
    t.join(60)
    assert "generation failed" in str(outcome["bad"])
    assert engine.batcher.alive
    wait_for(lambda: engine.batcher.rows == 0, 5, "the batch to empty")


def test_weights_mapped_from_the_file_answer_like_from_pretrained(engine: Engine, converted_model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    assert "skeleton" in engine.last_load.phases, "the CPU load mapped the safetensors file (no from_pretrained)"
    reference = AutoModelForCausalLM.from_pretrained(str(converted_model_dir), dtype=torch.float32).eval()
    ids = engine.encode("Once upon a time")
    with torch.inference_mode():
        want = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    got = run(engine, "Once upon a time", SamplingParams(max_tokens=16, temperature=0.0))[0]
    assert got == engine.decode(want)
    for (name, a), (_, b) in zip(engine._model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert engine._model.generation_config.to_dict() == reference.generation_config.to_dict()


MIXED = [  # prompt lengths from a few tokens to ~70, max_tokens from 3 to 40: rows leave at different steps
    ("Hi", 3),
    ("The capital of France is", 8),
    (" ".join(["The quick brown fox jumps over the lazy dog."] * 7), 24),
    ("def fibonacci(n):", 40),
    ("Once upon a time, in a small village by the sea, there lived an old fisherman who", 12),
]


@pytest.fixture(scope="module")
def reference(converted_model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(converted_model_dir), dtype=torch.float32).eval()


def test_mixed_lengths_in_one_batch_match_generate_greedy(engine: Engine, reference):
    """Issue 21: a long row beside short ones and rows leaving early, all in one batch, give what transformers'
    generate gives each prompt alone (greedy), not only what the same batcher gives alone."""
    import torch

    jobs = [(p, SamplingParams(max_tokens=m, temperature=0.0, logit_bias={2: -100.0})) for p, m in MIXED]
    batched, widest = together(engine, jobs)
    assert widest >= 3, "the requests shared forward passes (the shortest may be gone before the longest joins)"
    for (prompt, max_tokens), (text,) in zip(MIXED, batched, strict=True):
        ids = engine.encode(prompt)
        with torch.inference_mode():
            out = reference.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                     suppress_tokens=[2])[0, len(ids):].tolist()
        assert text == engine.decode(out), (prompt[:30], max_tokens)


@pytest.mark.slow
def test_mixed_lengths_seeded_sampling_is_the_same_batched_as_alone(engine: Engine):
    jobs = [(p, SamplingParams(max_tokens=m, temperature=0.8, top_p=0.9, seed=100 + i, n=1 + i % 2))
            for i, (p, m) in enumerate(MIXED)]
    alone = [run(engine, p, params) for p, params in jobs]
    batched, widest = together(engine, jobs)
    assert widest >= 3
    assert batched == alone


def test_a_row_failing_mid_batch_leaves_the_others_as_generate_has_them(engine: Engine, reference,
                                                                       monkeypatch: pytest.MonkeyPatch):
    import torch

    original = StopTextTracker.push
    pushed: dict[int, int] = {}

    def push(self, piece, *, final=False):
        if "BOOM" in self.stops:
            pushed[id(self)] = pushed.get(id(self), 0) + 1
            if pushed[id(self)] > 5:  # fails after a few steps, while the others run
                raise RuntimeError("a broken stop tracker")
        return original(self, piece, final=final)

    monkeypatch.setattr(StopTextTracker, "push", push)
    jobs = [(p, SamplingParams(max_tokens=m, temperature=0.0, logit_bias={2: -100.0})) for p, m in MIXED[1:4]]
    jobs.append(("Tell me a story", SamplingParams(max_tokens=30, temperature=0.0, stop=("BOOM",))))
    results, _ = together(engine, jobs, errors_too=True)
    assert isinstance(results[-1], Exception) and "generation failed" in str(results[-1])
    for (prompt, max_tokens), (text,) in zip(MIXED[1:4], results[:-1], strict=True):
        ids = engine.encode(prompt)
        with torch.inference_mode():
            out = reference.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                     suppress_tokens=[2])[0, len(ids):].tolist()
        assert text == engine.decode(out), prompt[:30]
    wait_for(lambda: engine.batcher.rows == 0, 5, "the batch to empty")


@pytest.mark.parametrize("budget", [8, 64])
def test_a_burst_of_prompts_is_prefilled_up_to_the_budget_before_running_rows_decode_again(
        engine: Engine, monkeypatch: pytest.MonkeyPatch, budget: int):
    """FMA_PREFILL_BUDGET: the default (one chunk) lets the running rows decode between each waiting prompt's
    prefill; a larger budget prefills the whole burst first (a lower time to first token for its last prompt,
    a longer gap for the running rows), and the answers are the same either way."""
    batcher = engine.batcher
    burst = ["The capital of France is", "Write a haiku about the sea", "def fibonacci(n):"]
    assert all(5 <= len(engine.encode(p)) <= 8 for p in burst), "each prompt its own group (chunk 8), none chunked"
    params = SamplingParams(max_tokens=6, temperature=0.0)
    want = [run(engine, p, params) for p in burst]
    events: list[str] = []
    armed, holding = threading.Event(), threading.Event()
    real_prefill, real_decode = batcher._prefill, batcher._decode

    def prefill(lm, group):
        events.append("prefill")
        real_prefill(lm, group)

    def decode(lm):
        if armed.is_set():  # the running row's step: hold it until the whole burst waits
            holding.set()
            wait_for(lambda: len(batcher._pending) == len(burst), 30, "the burst never arrived")
            armed.clear()
            events.append("burst")
        events.append("decode")
        real_decode(lm)

    monkeypatch.setattr(batcher, "_prefill", prefill)
    monkeypatch.setattr(batcher, "_decode", decode)
    monkeypatch.setattr(batcher, "prefill_budget", budget)
    never_stops = SamplingParams(max_tokens=40, temperature=0.0, logit_bias={2: -100.0})
    running = threading.Thread(target=run, args=(engine, "Tell me a story", never_stops))
    armed.set()
    running.start()
    assert holding.wait(60), "the running request never reached its first decode step"
    got: dict[int, list[str]] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, run(engine, burst[i], params)))
               for i in range(len(burst))]
    for t in threads:
        t.start()
    for t in [*threads, running]:
        t.join(120)
    after = events[events.index("burst") + 2:]  # what followed the held step
    if budget >= sum(len(engine.encode(p)) for p in burst):
        assert after[:len(burst) + 1] == ["prefill"] * len(burst) + ["decode"], after[:8]
    else:
        assert after[:2 * len(burst)] == ["prefill", "decode"] * len(burst), after[:8]
    assert [got[i] for i in range(len(burst))] == want


def test_a_long_prompt_whose_chunk_fails_leaves_the_queue_and_the_request_behind_it_is_served(
        engine: Engine, monkeypatch: pytest.MonkeyPatch):
    """A failed chunk used to leave its request at the queue's head: retried at every step, forever, with every
    request behind it waiting (first in, first out)."""
    params = SamplingParams(max_tokens=8, temperature=0.0)
    expected = run(engine, "Once upon a time", params)
    # An earlier test ran this prompt: kept, all but its last token would come from the prefix cache, and the
    # one-token pass left is not the chunk this test fails.
    engine.batcher.prefixes.forget()
    model = engine._model
    real = model.forward

    def forward(*args, **kwargs):
        if kwargs.get("attention_mask") is None and kwargs["input_ids"].shape[1] > 1:  # only a chunk's pass
            raise RuntimeError("a chunk that cannot be computed")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)  # ~60 tokens, chunk is 8
    with pytest.raises(Exception, match="generation failed"):
        run(engine, long_prompt, params)
    behind: dict[str, list[str]] = {}
    t = threading.Thread(target=lambda: behind.__setitem__("text", run(engine, "Once upon a time", params)))
    t.start()
    t.join(60)
    assert behind.get("text") == expected, "the request behind the failed one was never served"
    assert not engine.batcher._pending and engine.batcher.alive


def test_a_prefill_group_pays_for_its_longest_rest_so_a_prompt_that_would_double_it_is_passed_over():
    """A left-padded pass computes rows x longest prompt: a short prompt grouped with a long one costs a long one.
    The head of the queue always goes; each request behind it joins only if the padded pass stays within a
    chunk, and one that does not is passed over (it is the head of a later step), not waited for."""
    from fma_worker.batching import Batcher, BatchRequest

    batcher = Batcher(lambda: None, max_rows=8, prefill_chunk=16)
    try:
        def req(tokens: int) -> BatchRequest:
            return BatchRequest(list(range(1, tokens + 1)), SamplingParams(max_tokens=1), [])

        a, b, c, d, long = req(4), req(12), req(3), req(5), req(20)
        with batcher._cond:  # the scheduler never sees them: taken and put back while it waits for the lock
            batcher._pending.extend([a, b, c, d])
            assert batcher._take_prefill_group() == [a, c, d], "b (12) would make the pass 2 x 12 = 24 > 16"
            batcher._pending.popleft()
            assert batcher._take_prefill_group() == [b], "b's turn as the head; c and d (2 x 12) do not fit"
            batcher._pending.clear()
            batcher._pending.extend([long, a])
            assert batcher._take_prefill_group() == [long], "more than a chunk: alone, in chunks"
            batcher._pending.clear()
            batcher.ragged = True  # one sequence, no padding: a pass costs the sum of its prompts
            batcher._pending.extend([a, b, c, d])
            assert batcher._take_prefill_group() == [a, b], "4 + 12 = 16; c (19) and d (21) do not fit"
            batcher._pending.clear()
    finally:
        batcher.stop()


def test_a_group_is_prefilled_as_one_sequence_only_where_our_mask_is_the_model_s_whole_mask():
    """Our 4-D block mask replaces the one the model would build: right for full, rotary attention under sdpa or
    eager in the families we checked; wrong for a sliding window or chunked layers (their own masks), ALiBi or
    recurrent models, and a flash-attention kernel takes no mask."""
    from transformers import (
        BloomConfig,
        FalconConfig,
        Gemma2Config,
        LlamaConfig,
        MistralConfig,
        MptConfig,
        Phi3Config,
        Qwen2Config,
        RwkvConfig,
    )

    from fma_worker.generation import ragged_prefill_fits

    def config(cls, attention: str = "sdpa", **kw):
        c = cls(**kw)
        c._attn_implementation = attention
        return c

    assert ragged_prefill_fits(config(LlamaConfig))
    assert ragged_prefill_fits(config(LlamaConfig, "eager"))
    assert not ragged_prefill_fits(config(LlamaConfig, "flash_attention_2"))
    assert not ragged_prefill_fits(config(MistralConfig, sliding_window=4096))
    assert ragged_prefill_fits(config(Qwen2Config, use_sliding_window=False))
    assert not ragged_prefill_fits(config(Qwen2Config, use_sliding_window=True, sliding_window=4096,
                                          max_window_layers=0))
    assert not ragged_prefill_fits(config(Phi3Config, sliding_window=2047))
    assert not ragged_prefill_fits(config(Gemma2Config))
    # ALiBi builds its bias from a 2-D mask (Bloom, Falcon) or the key's index (MPT); a recurrent model carries
    # state through every token of the pass: not families we checked, so left-padded.
    assert not ragged_prefill_fits(config(BloomConfig, "eager"))
    assert not ragged_prefill_fits(config(FalconConfig, alibi=True))
    assert not ragged_prefill_fits(config(MptConfig, "eager"))
    assert not ragged_prefill_fits(config(RwkvConfig, "eager"))
