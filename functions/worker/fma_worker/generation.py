"""Generation: the decoding loop, the sampler and incremental detokenization.

Plain functions over a :class:`LoadedModel` (what the engine loaded). The
engine owns the model's state (loading, sleeping, ...); this module only
turns a prompt and :class:`SamplingParams` into text, one step at a time.

* One forward pass per step for all ``n`` choices of a prompt (a batch of
  ``n`` rows sharing one KV cache), logits of the last position only.
* Sampling: logit bias, presence/frequency penalties, then greedy or
  temperature + top-p with a seeded ``torch.Generator`` (same seed, same text).
* Text: each choice has its own ``tokenizers.decoders.DecodeStream``, which
  turns one token at a time into text and holds back the bytes of a
  character split across tokens, so a step costs one token's decode, not a
  re-decode of everything generated so far; stop sequences are then cut by
  :class:`~fma_worker.text.StopTextTracker`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tokenizers.decoders import DecodeStream

from .protocol import SamplingParams
from .text import StopTextTracker


@dataclass(frozen=True)
class ChoiceDelta:
    """What one generation step produced for one choice."""

    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int


@dataclass
class LoadedModel:
    """A model ready to generate, as the engine loaded it."""

    torch: Any
    model: Any
    backend_tokenizer: Any  # tokenizers.Tokenizer, for DecodeStream
    device: str
    vocab_size: int
    eos_ids: set[int]
    cache_kw: str = "past_key_values"
    forward_extra: dict[str, Any] = field(default_factory=dict)


def generate(lm: LoadedModel, prompt_ids: list[int], params: SamplingParams) -> Iterator[list[ChoiceDelta]]:
    """Yield, per decoding step, the new text of every unfinished choice.

    Closing the iterator (client gone) stops the loop before the next
    forward pass.
    """
    torch = lm.torch
    n = params.n
    device = lm.device
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    trackers = [StopTextTracker(params.stop) for _ in range(n)]
    decoders = [DecodeStream(skip_special_tokens=True) for _ in range(n)]
    counts_per_choice = [0] * n
    finished: list[str | None] = [None] * n
    penalize = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    counts = torch.zeros((n, lm.vocab_size), device=device) if penalize else None
    bias = None
    if params.logit_bias:
        bias = torch.zeros(lm.vocab_size, device=device)
        for tok, value in params.logit_bias.items():
            bias[tok] = value
    past = None
    next_input = torch.tensor([prompt_ids] * n, device=device)
    with torch.inference_mode():
        for _ in range(params.max_tokens):
            out = lm.model(input_ids=next_input, use_cache=True, **lm.forward_extra, **{lm.cache_kw: past})
            past = getattr(out, lm.cache_kw)
            logits = out.logits[:, -1, : lm.vocab_size].float()
            chosen = sample(torch, logits, params, gen, counts, bias)
            picked = chosen.tolist()
            step: list[ChoiceDelta] = []
            for i in range(n):
                if finished[i] is not None:
                    continue
                tok = picked[i]
                counts_per_choice[i] += 1
                if tok in lm.eos_ids:
                    delta = trackers[i].push("", final=True)
                    finished[i] = "stop"
                else:
                    last = counts_per_choice[i] >= params.max_tokens
                    piece = decoders[i].step(lm.backend_tokenizer, tok) or ""
                    delta = trackers[i].push(piece, final=last)
                    if trackers[i].stopped:
                        finished[i] = "stop"
                    elif last:
                        finished[i] = "length"
                step.append(ChoiceDelta(i, delta, finished[i], counts_per_choice[i]))
            yield step
            if all(f is not None for f in finished):
                return
            if counts is not None:
                counts.scatter_add_(1, chosen[:, None], torch.ones_like(chosen[:, None], dtype=counts.dtype))
            next_input = chosen[:, None]


def sample(torch: Any, logits: Any, params: SamplingParams, gen: Any, counts: Any, bias: Any) -> Any:
    """One token per row: bias and penalties applied, then greedy or temperature + top-p."""
    if bias is not None:
        logits = logits + bias
    if counts is not None:
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest set whose mass reaches top_p (always at least one token)
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
