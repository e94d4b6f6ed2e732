"""Sentence embeddings: the model's own sentence-transformers pooling, and a batcher for concurrent requests.

An embedding model (``kind: embedding``) is an encoder (BERT and the like) whose
token states are pooled into one vector per input. How, is the model's own
choice, written next to its weights by sentence-transformers: ``modules.json``
lists the modules in order (``Transformer``, ``Pooling``, optionally
``Normalize``), the pooling module's ``config.json`` says which pooling
(``pooling_mode_cls_token``, ``_mean_tokens``, ``_max_tokens``,
``_mean_sqrt_len_tokens``, ``_lasttoken``) and ``sentence_bert_config.json``
the longest input the model was trained on (``max_seq_length``). We read the
same files and compute the same thing (sentence-transformers'
``models/Pooling.py`` and ``models/Normalize.py``), so the vectors equal its
``encode`` (a test compares them with sentence-transformers itself). A folder
without those files is pooled as sentence-transformers pools a plain
transformers model: mean over the tokens, no normalisation.

Every request's inputs become rows of one forward pass where they fit
(``EmbeddingBatcher``): concurrent requests share passes instead of queueing
behind each other, as the chat worker's continuous batching does for decoding.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fma_common.errors import ApiError, InternalError

log = logging.getLogger("fma.worker.embedding")

# The Pooling config's keys, in the order sentence-transformers concatenates the vectors (Pooling.forward).
POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                "pooling_mode_lasttoken": "lasttoken"}


@dataclass(frozen=True)
class Pooling:
    """How token states become one vector (sentence-transformers' Pooling and Normalize modules)."""

    modes: tuple[str, ...] = ("mean",)  # concatenated in this order, as sentence-transformers does
    normalize: bool = False
    max_seq_length: int | None = None
    include_prompt: bool = True

    @classmethod
    def from_folder(cls, folder: Path) -> Pooling:
        """Read the model folder's sentence-transformers files; raise ValueError for a setup we do not compute."""
        modules_file = folder / "modules.json"
        max_len = None
        st_config = folder / "sentence_bert_config.json"
        if st_config.is_file():
            max_len = json.loads(st_config.read_text()).get("max_seq_length")
        if not modules_file.is_file():
            return cls(max_seq_length=max_len)
        modules = json.loads(modules_file.read_text())
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        unknown = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
        if unknown:
            raise ValueError(f"{folder}: sentence-transformers modules {unknown} are not supported "
                             "(Transformer, Pooling and Normalize are)")
        if "Pooling" not in kinds:
            return cls(normalize="Normalize" in kinds, max_seq_length=max_len)
        pooling = modules[kinds.index("Pooling")]
        config = json.loads((folder / str(pooling.get("path") or "") / "config.json").read_text())
        modes = tuple(mode for key, mode in POOLING_KEYS.items() if config.get(key))
        if not modes:
            raise ValueError(f"{folder}: the Pooling module's config names no pooling this worker computes "
                             f"({', '.join(POOLING_KEYS.values())})")
        if config.get("pooling_mode_weightedmean_tokens"):
            raise ValueError(f"{folder}: weighted-mean pooling is not supported")
        return cls(modes=modes, normalize="Normalize" in kinds, max_seq_length=max_len,
                   include_prompt=bool(config.get("include_prompt", True)))


def pool(torch: Any, hidden: Any, mask: Any, pooling: Pooling) -> Any:
    """[rows, tokens, dim] states and their [rows, tokens] mask (1 = a real token, right padding) -> [rows, dim']."""
    hidden = hidden.float()  # accumulate in float32 whatever the model computes in (sentence-transformers does)
    mask_f = mask.unsqueeze(-1).to(hidden.dtype)
    parts = []
    for mode in pooling.modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            # Padding must never win the max (sentence-transformers sets it to a large negative value).
            parts.append(hidden.masked_fill(mask_f == 0, -1e9).max(dim=1).values)
        elif mode == "lasttoken":
            last = mask.sum(dim=1) - 1
            parts.append(hidden[torch.arange(hidden.shape[0]), last])
        else:
            total = (hidden * mask_f).sum(dim=1)
            count = mask_f.sum(dim=1).clamp(min=1e-9)
            parts.append(total / (count.sqrt() if mode == "mean_sqrt_len" else count))
    vectors = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    if pooling.normalize:
        vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
    return vectors


# ---- batching ------------------------------------------------------------------------------------------


@dataclass
class EmbedJob:
    rows: list[list[int]]
    done: threading.Event = field(default_factory=threading.Event)
    vectors: list[list[float]] | None = None
    error: BaseException | None = None


class EmbeddingBatcher:
    """One thread runs forward passes; each takes the waiting inputs, oldest first, up to ``max_rows`` rows and
    ``max_tokens`` padded tokens (a job's rows may span passes). ``run(rows)`` blocks until its vectors exist."""

    def __init__(self, encode: Any, *, max_rows: int, max_tokens: int) -> None:
        self._encode = encode  # list[list[int]] -> list[list[float]], one vector per row, same order
        self.max_rows, self.max_tokens = max_rows, max_tokens
        self._cond = threading.Condition()
        self._pending: deque[tuple[EmbedJob, int]] = deque()  # (job, index of its next row)
        self._results: dict[int, dict[int, list[float]]] = {}
        self._busy = False
        self._stopping = False
        self.passes = 0
        self._thread = threading.Thread(target=self._loop, name="fma-embed-batcher", daemon=True)
        self._thread.start()

    def run(self, rows: list[list[int]], timeout: float | None = None) -> list[list[float]]:
        job = EmbedJob(rows)
        with self._cond:
            if self._stopping:
                raise InternalError("the worker is shutting down")
            self._results[id(job)] = {}
            self._pending.append((job, 0))
            self._cond.notify_all()
        if not job.done.wait(timeout):
            raise InternalError("the embedding pass did not finish in time")
        if job.error is not None:
            raise job.error
        assert job.vectors is not None
        return job.vectors

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy or self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _take(self) -> list[tuple[EmbedJob, int]]:
        """(job, row index) pairs for the next pass; at least one row whatever its length."""
        taken: list[tuple[EmbedJob, int]] = []
        longest = 0
        while self._pending and len(taken) < self.max_rows:
            job, i = self._pending[0]
            width = max(longest, len(job.rows[i]))
            if taken and width * (len(taken) + 1) > self.max_tokens:
                break
            taken.append((job, i))
            longest = width
            if i + 1 < len(job.rows):
                self._pending[0] = (job, i + 1)
            else:
                self._pending.popleft()
        return taken

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    for job, _ in self._pending:
                        job.error = InternalError("the worker is shutting down")
                        job.done.set()
                    self._pending.clear()
                    return
                self._busy = True
                taken = self._take()
            try:
                vectors = self._encode([job.rows[i] for job, i in taken])
                error: BaseException | None = None
            except ApiError as exc:
                vectors, error = [], exc
            except Exception:  # a bug or a device failure: every job in the pass fails, the worker serves on
                log.exception("embedding pass failed")
                vectors, error = [], InternalError("the embedding pass failed; see the worker log")
            self.passes += 1
            with self._cond:
                for n, (job, i) in enumerate(taken):
                    if job.done.is_set():
                        continue
                    if error is not None:
                        job.error = error
                        job.done.set()
                        self._results.pop(id(job), None)
                        continue
                    got = self._results.setdefault(id(job), {})
                    got[i] = vectors[n]
                    if len(got) == len(job.rows):
                        job.vectors = [got[k] for k in range(len(job.rows))]
                        self._results.pop(id(job), None)
                        job.done.set()
                if error is not None:  # the failed jobs' rows still waiting must not run
                    self._pending = deque((j, i) for j, i in self._pending if not j.done.is_set())
