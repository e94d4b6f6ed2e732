"""What generation is made of: the loaded model, one step's output, the sampler.

The decoding loop itself is the batcher's (``batching.py``): every running
request in one forward pass per step. Here:

* :class:`LoadedModel`: what the engine loaded, as the batcher runs it.
* :class:`ChoiceDelta`: the new text of one choice after one step.
* :func:`sample`: logit bias, presence/frequency penalties, then greedy or
  temperature + top-p with the request's seeded ``torch.Generator`` (same
  seed, same text, alone or batched).

Text: each choice has its own ``tokenizers.decoders.DecodeStream``, which turns
one token at a time into text and holds back the bytes of a character split
across tokens, so a step costs one token's decode, not a re-decode of
everything generated so far; stop sequences are then cut by
:class:`~fma_worker.text.StopTextTracker`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fma_common.wire import SamplingParams


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
    # Work the batch scheduler does after each step, on its own thread (packed_linear.Packer.pack_next).
    between_steps: Callable[[], None] | None = None
    # Prompts of a group prefilled as one sequence with a block mask (no padding): see ragged_prefill_fits.
    ragged_prefill: bool = False


# Families whose decoder layers are rotary-position, causal self-attention and nothing else, so a token's output
# depends only on the keys it is let see and their positions (position_ids), not on where they sit in the pass.
# Not here: ALiBi models (Bloom, MPT, Falcon with alibi: their bias is built from a 2-D mask or the key index),
# recurrent and hybrid ones (RWKV, Mamba, Jamba...: state flows through every token of the pass), and any family
# not checked. Those prefill a group as left-padded rows, which transformers masks itself.
RAGGED_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma", "granite",
    "olmo", "olmo2", "smollm3", "stablelm", "starcoder2",
})


def ragged_prefill_fits(config: Any) -> bool:
    """Whether a model can prefill several prompts as one sequence under our own 4-D mask: a family we know
    attends with rotary positions only (RAGGED_MODEL_TYPES), every layer attends to all earlier tokens (a
    sliding window or a chunked layer makes its own mask, which ours would replace), and the attention is one
    that takes an additive mask (sdpa, eager; flash-attention kernels take none)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "model_type", None) not in RAGGED_MODEL_TYPES:
        return False
    if getattr(text, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    if getattr(text, "attention_chunk_size", None):
        return False
    return all(kind == "full_attention" for kind in getattr(text, "layer_types", None) or ["full_attention"])


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
