"""Continuous batching: every running request decodes in one forward pass per step.

One scheduler thread owns the model's forward passes. A request joins the
running batch as soon as its prompt is prefilled and leaves when its last
choice finishes, is cancelled (client gone) or fails; each keeps its own
sampling parameters, seed, penalties, logit bias and stop sequences.

Why our own scheduler and not transformers' continuous-batching manager:
docs/design.md ("Continuous batching"). In short: its sampling settings are
one ``GenerationConfig`` for the whole manager, not per request, and on this
CPU a request alone ran at 2.7 tok/s with it against 30 with ``generate``.

How the batch is kept: one ``DynamicCache`` for all rows, left-padded to a
common length, with a 2-D attention mask and explicit position ids per row,
which is how transformers itself runs a padded batch. A joining request is
prefilled on its own cache (waiting prompts that fit a chunk together, as one
ragged sequence under a block mask where the model allows it, else as
left-padded rows; longer ones in chunks between decode steps, so running
streams wait for at most one chunk), its ``n`` choices share that one prefill
(the cache rows are repeated), and its rows are concatenated to the batch;
leaving rows are selected out and all-padding columns trimmed from the left.

Each step's keys and values are written in place into room kept at the right
of every layer's cache (``kv_room.py``), not appended with ``torch.cat``,
which copies the whole cache of every layer on every step: at 16 rows of 400
columns that copy was a third of a decode step. The room is bounded by how wide
the batch can still grow (each row's length plus its remaining tokens), so the
cache never holds more slots than admission allowed for.

Sampling runs per request on its own rows with its own ``torch.Generator``,
so a seeded request samples the same tokens alone or in a batch, and greedy
rows take the argmax of the same logits.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tokenizers.decoders import DecodeStream

from fma_common.errors import ApiError, InternalError
from fma_common.wire import SamplingParams

from .generation import ChoiceDelta, LoadedModel, sample
from .prefix_cache import Hit, PrefixStore, cache_from, cache_from_rows, cache_in_sequence, full_attention_layers
from .text import StopTextTracker

log = logging.getLogger("fma.worker.batching")

_END = object()
_LOOK_AHEAD = 64  # waiting requests a step considers for its prefill group (each one is looked up in the store)


@dataclass
class _Choice:
    index: int
    tracker: StopTextTracker
    decoder: DecodeStream
    count: int = 0
    finished: str | None = None


@dataclass
class BatchRequest:
    """One prompt's generation: its choices, its sampler state, and the queue its steps go to."""

    prompt_ids: list[int]
    params: SamplingParams
    choices: list[_Choice]
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    done: bool = False
    gen: Any = None
    counts: Any = None  # [n, vocab] token counts for presence/frequency penalties
    bias: Any = None
    prefilled: int = 0
    cache: Any = None  # its own cache while prefilling in chunks (or from a prefix hit)
    hit: Hit | None = None  # a kept prompt it begins as, looked up each time it comes up for prefill
    last_logits: Any = None
    submitted: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return len(self.choices)

    def live(self) -> list[_Choice]:
        return [c for c in self.choices if c.finished is None]


class BatchStream:
    """The steps of one request as an iterator; closing it (client gone) leaves the batch at the next step."""

    def __init__(self, request: BatchRequest, batcher: Batcher) -> None:
        self._req = request
        self._batcher = batcher
        self._closed = False

    def __iter__(self) -> Iterator[list[ChoiceDelta]]:
        return self

    def __next__(self) -> list[ChoiceDelta]:
        if self._closed:
            raise StopIteration
        while True:
            try:
                item = self._req.out.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._batcher.alive:
                    self.close()
                    raise InternalError("the batch scheduler stopped; see the worker log") from None
        if item is _END:
            self._closed = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._closed = True
            raise item
        return item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._batcher.cancel(self._req)


class Batcher:
    """The scheduler thread and the running batch."""

    def __init__(self, model: Callable[[], LoadedModel | None], *, max_rows: int, prefill_chunk: int,
                 prefill_budget: int = 0, on_step: Callable[[int], None] | None = None,
                 prefix_tokens: int = 0, on_prefix_hit: Callable[[int], None] | None = None) -> None:
        self._model = model
        self.max_rows = max_rows
        self.prefill_chunk = prefill_chunk
        # Prompt tokens prefilled per step, across waiting requests, before the running rows decode again.
        self.prefill_budget = max(prefill_budget, prefill_chunk)
        self._on_step = on_step or (lambda rows: None)
        # Recent prompts' keys and values: a prompt beginning as one of them is prefilled from where they part.
        self.prefixes = PrefixStore(prefix_tokens)
        self._on_prefix_hit = on_prefix_hit or (lambda tokens: None)
        self._cond = threading.Condition()
        self._pending: deque[BatchRequest] = deque()
        self._running: list[BatchRequest] = []
        # The batch, row by row in the order of the rows list:
        self._row_owner: list[tuple[BatchRequest, _Choice]] = []
        self._cache: Any = None
        self._mask: Any = None  # [B, T], 1 = a real token
        self._tokens: Any = None  # [B], the token each row feeds next
        self._positions: Any = None  # [B], that token's position
        self._stopping = False
        self._busy = False  # in a step (it may hold the model); False only while waiting for work
        self.ragged = False  # the loaded model prefills a group as one sequence (LoadedModel.ragged_prefill)
        self.peak_kv_slots = 0  # the most cache slots (rows x padded length) a step has held, per layer
        self._thread = threading.Thread(target=self._loop, name="fma-batcher", daemon=True)
        self._thread.start()

    # ---- API -------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def rows(self) -> int:
        return len(self._row_owner)

    def submit(self, lm: LoadedModel, prompt_ids: list[int], params: SamplingParams) -> BatchStream:
        torch = lm.torch
        n = params.n
        gen = torch.Generator(device=lm.device)
        gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        req = BatchRequest(list(prompt_ids), params,
                           [_Choice(i, StopTextTracker(params.stop), DecodeStream(skip_special_tokens=True))
                            for i in range(n)], gen=gen)
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            req.counts = torch.zeros((n, lm.vocab_size), device=lm.device)
        if params.logit_bias:
            req.bias = torch.zeros(lm.vocab_size, device=lm.device)
            for tok, value in params.logit_bias.items():
                req.bias[tok] = value
        with self._cond:
            self._pending.append(req)
            self._cond.notify_all()
        return BatchStream(req, self)

    def cancel(self, req: BatchRequest) -> None:
        with self._cond:
            req.cancelled = True
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(10)

    # ---- the loop ----------------------------------------------------------------------

    def wait_idle(self, timeout: float) -> bool:
        """Until the scheduler holds no request and no model (a level-2 sleep then frees the weights)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy or self._pending or self._running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while not self._stopping and not self._pending and not self._running:
                    self._cond.wait()
                self._busy = True
                if self._stopping:
                    self._fail_all(InternalError("the worker is shutting down"))
                    return
                for req in [r for r in self._pending if r.cancelled]:
                    self._pending.remove(req)
                    self._finish(req)
            lm = self._model()
            if lm is None:  # asleep: nothing can run (sleep waits for requests to end, so this is a race lost)
                self._fail_all(InternalError("the model went to sleep during generation"))
                continue
            self.ragged = lm.ragged_prefill
            with self._cond:
                group = self._take_prefill_group()
            try:
                torch = lm.torch
                with torch.inference_mode():
                    self._drop_finished(lm)
                    spent = 0
                    while group:
                        spent += self._prefill_cost(group)
                        self._prefill(lm, group)
                        if spent >= self.prefill_budget or self.prefill_budget <= self.prefill_chunk:
                            break  # the default (one chunk): one prefill pass per step, as always
                        with self._cond:
                            group = self._take_prefill_group()
                            if group and spent + self._prefill_cost(group) > self.prefill_budget:
                                for req in group:  # looked up again at the next step
                                    req.hit = None
                                break  # it waits for the next step, after the running rows decode
                    if self._row_owner:
                        self._decode(lm)
                    if lm.between_steps is not None:
                        lm.between_steps()
            except Exception:  # a bug in the scheduler itself: fail what runs, keep serving
                log.exception("batch step failed")
                self._fail_all(InternalError("generation failed; see the worker log"))
                self._reset_batch()
            # Hold no model while idle: a level-2 sleep must be able to free the weights.
            lm = group = None

    def _take_prefill_group(self) -> list[BatchRequest]:
        """Pending requests to prefill now. The head of the queue always: alone in chunks when it has more than a
        chunk left to compute, else with each request behind it, in order, that keeps the pass within a chunk
        (_pass_cost). One that does not fit is passed over, not waited for: it comes up again at the next step,
        and every request gets its turn as the head."""
        if not self._pending:
            return []
        head = self._pending[0]
        if head.prefilled:
            return [head]
        group: list[BatchRequest] = []
        sizes: list[int] = []
        for looked, req in enumerate(self._pending):
            if looked >= _LOOK_AHEAD:
                break
            if req.prefilled:
                continue
            # Looked up each time: the group ahead of it may have kept the prompt it begins as since.
            req.hit = self.prefixes.match(req.prompt_ids)
            size = self._left(req)
            if not group and size > self.prefill_chunk:
                return [req]
            if group and self._pass_cost([*sizes, size]) > self.prefill_chunk:
                req.hit = None
                continue
            group.append(req)
            sizes.append(size)
            if self._pass_cost([*sizes, 1]) > self.prefill_chunk:
                break  # full: nothing behind would fit
        return group

    def _pass_cost(self, sizes: list[int]) -> int:
        """The tokens one prefill pass over prompts (or rests) of these sizes computes: their sum as one ragged
        sequence; rows x the longest when left-padded, where a short prompt grouped with a long one costs a long
        one (so a group is sized by that, and a prompt that would double it waits for a later pass)."""
        return sum(sizes) if self.ragged else len(sizes) * max(sizes)

    @staticmethod
    def _left(req: BatchRequest) -> int:
        """The prompt tokens a request still has to compute: after its chunks so far, or after its hit."""
        start = req.prefilled or (req.hit.length if req.hit is not None else 0)
        return len(req.prompt_ids) - start

    def _chunked(self, group: list[BatchRequest]) -> bool:
        """A prompt alone on its own cache, prefilled from where it stands a chunk at a time: one with more than a
        chunk left to compute, or one partly prefilled."""
        return len(group) == 1 and (group[0].prefilled > 0 or self._left(group[0]) > self.prefill_chunk)

    def _prefill_cost(self, group: list[BatchRequest]) -> int:
        """The tokens a prefill of ``group`` computes: the next chunk of a prompt alone, else the group's pass."""
        if self._chunked(group):
            return min(self.prefill_chunk, self._left(group[0]))
        return self._pass_cost([self._left(r) for r in group])

    def _remember(self, lm: LoadedModel, req: BatchRequest, cache: Any, row: int, columns: int) -> None:
        """Keep ``req``'s prompt with its keys and values: row ``row`` of ``cache``, whose last ``len(prompt)`` of
        ``columns`` columns are the prompt's. A row of a group is copied (a view would keep the whole group's
        tensors alive); a prompt alone keeps the tensors themselves (the batch's cache takes copies of them)."""
        if self.prefixes.budget <= 0 or len(req.prompt_ids) < self.prefixes.min_hit \
                or not full_attention_layers(cache):
            return
        n = len(req.prompt_ids)
        alone = cache.layers[0].keys.shape[0] == 1 and columns == n
        try:
            layers = [(layer.keys, layer.values) if alone else
                      (layer.keys[row:row + 1, :, columns - n:].clone(),
                       layer.values[row:row + 1, :, columns - n:].clone())
                      for layer in cache.layers]
            self.prefixes.remember(lm.model, req.prompt_ids, layers)
        except Exception as exc:  # keeping is optional: a copy that fails (device memory) must not fail the batch
            log.warning("prefix cache: prompt not kept (%s: %s)", type(exc).__name__, exc)

    # ---- prefill -------------------------------------------------------------------------

    def _prefill(self, lm: LoadedModel, group: list[BatchRequest]) -> None:
        torch = lm.torch
        if self._chunked(group):
            req = group[0]
            try:
                if req.hit is not None:  # its cache starts as the kept prompt's first columns
                    if self.prefixes.owned_by(lm.model):
                        req.cache = cache_from(req.hit)
                        req.prefilled = req.hit.length
                        self._on_prefix_hit(req.hit.length)
                    req.hit = None
                start = req.prefilled
                chunk = req.prompt_ids[start:start + self.prefill_chunk]
                ids = torch.tensor([chunk], device=lm.device)
                out = lm.model(input_ids=ids, use_cache=True, **lm.forward_extra, **{lm.cache_kw: req.cache})
                req.cache = getattr(out, lm.cache_kw)
                req.prefilled += len(chunk)
                if req.prefilled < len(req.prompt_ids):
                    return  # more chunks; running rows decode in between
                logits = out.logits[:, -1, : lm.vocab_size].float()
                mask = torch.ones((1, len(req.prompt_ids)), dtype=torch.long, device=lm.device)
                self._remember(lm, req, req.cache, 0, len(req.prompt_ids))
            except Exception as exc:
                self._fail_request(req, exc)
                return
            with self._cond:
                self._pending.remove(req)
            self._join(lm, [req], req.cache, logits, mask)
            return
        # Short prompts (or short rests after their hits) together, in one forward pass.
        hits = [r.hit for r in group]
        if any(hits) and not self.prefixes.owned_by(lm.model):  # the store was forgotten (sleep) since
            hits = [None] * len(group)
        for req in group:
            req.hit = None
        try:
            # One prompt alone keeps the plain causal call (no mask to build; sdpa's causal kernel).
            forward = self._forward_ragged if lm.ragged_prefill and len(group) > 1 else self._forward_padded
            cache, logits, mask = forward(lm, group, hits)
        except Exception as exc:
            if len(group) == 1:
                self._fail_request(group[0], exc)
                return
            for req, hit in zip(group, hits, strict=True):  # find the one that fails: each alone, the others go on
                req.hit = hit
                self._prefill(lm, [req])
            return
        for hit in hits:
            if hit is not None:
                self._on_prefix_hit(hit.length)
        for i, req in enumerate(group):
            self._remember(lm, req, cache, i, int(mask.shape[1]))
        with self._cond:
            for req in group:
                self._pending.remove(req)
        self._join(lm, group, cache, logits, mask)

    def _forward_ragged(self, lm: LoadedModel, group: list[BatchRequest], hits: list[Hit | None]) \
            -> tuple[Any, Any, Any]:
        """The group as one sequence, no padding: the kept columns its hits come from, then every row's rest,
        under a 4-D mask that lets a token see its own prompt's earlier tokens only. Returns the rows' cache,
        left-padded to the longest prompt, their last logits and their 2-D mask."""
        torch = lm.torch
        starts = [h.length if h is not None else 0 for h in hits]
        rests = [len(r.prompt_ids) - s for r, s in zip(group, starts, strict=True)]
        # The kept columns the pass starts from: each entry the hits come from once, as far as its longest hit
        # (rows sharing a system prompt share its columns: a copy per row would multiply both the memory and
        # the keys every token of the pass is scored against).
        spans: list[Hit] = []
        row_span: list[int] = []  # each row's span, -1 for none
        for hit in hits:
            if hit is None:
                row_span.append(-1)
                continue
            k = next((k for k, span in enumerate(spans) if span.entry is hit.entry), len(spans))
            if k == len(spans):
                spans.append(hit)
            elif hit.length > spans[k].length:
                spans[k] = hit
            row_span.append(k)
        span_at = [sum(span.length for span in spans[:k]) for k in range(len(spans))]
        past_width = sum(span.length for span in spans)
        past_span = torch.tensor([k for k, span in enumerate(spans) for _ in range(span.length)], device=lm.device,
                                 dtype=torch.long)
        past_position = torch.tensor([p for span in spans for p in range(span.length)], device=lm.device,
                                     dtype=torch.long)
        # The new tokens: the row each belongs to and its position.
        row = torch.tensor([i for i, r in enumerate(rests) for _ in range(r)], device=lm.device)
        position = torch.tensor([s + j for s, r in zip(starts, rests, strict=True) for j in range(r)],
                                device=lm.device)
        row_span_t = torch.tensor(row_span, device=lm.device)[row]
        start_t = torch.tensor(starts, device=lm.device)[row]
        sees_past = (row_span_t[:, None] == past_span[None, :]) & (past_position[None, :] < start_t[:, None])
        sees_new = (row[:, None] == row[None, :]) & (position[None, :] <= position[:, None])
        sees = torch.cat([sees_past, sees_new], dim=1)
        dtype = lm.model.dtype
        mask4 = torch.zeros(sees.shape, dtype=dtype, device=lm.device).masked_fill_(~sees, torch.finfo(dtype).min)
        ids = torch.tensor([[t for r, s in zip(group, starts, strict=True) for t in r.prompt_ids[s:]]],
                           device=lm.device)
        last = torch.tensor(rests, device=lm.device).cumsum(0) - 1
        extra = dict(lm.forward_extra)
        if "logits_to_keep" in extra:
            extra["logits_to_keep"] = last
        if past_width:
            extra[lm.cache_kw] = cache_in_sequence(torch, spans)
        out = lm.model(input_ids=ids, attention_mask=mask4[None, None], position_ids=position[None], use_cache=True,
                       **extra)
        logits = out.logits[0, :, : lm.vocab_size] if "logits_to_keep" in extra else \
            out.logits[0, last, : lm.vocab_size]
        # Row i: its hit's columns and its new ones, right-aligned; the padding slots repeat a column of its own.
        width = max(len(r.prompt_ids) for r in group)
        index, mask = [], torch.zeros((len(group), width), dtype=torch.long, device=lm.device)
        new_at = past_width
        for i, (s, r) in enumerate(zip(starts, rests, strict=True)):
            past = list(range(span_at[row_span[i]], span_at[row_span[i]] + s)) if s else []
            columns = past + list(range(new_at, new_at + r))
            index.append([columns[0]] * (width - len(columns)) + columns)
            mask[i, width - len(columns):] = 1
            new_at += r
        index_t = torch.tensor(index, device=lm.device)
        cache = getattr(out, lm.cache_kw)
        for layer in _layers(cache):
            layer.keys = layer.keys[0][:, index_t].transpose(0, 1).contiguous()
            layer.values = layer.values[0][:, index_t].transpose(0, 1).contiguous()
        return cache, logits.float(), mask

    def _forward_padded(self, lm: LoadedModel, group: list[BatchRequest], hits: list[Hit | None]) \
            -> tuple[Any, Any, Any]:
        """The group as left-padded rows (a model whose attention makes its own masks: a sliding window, a
        flash-attention kernel). A row that begins as a kept prompt starts from that prompt's columns,
        right-aligned in front of the rest:  cache [pad | hit_i]  then  tokens [pad | rest_i],  so a row whose hit
        and rest are both shorter than the longest has a gap in the middle, masked out and closed after the pass
        (_close_gaps), before the rows join the batch."""
        torch = lm.torch
        past, width = cache_from_rows(torch, hits)
        starts = [h.length if h is not None else 0 for h in hits]
        length = max(len(r.prompt_ids) - start for r, start in zip(group, starts, strict=True))
        ids = torch.zeros((len(group), length), dtype=torch.long, device=lm.device)
        mask = torch.zeros((len(group), width + length), dtype=torch.long, device=lm.device)
        for i, (req, start) in enumerate(zip(group, starts, strict=True)):
            k = len(req.prompt_ids) - start
            ids[i, length - k:] = torch.tensor(req.prompt_ids[start:], device=lm.device)
            mask[i, width - start:width] = 1
            mask[i, width + length - k:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, width:]
        extra = {lm.cache_kw: past} if past is not None else {}
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       **lm.forward_extra, **extra)
        cache = getattr(out, lm.cache_kw)
        if any(start and len(req.prompt_ids) - start < length for req, start in zip(group, starts, strict=True)):
            mask = _close_gaps(torch, cache, mask)
        return cache, out.logits[:, -1, : lm.vocab_size].float(), mask

    def _join(self, lm: LoadedModel, group: list[BatchRequest], cache: Any, logits: Any, mask: Any) -> None:
        """Sample each request's first tokens from its prefill, then add its live rows to the batch."""
        torch = lm.torch
        keep_rows: list[int] = []  # prefill row of each new batch row
        owners: list[tuple[BatchRequest, _Choice]] = []
        first: list[int] = []
        for i, req in enumerate(group):
            if req.cancelled:
                self._finish(req)
                continue
            rows_logits = logits[i:i + 1].expand(req.rows, -1)
            try:
                picked = self._sample_and_emit(lm, req, rows_logits, list(range(req.rows)))
            except Exception as exc:
                self._fail_request(req, exc)
                continue
            for choice, tok in zip(req.choices, picked, strict=True):
                if choice.finished is None:
                    keep_rows.append(i)
                    owners.append((req, choice))
                    first.append(tok)
            if req.live():
                self._running.append(req)
            else:
                self._finish(req)
        if not owners:
            return
        index = torch.tensor(keep_rows, device=lm.device)
        new_cache = _select(cache, index)
        new_mask = mask.index_select(0, index)
        new_positions = new_mask.sum(-1)
        new_tokens = torch.tensor(first, device=lm.device)
        if not self._row_owner:
            self._cache, self._mask, self._positions, self._tokens = new_cache, new_mask, new_positions, new_tokens
        else:
            self._cache, self._mask = _concat(torch, self._cache, self._mask, new_cache, new_mask)
            self._positions = torch.cat([self._positions, new_positions])
            self._tokens = torch.cat([self._tokens, new_tokens])
        self._row_owner += owners
        self._trim_padding()

    # ---- decode ----------------------------------------------------------------------------

    def _decode(self, lm: LoadedModel) -> None:
        torch = lm.torch
        rows = len(self._row_owner)
        from .kv_room import ensure_room  # imports transformers: not at the worker's start

        capacity = ensure_room(self._cache, self._reach)
        mask = torch.cat([self._mask, torch.ones((rows, 1), dtype=self._mask.dtype, device=lm.device)], dim=1)
        out = lm.model(input_ids=self._tokens[:, None], attention_mask=mask, position_ids=self._positions[:, None],
                       use_cache=True, **lm.forward_extra, **{lm.cache_kw: self._cache})
        self._cache = getattr(out, lm.cache_kw)
        self._mask = mask
        self.peak_kv_slots = max(self.peak_kv_slots, rows * max(capacity, int(mask.shape[1])))
        self._positions = self._positions + 1
        logits = out.logits[:, -1, : lm.vocab_size].float()
        self._on_step(rows)
        by_request: dict[int, tuple[BatchRequest, list[int]]] = {}
        for row, (req, _choice) in enumerate(self._row_owner):
            by_request.setdefault(id(req), (req, []))[1].append(row)
        next_tokens = self._tokens.clone()
        for req, rows_of in by_request.values():
            if req.cancelled or req.done:
                continue
            try:
                index = torch.tensor(rows_of, device=lm.device)
                picked = self._sample_and_emit(lm, req, logits.index_select(0, index),
                                               [c.index for r, c in (self._row_owner[i] for i in rows_of)])
            except Exception as exc:  # this request's own failure: it leaves, the batch goes on
                self._fail_request(req, exc)
                continue
            next_tokens[index] = torch.tensor(picked, device=lm.device)
        self._tokens = next_tokens
        self._drop_finished(lm)

    def _reach(self) -> int:
        """The widest the batch's cache can come to: a row ends at its length now plus the tokens it may still
        feed (the last token sampled is never fed), and all-padding columns are trimmed as rows leave."""
        lengths = self._mask.sum(-1).tolist()
        return max(int(length) + req.params.max_tokens - choice.count
                   for length, (req, choice) in zip(lengths, self._row_owner, strict=True))

    def _sample_and_emit(self, lm: LoadedModel, req: BatchRequest, logits: Any, choice_indexes: list[int]) \
            -> list[int]:
        """Sample the request's live rows, push the step's text to its stream; the tokens, row by row."""
        torch = lm.torch
        counts = req.counts.index_select(0, torch.tensor(choice_indexes, device=lm.device)) \
            if req.counts is not None else None
        chosen = sample(torch, logits, req.params, req.gen, counts, req.bias)
        picked = chosen.tolist()
        step: list[ChoiceDelta] = []
        max_tokens = req.params.max_tokens
        for ci, tok in zip(choice_indexes, picked, strict=True):
            choice = req.choices[ci]
            if choice.finished is not None:
                continue
            choice.count += 1
            if tok in lm.eos_ids:
                text = choice.tracker.push("", final=True)
                choice.finished = "stop"
            else:
                last = choice.count >= max_tokens
                piece = choice.decoder.step(lm.backend_tokenizer, tok) or ""
                text = choice.tracker.push(piece, final=last)
                if choice.tracker.stopped:
                    choice.finished = "stop"
                elif last:
                    choice.finished = "length"
            step.append(ChoiceDelta(ci, text, choice.finished, choice.count))
        if req.counts is not None:
            index = torch.tensor(choice_indexes, device=lm.device)
            req.counts.index_add_(0, index, torch.nn.functional.one_hot(chosen, lm.vocab_size).to(req.counts.dtype))
        if step:
            req.out.put(step)
        if not req.live():
            self._finish(req)
        return picked

    # ---- leaving ------------------------------------------------------------------------------

    def _drop_finished(self, lm: LoadedModel) -> None:
        if not self._row_owner:
            return
        keep = [i for i, (req, choice) in enumerate(self._row_owner)
                if choice.finished is None and not req.cancelled and not req.done]
        for req in [r for r in self._running if r.cancelled or r.done]:
            self._running.remove(req)
            self._finish(req)
        if len(keep) == len(self._row_owner):
            return
        if not keep:
            self._reset_batch()
            return
        torch = lm.torch
        index = torch.tensor(keep, device=lm.device)
        self._row_owner = [self._row_owner[i] for i in keep]
        self._cache = _select(self._cache, index)
        self._mask = self._mask.index_select(0, index)
        self._tokens = self._tokens.index_select(0, index)
        self._positions = self._positions.index_select(0, index)
        self._trim_padding()

    def _trim_padding(self) -> None:
        """Columns that are padding in every row hold nothing: trim them (after rows leave, and after a join
        whose prefill kept only some of its rows), so the cache is as wide as its longest row and the room
        kv_room keeps is measured from there."""
        valid = self._mask.sum(0) > 0
        first = int(valid.nonzero()[0]) if bool(valid.any()) else 0
        if first:
            self._mask = self._mask[:, first:]
            _trim_left(self._cache, first)

    def _reset_batch(self) -> None:
        self._row_owner = []
        self._cache = self._mask = self._tokens = self._positions = None

    def _finish(self, req: BatchRequest) -> None:
        if not req.done:
            req.done = True
            req.out.put(_END)

    def _fail_request(self, req: BatchRequest, exc: BaseException) -> None:
        if isinstance(exc, ApiError):
            error: BaseException = exc
        else:
            log.error("generation failed for one request (%s: %s); the others go on", type(exc).__name__, exc)
            error = InternalError("generation failed; see the worker log")
        if not req.done:
            req.done = True
            req.out.put(error)
        for c in req.choices:
            c.finished = c.finished or "error"
        if req in self._running:
            self._running.remove(req)
        with self._cond:  # a prompt failing in its prefill: left waiting, it would be retried at every step
            if req in self._pending:
                self._pending.remove(req)
        req.cache = None  # a chunked prefill's partial cache

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            pending = list(self._pending)
            self._pending.clear()
        for req in [*pending, *self._running]:
            self._fail_request(req, error)
        self._running = []
        self._reset_batch()


# ---- cache surgery (DynamicCache: one keys/values pair per layer, [batch, heads, tokens, dim]) ------------------

def _layers(cache: Any) -> list[Any]:
    return list(cache.layers)


def _select(cache: Any, index: Any) -> Any:
    for layer in _layers(cache):
        if hasattr(layer, "select_rows"):  # kv_room.RoomyLayer: keeps its room
            layer.select_rows(index)
        else:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
    return cache


def _trim_left(cache: Any, columns: int) -> None:
    for layer in _layers(cache):
        if hasattr(layer, "trim_left"):  # kv_room.RoomyLayer: no copy
            layer.trim_left(columns)
        else:
            layer.keys = layer.keys[:, :, columns:, :]
            layer.values = layer.values[:, :, columns:, :]


def _close_gaps(torch: Any, cache: Any, mask: Any) -> Any:
    """Move each row's real columns (mask 1) to the right end of the row, in order, and return the mask that
    results: rows are then left-padded only, as the batch keeps them. Keys carry their position already (RoPE is
    applied before they are cached), so moving a column does not change what it says."""
    index = torch.sort(mask, dim=1, stable=True).indices  # the 0 columns in order, then the 1 columns in order
    for layer in _layers(cache):
        gather = index[:, None, :, None].expand_as(layer.keys)
        layer.keys = layer.keys.gather(2, gather)
        layer.values = layer.values.gather(2, gather)
    return mask.gather(1, index)


def _pad_left(torch: Any, tensor: Any, columns: int, dim: int) -> Any:
    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=dim)


def _concat(torch: Any, cache: Any, mask: Any, new_cache: Any, new_mask: Any) -> tuple[Any, Any]:
    """The batch's rows then the new rows, both left-padded to the longer of the two."""
    length, new_length = mask.shape[1], new_mask.shape[1]
    width = max(length, new_length)
    for layer, new in zip(_layers(cache), _layers(new_cache), strict=True):
        layer.keys = torch.cat([_pad_left(torch, layer.keys, width - length, 2),
                                _pad_left(torch, new.keys, width - new_length, 2)], dim=0)
        layer.values = torch.cat([_pad_left(torch, layer.values, width - length, 2),
                                  _pad_left(torch, new.values, width - new_length, 2)], dim=0)
    mask = torch.cat([_pad_left(torch, mask, width - length, 1), _pad_left(torch, new_mask, width - new_length, 1)])
    return cache, mask
