"""Recent prompts kept with their keys and values, so a prompt that begins as one of them did is prefilled from
where the two part.

Chat traffic repeats its beginnings: every request of an application carries its system prompt, and each turn
of a conversation resends the turns before it. A prompt's keys and values at a position depend only on the
tokens up to it (causal attention), so the columns of a prompt seen before serve any later prompt up to the
first token where they differ. vLLM calls this automatic prefix caching, SGLang keeps a radix tree, and
``transformers serve --continuous-batching`` shares whole pages of its paged cache.

This store keeps whole prompts (not pages): our batch cache is one contiguous tensor per layer, so a hit is a
slice of one entry, copied into the request's cache by the forward pass's own append. Entries are evicted least
recently used first, to a budget in tokens. A hit always leaves the prompt's last token to compute: its logits
give the first generated token.

Numbers: a hit's columns were computed in another forward pass, whose row count differs; float32 matrix
products may round their last bits differently with the row count (MKL does), as they already do between a
request alone and the same request in a batch. bfloat16 on oneDNN and float32 on a GPU are likewise not
bit-identical across shapes. docs/design.md ("Prefix cache") says what that means for greedy text.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MIN_HIT = 16  # tokens: a shorter shared beginning is prefilled with the rest (a pass of its own costs more)


def shared_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens ``a`` and ``b`` have in common from the start."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def usable_hit(shared: int, prompt_length: int, min_hit: int = MIN_HIT) -> int:
    """Tokens a prompt takes from an entry it shares ``shared`` tokens with: never its last token (its logits are
    the first generated token), and nothing below ``min_hit``."""
    hit = min(shared, prompt_length - 1)
    return hit if hit >= min_hit else 0


@dataclass
class _Entry:
    tokens: list[int]
    layers: list[tuple[Any, Any]]  # per layer: keys, values [1, kv heads, len(tokens), head dim]
    used: int


@dataclass(frozen=True)
class Hit:
    entry: _Entry
    length: int


class PrefixStore:
    """Prompts and their per-layer keys and values, at most ``budget`` tokens in all; one model's (``owner``)."""

    def __init__(self, budget: int, min_hit: int = MIN_HIT) -> None:
        self.budget = budget
        self.min_hit = min_hit
        self._entries: list[_Entry] = []
        self._owner: Any = None
        self._tick = 0
        self._lock = threading.Lock()  # the scheduler thread reads and writes; sleep forgets from another

    @property
    def tokens(self) -> int:
        return sum(len(e.tokens) for e in self._entries)

    @property
    def entries(self) -> int:
        return len(self._entries)

    def forget(self) -> None:
        with self._lock:
            self._entries = []
            self._owner = None

    def owned_by(self, owner: Any) -> bool:
        """Whether the entries were computed by ``owner`` (the model object: weights loaded again are another)."""
        return owner is self._owner

    def match(self, prompt: Sequence[int]) -> Hit | None:
        """The entry sharing the longest beginning with ``prompt``, and how much of it to use; None below the
        minimum. Whose entries they are is checked where the hit is used (:meth:`owned_by`)."""
        if self.budget <= 0:
            return None
        with self._lock:
            best: Hit | None = None
            for entry in self._entries:
                hit = usable_hit(shared_length(entry.tokens, prompt), len(prompt), self.min_hit)
                if hit and (best is None or hit > best.length):
                    best = Hit(entry, hit)
            if best is not None:
                self._tick += 1
                best.entry.used = self._tick
            return best

    def remember(self, owner: Any, prompt: Sequence[int], layers: list[tuple[Any, Any]]) -> None:
        """Keep ``prompt`` (its first ``budget`` tokens at most) with its keys and values: ``layers`` holds
        exactly ``len(prompt)`` columns per layer and must not be written afterwards."""
        if self.budget <= 0 or len(prompt) < self.min_hit:
            return
        keep = min(len(prompt), self.budget)
        tokens = list(prompt[:keep])
        if keep < len(prompt):
            layers = [(k[:, :, :keep].clone(), v[:, :, :keep].clone()) for k, v in layers]  # a view keeps it all
        with self._lock:
            if owner is not self._owner:
                self._entries, self._owner = [], owner
            self._tick += 1
            for entry in self._entries:
                if shared_length(entry.tokens, tokens) == len(tokens):  # already held (as itself or a beginning)
                    entry.used = self._tick
                    return
            # An entry that is a beginning of this prompt adds nothing this one does not hold.
            self._entries = [e for e in self._entries if shared_length(e.tokens, tokens) < len(e.tokens)]
            self._entries.append(_Entry(tokens, layers, self._tick))
            while self.tokens > self.budget:
                self._entries.remove(min(self._entries, key=lambda e: e.used))


def cache_from(hit: Hit) -> Any:
    """A fresh ``DynamicCache`` holding the hit's first columns (views: the forward pass appends by copying, as
    ``DynamicLayer.update`` does, and never writes into them)."""
    from transformers.cache_utils import DynamicCache  # transformers is imported by the load, not the start

    n = hit.length
    return DynamicCache(ddp_cache_data=[(k[:, :, :n], v[:, :, :n]) for k, v in hit.entry.layers])


def cache_from_rows(torch: Any, hits: list[Hit | None]) -> tuple[Any, int]:
    """The cache a group prefilled together starts from: row ``i`` holds ``hits[i]``'s columns (none for None),
    right-aligned, zeros to their left; and its width, the longest hit (None and 0 without any). The caller masks
    the zeros."""
    from transformers.cache_utils import DynamicCache

    lengths = [h.length if h is not None else 0 for h in hits]
    width = max(lengths)
    if width == 0:
        return None, 0
    if len(hits) == 1:
        return cache_from(hits[0]), width
    sample = next(h for h in hits if h is not None).entry.layers

    def pad(like: Any, columns: int) -> Any:
        return torch.zeros((1, like.shape[1], columns, like.shape[3]), dtype=like.dtype, device=like.device)

    layers = []
    for layer_index, (keys, values) in enumerate(sample):
        rows_k, rows_v = [], []
        for hit, n in zip(hits, lengths, strict=True):
            if hit is None:
                rows_k.append(pad(keys, width))
                rows_v.append(pad(values, width))
            else:
                k, v = hit.entry.layers[layer_index]
                rows_k.append(torch.cat([pad(keys, width - n), k[:, :, :n]], dim=2))
                rows_v.append(torch.cat([pad(values, width - n), v[:, :, :n]], dim=2))
        layers.append((torch.cat(rows_k), torch.cat(rows_v)))
    return DynamicCache(ddp_cache_data=layers), width


def cache_in_sequence(torch: Any, hits: list[Hit]) -> Any:
    """The cache a group prefilled as one sequence starts from: each hit's columns, one hit after another."""
    from transformers.cache_utils import DynamicCache

    layers = []
    for layer_index in range(len(hits[0].entry.layers)):
        layers.append(tuple(torch.cat([h.entry.layers[layer_index][kind][:, :, :h.length] for h in hits], dim=2)
                            for kind in (0, 1)))
    return DynamicCache(ddp_cache_data=layers)


def full_attention_layers(cache: Any) -> bool:
    """Whether every layer of ``cache`` is a plain full-attention one (a sliding window drops columns, so its
    keys are not the prompt's from the start)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)
