"""The engine: one model's state - load, sleep, wake - and its tokenizer.

Generation itself runs in ``batching.py`` (one scheduler thread, every
running request in one forward pass per step; the sampler is in
``generation.py``); the engine hands it the loaded model and keeps track of
who is using it.

Concurrency model
-----------------
* The engine is the single owner of the torch model. Its state
  (``loading`` -> ``ready`` <-> ``sleeping``, or ``failed``) and the count of
  generations in flight are guarded by one condition variable, ``_cond``.
* Loading runs on a background thread started by :meth:`start`, so the HTTP
  server answers ``/health`` (and ``/ready`` with 503) while weights load.
* A generation calls :meth:`begin_use` (refused unless ``ready``), runs, and
  calls :meth:`end_use`. Request threads only wait on their stream; the
  batcher's thread runs the forward passes for all of them. How many run at
  once is decided by admission (rows and tokens of the batch).
* :meth:`sleep` and :meth:`wake` are the only writers of the weights. Sleep
  first flips the state so no new generation starts, then waits (bounded) for
  in-flight ones to end before it touches the weights, so a generation never
  sees its weights move.

torch and transformers are imported on the loading thread, never at module
import, so building the Flask app stays cheap and tests can inject a fake.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fma_common import hub_cache
from fma_common.errors import Conflict, InvalidRequest, WorkerFailed, WorkerNotReady, WorkerSleeping
from fma_common.wire import SamplingParams

from . import dtype_policy, packed_linear, prepared, runtime_env, timeline
from .batching import Batcher, BatchStream
from .embedding import EmbeddingBatcher, Pooling, pool
from .generation import LoadedModel, ragged_prefill_fits
from .gpu_check import GpuUnavailable, gpu_problem, parse_device_list, visible_devices, write_termination_message
from .metrics import WorkerMetrics
from .model_store import ensure_embedded_converted, parse_source
from .settings import WorkerSettings

log = logging.getLogger("fma.worker.engine")

STATES = ("loading", "ready", "sleeping", "failed")


# How long after ready a forked worker lets go of the other models' weights it inherited (prepared.py): after
# the first request, typically, so their teardown (a few ms holding the GIL) never delays its first token.
RELEASE_SET_ASIDE_AFTER_S = 3.0
_MADV_POPULATE_READ = 22  # Linux 5.14+; Python 3.11's mmap module does not name it


def _fault_in(tensors: list[Any], threads: int) -> None:
    """Fault every page of the mapped tensors in now.

    One ``madvise(MADV_POPULATE_READ)`` per mapped span: a system call that holds no Python lock while the
    kernel maps the pages. Touching a page per 4 KiB with a torch op per tensor did the same at the same
    speed in a quiet forked child (23 against 22 ms for 269 MB), but took the GIL back for each of hundreds of
    small ops: with another Python thread busy in the same process (a worker's app and its readiness answers
    run beside its load) it was 7x slower. Touching is kept where the call is refused (an older kernel).
    """
    if _populate(tensors):
        return
    _touch(tensors, threads)


def page_spans(ranges: list[tuple[int, int]], page: int) -> list[tuple[int, int]]:
    """Address ranges ``[start, end)`` as page-aligned spans, a range merged into the one before when it
    starts in the page where that one ends or earlier: the tensors of one mapped file become one span, while a
    gap of a whole page or more (maybe unmapped: madvise refuses a range with a hole) keeps spans apart."""
    spans: list[list[int]] = []
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        lo -= lo % page
        if spans and lo <= -(-spans[-1][1] // page) * page:
            spans[-1][1] = max(spans[-1][1], hi)
        else:
            spans.append([lo, hi])
    return [(lo, hi) for lo, hi in spans]


def _populate(tensors: list[Any]) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    spans = page_spans([(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors],
                       os.sysconf("SC_PAGE_SIZE"))
    for lo, hi in spans:
        if madvise(lo, hi - lo, _MADV_POPULATE_READ) != 0:
            log.debug("madvise(MADV_POPULATE_READ) refused (errno %d); touching the pages instead", ctypes.get_errno())
            return False
    return True


def _touch(tensors: list[Any], threads: int) -> None:
    """Read one element per 4 KiB page, split over ``threads`` (page faults on a file mapping scale with cores:
    on this 2-core VM two threads faulted 538 MB in 32-50 ms against 56-70 ms for one). torch's sum drops the
    GIL, and each thread takes its share of every tensor, so the split is even."""
    pages = []
    for value in tensors:
        flat = value.view(-1)
        if flat.numel():
            pages.append(flat[:: max(1, 4096 // value.element_size())])

    def share(i: int) -> None:
        for view in pages:
            lo, hi = view.numel() * i // threads, view.numel() * (i + 1) // threads
            if hi > lo:
                view[lo:hi].sum()

    if threads == 1:
        share(0)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="fault-in") as pool:
        list(pool.map(share, range(threads)))


@dataclass(frozen=True)
class LoadReport:
    seconds: float
    weight_bytes: int
    phases: dict[str, float]

    @property
    def bytes_per_second(self) -> float:
        return self.weight_bytes / max(self.phases.get("weights", self.seconds), 1e-9)


def resolve_device(requested: str, torch: Any) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"FMA_DEVICE={requested} but CUDA is not available in this process")
    return requested


# A fixed text whose next-token logits are recorded while the weights are known good and checked after each
# wake that moved them: a wake that brings back damaged weights (users of vLLM's level 2 have met silent
# garbage) fails with the reason instead of serving. Two tokens, so attention (queries and keys) takes part.
CANARY_TEXT = "The quick"
CANARY_TOKENS = 2


@dataclass(frozen=True)
class Canary:
    top: list[int]  # the 5 likeliest next tokens, best first
    logits: Any  # the last position's logits over the whole vocabulary (a CPU float tensor)


class WakeCorrupted(RuntimeError):
    pass


class Engine:
    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._cond = threading.Condition()
        self._state = "loading"
        self._error: str | None = None
        self._in_flight = 0
        self._sleep_level = 0
        self._actuation = threading.Lock()  # serializes sleep and wake: the only weight writers
        self._thread: threading.Thread | None = None
        self._torch: Any = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._folder: Path | None = None
        self.device = "cpu"
        self.dtype_name = "float32"
        self.context_length = 0
        self.vocab_size = 0
        self.default_temperature = 1.0
        self.default_top_p = 1.0
        self._eos_ids: set[int] = set()
        self._cache_kw = "past_key_values"
        self._forward_extra: dict[str, Any] = {}
        self.last_load: LoadReport | None = None
        self.created = int(time.time())
        metrics.set_state(self._state, STATES)
        self._lm: LoadedModel | None = None
        self._packer: packed_linear.Packer | None = None  # on a CPU: oneDNN-packed copies of the weights
        self._last_skeleton_s = 0.0
        self._last_weights_s = 0.0
        self._skeleton: Any = None  # a level-2 sleeper's modules, parameters emptied
        self._mapped = False
        self._filled = False  # the launcher's skeleton came with the weights already mapped into it
        self._canary_ids: list[int] = []
        self._reference: Canary | None = None  # the canary's answer from known-good weights; every wake must match
        self._print: Any = None  # a CPU level-1 sleeper's weight fingerprint
        self.kind = settings.kind or "chat"
        # Every generation runs on this one scheduler: concurrent requests share forward passes.
        self.batcher = Batcher(self._loaded, max_rows=settings.max_batch, prefill_chunk=settings.prefill_chunk,
                               prefill_budget=settings.prefill_budget,
                               on_step=self._stepped, prefix_tokens=settings.prefix_cache_tokens,
                               on_prefix_hit=self._prefix_hit)
        # An embedding model's inputs, likewise (embedding.py); its pooling and limits are read at load.
        self.embedder = EmbeddingBatcher(self._embed_rows, max_rows=settings.max_batch,
                                         max_tokens=settings.max_batch_tokens) if self.kind == "embedding" else None
        self._pooling: Pooling | None = None
        self.embedding_dim = 0
        self.max_input_tokens = 0

    # ---- state ------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def is_ready(self) -> bool:
        return self._state == "ready"

    @property
    def is_sleeping(self) -> bool:
        return self._state == "sleeping"

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _set_state(self, state: str) -> None:
        self._state = state
        self.metrics.set_state(state, STATES)
        self._cond.notify_all()

    def wait_until_settled(self, timeout: float) -> str:
        """Block until loading ends (ready or failed); returns the state."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._state == "loading":
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._state

    # ---- loading ----------------------------------------------------------

    def start(self) -> None:
        """Load in the background; ``/ready`` turns 200 when this finishes."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._load_guarded, name="fma-model-loader", daemon=True)
        self._thread.start()

    def _load_guarded(self) -> None:
        try:
            self.load()
        except Exception as exc:
            if isinstance(exc, GpuUnavailable):  # the reason is the whole story: no traceback
                log.error("model %s cannot start: %s", self.settings.model, exc)
            else:
                log.exception("model %s failed to load", self.settings.model)
            with self._cond:
                self._error = f"{type(exc).__name__}: {exc}"
                self._set_state("failed")
            prepared.release_set_aside()  # a failed worker may stay up: it must not keep other models' files mapped
            if self.settings.exit_on_load_failure:
                self._exit_failed()
            # Otherwise the worker stays up to report why it is not ready (/ready), as the local requester reads it.

    def _exit_failed(self) -> None:
        """Under Knative a worker that stays up unready is only seen at the progress deadline (minutes); one that
        exits is seen at once, with this reason as the Revision's "Container failed with: ..."."""
        write_termination_message(f"{self.settings.model}: {self._error}")
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        # 3 is gunicorn's WORKER_BOOT_ERROR: its arbiter halts instead of starting another worker that would fail
        # the same way (gunicorn/arbiter.py, reap_workers).
        os._exit(3)

    def load(self) -> LoadReport:
        s = self.settings
        phases: dict[str, float] = {}
        timeline.mark("load")
        t0 = time.monotonic()
        runtime_env.prepare()  # idempotent; gunicorn_conf already ran it in a served worker
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(s.torch_threads or 1)
        self._torch = torch
        phases["import"] = time.monotonic() - t0
        log.info("hub settings in effect: %s", runtime_env.effective_hub_settings())

        if s.gpus and s.device != "cpu":
            problem = gpu_problem(s.gpu_binding, s.gpus, parse_device_list(s.gpu_uuids), visible_devices(torch),
                                  os.environ)
            if problem:
                raise GpuUnavailable(problem)
        self.device = resolve_device(s.device, torch)
        source = parse_source(s.source)
        hub_folder = None
        if source.kind == "hf":
            # From the model cache, checked when it was fetched (hub_cache.py); else a complete snapshot in
            # huggingface_hub's own cache (a model put there by hand for an offline machine); else fetched, which
            # is refused with advice when this worker is offline (the requester fetches before starting it).
            ref = hub_cache.HubRef.parse(source.ref)
            cache = s.hub_cache_dir or s.cache_dir
            hit = hub_cache.cached(ref, cache)
            hub_folder = hit.folder if hit else hub_cache.from_hf_cache(ref) or hub_cache.fetch(ref, cache).folder
        # A hub model's config is read once, here, for its dtype and below for the model.
        hub_config = transformers.AutoConfig.from_pretrained(str(hub_folder)) if hub_folder else None
        choice = dtype_policy.choose(s.dtype, self.device, dtype_policy.source_checkpoint_dtype(source, hub_config),
                                     dtype_policy.host_native(self.device, torch))
        self.dtype_name = choice.dtype
        log.info("computing in %s: %s", choice.dtype, choice.reason)
        t = time.monotonic()
        if source.kind == "embedded":
            self._folder = ensure_embedded_converted(source.ref, self.dtype_name, s.cache_dir)
        elif source.kind == "path":
            folder = Path(source.ref)
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
            self._folder = folder
        else:
            self._folder = hub_folder
        phases["prepare"] = time.monotonic() - t

        # The launcher may have built the config, tokenizer and empty model before forking us (prepared.py).
        t = time.monotonic()
        parts = prepared.take(self._folder, self.dtype_name) if isinstance(self._folder, Path) else None
        prepared.set_aside_others()  # a forked child: the other models' parts are not ours (freed after the start)
        config = parts.config if parts else hub_config or transformers.AutoConfig.from_pretrained(str(self._folder))
        if parts is None and self.device == "cpu" and isinstance(self._folder, Path):
            # Building it imports the modeling code.
            self._skeleton = prepared.empty_model(config, getattr(torch, self.dtype_name), self.kind)
            phases["skeleton"] = time.monotonic() - t
        elif parts is None:
            # Import the architecture's modeling code now (an empty model on the meta device, no initialisation),
            # so "weights" measures weights only.
            with prepared.no_init(), torch.device("meta"):
                prepared.auto_class(self.kind).from_config(config)
            phases["import"] += time.monotonic() - t
        else:
            self._skeleton = parts.skeleton if self.device == "cpu" else None
            self._filled = parts.filled and self._skeleton is not None
            if self._skeleton is not None:
                phases["skeleton"] = 0.0  # built by the launcher before the fork
            log.info("using the config, tokenizer%s the launcher prepared (%.2f s before the fork)",
                     " and empty model" if self._skeleton is not None else "", parts.seconds)

        t = time.monotonic()
        self._tokenizer = parts.tokenizer if parts else transformers.AutoTokenizer.from_pretrained(str(self._folder))
        phases["tokenizer"] = time.monotonic() - t

        weight_bytes = self._load_weights()
        if self._last_skeleton_s:  # the mapping had to build the modules itself
            phases["skeleton"] = phases.get("skeleton", 0.0) + self._last_skeleton_s
        phases["weights"] = self._last_weights_s

        if self.device.startswith("cuda"):
            # On an accelerator the canary is also the warm-up (kernel loading, cuBLAS handles, allocator growth)
            # the first request would otherwise pay. On a CPU it would only add a forward pass to the cold start:
            # the reference is recorded at the first sleep instead, before the weights first move (inference
            # never writes them, so they are the weights that were loaded).
            t = time.monotonic()
            self._reference = self._canary()
            phases["warmup"] = time.monotonic() - t

        cfg = self._model.config
        model_ctx = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        self.context_length = min(model_ctx, s.context_length) if s.context_length else model_ctx
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or len(self._tokenizer))
        if self.kind == "embedding":
            self._pooling = Pooling.from_folder(self._pooling_folder())
            # The longest input the model was trained on (sentence-transformers' max_seq_length), never above its
            # positions; special tokens included.
            self.max_input_tokens = min(self.context_length, self._pooling.max_seq_length or self.context_length)
            self.embedding_dim = int(cfg.hidden_size) * len(self._pooling.modes)
        else:
            self._eos_ids = _eos_ids(self._model, self._tokenizer)
            self.default_temperature, self.default_top_p = _sampling_defaults(self._model, s)

        report = LoadReport(time.monotonic() - t0, weight_bytes, phases)
        self.last_load = report
        for phase, secs in phases.items():
            self.metrics.load.labels(s.model, phase).observe(secs)
        self.metrics.load.labels(s.model, "total").observe(report.seconds)
        self.metrics.load_throughput.labels(s.model).set(report.bytes_per_second)
        log.info("loaded %s from %s on %s/%s in %.2f s (%s); weights %.1f MB at %.1f MB/s",
                 s.model, self._folder, self.device, self.dtype_name, report.seconds,
                 ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()),
                 weight_bytes / 1e6, report.bytes_per_second / 1e6)
        timeline.mark("ready")
        with self._cond:
            self._set_state("ready")
        inherited = prepared.set_aside_weights()
        if inherited:
            # Off the start and its first request: the other models' mapped weights this forked child inherited.
            release = threading.Timer(RELEASE_SET_ASIDE_AFTER_S, prepared.release_set_aside, args=(inherited,))
            release.name, release.daemon = "fma-release-inherited", True
            release.start()
        return report

    def _load_weights(self) -> int:
        """(Re)load the weights from the prepared folder onto the device."""
        torch = self._torch
        t = time.monotonic()
        self._last_skeleton_s = 0.0
        model = self._map_weights(self._skeleton) if self.device == "cpu" else None
        self._skeleton = None
        self._mapped = model is not None
        if model is None:
            kwargs: dict[str, Any] = {"dtype": getattr(torch, self.dtype_name)}
            if self.device.startswith("cuda"):
                kwargs["device_map"] = self.device  # straight to the GPU, no host copy
            model = prepared.auto_class(self.kind).from_pretrained(str(self._folder), **kwargs)
        model.eval()
        # transformers renamed the KV-cache argument (and output) from
        # past_key_values to cache in 5.2x; use whichever this version has.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # Only the last position's logits are needed; skips a [prompt x vocab] matmul.
        self._forward_extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._model = model
        # Generation only: the batch scheduler packs between its steps; an embedding model has no such steps.
        if self.kind != "embedding" and \
                packed_linear.supported(torch, self.device, self.dtype_name, self.settings.pack_weights):
            if self._packer is None or self._packer.model is not model:
                self._packer = packed_linear.Packer(torch, model, getattr(torch, self.dtype_name))  # between steps
            else:
                self._packer.drop()  # a level-2 wake mapped new weights into the same modules
        self._last_weights_s = time.monotonic() - t - self._last_skeleton_s
        return _param_bytes(model)

    def _map_weights(self, skeleton: Any = None) -> Any:
        """On a CPU: the safetensors files mapped straight into the model's parameters (prepared.map_into).

        No random initialisation (the skeleton's parameters are empty) and no copy: the tensors are the
        file's pages, already in the page cache for the converted embedded model. A skeleton the launcher
        filled before the fork (``self._filled``) is already mapped; only its pages are left to touch. Every
        page is touched here, so the time counted as the weights phase is the time until all weights are in
        memory, not a lazy promise. None (and ``from_pretrained``) for anything mapping does not cover.
        """
        from transformers import AutoConfig

        torch = self._torch
        folder = Path(str(self._folder))
        filled, self._filled = self._filled and skeleton is not None, False  # once: a level-2 wake maps again
        if not (folder.is_dir() and any(folder.glob("*.safetensors"))):
            return None
        dtype = getattr(torch, self.dtype_name)
        started = time.monotonic()
        if skeleton is not None:
            model = skeleton
        else:
            model = prepared.empty_model(AutoConfig.from_pretrained(str(folder)), dtype, self.kind)
        started_mapping = time.monotonic()
        tensors = [p.detach() for p in model.parameters()] if filled else prepared.map_into(model, folder, dtype)
        if tensors is None:
            return None
        self._last_skeleton_s = started_mapping - started  # building the empty modules: not weights
        _fault_in(tensors, max(1, torch.get_num_threads()))
        return model

    def device_memory_allocated(self) -> int | None:
        """Bytes torch holds on the accelerator (None on CPU): shows that sleep released them."""
        torch = self._torch
        if torch is None or not self.device.startswith("cuda"):
            return None
        return int(torch.cuda.memory_allocated(torch.device(self.device)))

    def _canary(self) -> Canary:
        """One short forward pass: the last position's logits, which every weight of the model shapes."""
        torch = self._torch
        if not self._canary_ids and self.kind == "embedding":
            self._canary_ids = self.encode_for_embedding([CANARY_TEXT])[0]
        if not self._canary_ids:
            ids = self.encode(CANARY_TEXT)[:CANARY_TOKENS]
            self._canary_ids = ids if len(ids) == CANARY_TOKENS else [self._tokenizer.eos_token_id or 0] * 2
        with torch.inference_mode():
            if self.kind == "embedding":  # the canary text's vector: every weight shapes it too
                logits = self._embed_tensor([self._canary_ids])[0]
            else:
                ids = torch.tensor([self._canary_ids], device=self.device)
                logits = self._model(input_ids=ids, use_cache=False, **self._forward_extra).logits[0, -1].float()
            canary = Canary(logits.topk(5).indices.tolist(), logits.cpu())
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return canary

    def _record_reference(self) -> None:
        """The canary's answer from weights known to be good (before they first move), once per load."""
        if self._reference is None:
            self._reference = self._canary()

    def _verify(self, level: int) -> None:
        """After a wake: the same canary logits as before the first sleep, or the worker fails rather than serve
        garbage."""
        ref = self._reference
        if ref is None:
            return  # never slept since load: there is nothing the weights could have lost
        got = self._canary()
        drift = float((ref.logits - got.logits).abs().max())
        tolerance = 1e-3 if self.dtype_name == "float32" else 5e-2
        if got.top != ref.top or drift > tolerance * max(1.0, float(ref.logits.abs().max())):
            raise WakeCorrupted(f"wake from level {level} failed verification: the canary's top tokens "
                                f"{'changed' if got.top != ref.top else 'held'} and its logits are off by up to "
                                f"{drift:.4g}; the weights did not come back intact (release the worker and start "
                                "it again)")

    def _fingerprint(self) -> Any:
        """One element per 4 KiB page of every parameter, summed per parameter: cheap, and exact for weights
        that stayed where they were (a CPU level-1 sleep moves nothing, so no forward pass is needed)."""
        torch = self._torch
        sums = []
        with torch.inference_mode():
            for param in self._model.parameters():
                flat = param.detach().view(-1)
                sums.append(flat[:: max(1, 4096 // param.element_size())].double().sum())
        return torch.stack(sums).cpu() if sums else torch.zeros(0)

    # ---- sleep / wake -----------------------------------------------------

    def sleep(self, level: int) -> float:
        with self._actuation:
            return self._sleep(level)

    def wake(self) -> float:
        with self._actuation:
            return self._wake()

    def _sleep(self, level: int) -> float:
        """Put the weights to sleep; returns the seconds it took.

        Level 1 moves the weights to host memory (pinned, for a fast copy back);
        on a CPU device they already are in host memory, so only the state
        changes. Level 2 drops the weights; wake reloads them from the prepared
        folder (the converted cache for embedded models).
        """
        started = time.monotonic()
        with self._cond:
            if self._state == "sleeping":
                return 0.0
            if self._state != "ready":
                raise WorkerNotReady(f"cannot sleep while the model is {self._state}")
            self._set_state("sleeping")  # no new generation starts from here on
            deadline = started + self.settings.sleep_drain_timeout_s
            while self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._set_state("ready")
                    raise Conflict(f"{self._in_flight} generation(s) still running after "
                                   f"{self.settings.sleep_drain_timeout_s:.0f} s; sleep cancelled")
                self._cond.wait(remaining)
        # A request's use can end before the batcher's last step for it does (a stream whose client left): the
        # weights move only once no step can touch them any more.
        idle = self.batcher.wait_idle(max(0.0, deadline - time.monotonic()))
        if idle and self.embedder is not None:
            idle = self.embedder.wait_idle(max(0.0, deadline - time.monotonic()))
        if not idle:
            with self._cond:
                self._set_state("ready")
            raise Conflict(f"the batch was still running after {self.settings.sleep_drain_timeout_s:.0f} s; "
                           f"sleep cancelled")
        with self._cond:
            self._sleep_level = level
        torch = self._torch
        self.batcher.prefixes.forget()  # kept prompts' keys and values: device memory a sleeper gives back
        if self._packer is not None:
            # A sleeper holds one copy of its weights; the canary and the wake's check run on them, and the
            # copies are made again after the wake.
            self._packer.drop()
        try:
            self._record_reference()  # nothing runs now, and the weights have not moved yet
        except Exception:
            with self._cond:
                self._set_state("ready")
            raise
        if level == 1:
            if self.device == "cpu":
                self._print = self._fingerprint()
                _trim_heap()  # the packed copies' memory back to the system
            if self.device.startswith("cuda"):
                self._model.to("cpu")
                for p in self._model.parameters():
                    p.data = p.data.pin_memory()
                torch.cuda.empty_cache()
        else:
            # A mapped model keeps its modules (their parameters become empty): the wake maps the file into
            # them again instead of building the model anew. Anything else is dropped whole.
            self._skeleton = _emptied(self._model, torch) if self._mapped else None
            if self._skeleton is None:
                self._packer = None  # it holds the modules: the model would stay in memory through it
            self._model = None
            self._lm = None  # the batcher's view holds the model too
            gc.collect()
            _trim_heap()
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        secs = time.monotonic() - started
        self.metrics.sleep.labels(self.settings.model, str(level)).observe(secs)
        log.info("model %s asleep at level %d in %.3f s", self.settings.model, level, secs)
        return secs

    def _wake(self) -> float:
        started = time.monotonic()
        with self._cond:
            if self._state != "sleeping":
                return 0.0
            level = self._sleep_level
        torch = self._torch
        try:
            if level == 1 and self.device == "cpu":
                # Nothing moved: the same memory must hold the same values (a forward pass would prove no more).
                if not torch.equal(self._fingerprint(), self._print):
                    raise WakeCorrupted("wake from level 1 failed verification: the weights kept in memory changed "
                                        "while asleep (release the worker and start it again)")
            else:
                if level == 1:
                    self._model.to(self.device, non_blocking=True)
                    torch.cuda.synchronize()
                else:
                    self._load_weights()
                self._verify(level)
        except Exception as exc:
            log.exception("wake failed for %s", self.settings.model)
            with self._cond:
                self._error = f"wake failed: {type(exc).__name__}: {exc}"
                self._set_state("failed")
            raise WorkerFailed(self._error) from exc
        secs = time.monotonic() - started
        with self._cond:
            self._sleep_level = 0
            self._set_state("ready")
        self.metrics.wake.labels(self.settings.model, str(level)).observe(secs)
        log.info("model %s awake from level %d in %.3f s", self.settings.model, level, secs)
        return secs

    # ---- use --------------------------------------------------------------

    def check_serving(self) -> None:
        """Raise the error a client should see if the model cannot serve now."""
        state = self._state
        if state == "ready":
            return
        if state == "sleeping":
            raise WorkerSleeping(f"model {self.settings.model} is sleeping; POST /wake_up first")
        if state == "failed":
            raise WorkerFailed(f"model {self.settings.model} failed to load: {self._error}")
        raise WorkerNotReady(f"model {self.settings.model} is still loading; retry shortly",
                             headers={"Retry-After": "2"})

    def begin_use(self) -> None:
        with self._cond:
            self.check_serving()
            self._in_flight += 1
            self.metrics.in_flight.labels(self.settings.model).set(self._in_flight)

    def end_use(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self.metrics.in_flight.labels(self.settings.model).set(self._in_flight)
            self._cond.notify_all()

    # ---- tokens -----------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self._tokenizer, "chat_template", None):
            raise InvalidRequest(f"model {self.settings.model} has no chat template; use /v1/completions")
        text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def check_token_ids(self, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                                 param="prompt")

    # ---- generation -------------------------------------------------------

    def _loaded(self) -> LoadedModel | None:
        """The model as the batcher runs it; rebuilt when the weights object changes (load, level-2 wake)."""
        model = self._model
        if model is None:
            return None
        if self._lm is None or self._lm.model is not model:
            self._lm = LoadedModel(torch=self._torch, model=model,
                                   backend_tokenizer=self._tokenizer.backend_tokenizer, device=self.device,
                                   vocab_size=self.vocab_size, eos_ids=self._eos_ids, cache_kw=self._cache_kw,
                                   forward_extra=self._forward_extra,
                                   ragged_prefill=ragged_prefill_fits(model.config),
                                   between_steps=self._packer.pack_next if self._packer is not None
                                   and self._packer.model is model else None)
        return self._lm

    def _stepped(self, rows: int) -> None:
        self.metrics.batch_rows.labels(self.settings.model).observe(rows)

    def _prefix_hit(self, tokens: int) -> None:
        self.metrics.prefix_hit_tokens.labels(self.settings.model).inc(tokens)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> BatchStream:
        """The steps of one generation, run in the shared batch; closing the stream leaves the batch.

        The caller holds :meth:`begin_use`, so the weights cannot move meanwhile.
        """
        lm = self._loaded()
        if lm is None:
            self.check_serving()
            raise WorkerNotReady(f"model {self.settings.model} has no weights loaded")
        return self.batcher.submit(lm, prompt_ids, params)

    # ---- embeddings -------------------------------------------------------

    def encode_for_embedding(self, texts: list[str]) -> list[list[int]]:
        """Token ids as the encoder was trained on them: with its special tokens ([CLS] ... [SEP]), uncut."""
        return [list(ids) for ids in self._tokenizer(texts, add_special_tokens=True)["input_ids"]]

    def _pooling_folder(self) -> Path:
        """Where the model's sentence-transformers files are: its folder (a hub model's is its cached snapshot,
        fetched with every file but other frameworks' weights)."""
        assert isinstance(self._folder, Path)
        return self._folder

    def _embed_tensor(self, rows: list[list[int]]) -> Any:
        """One forward pass over ``rows`` (right-padded), pooled as the model says: a [rows, dim] float tensor."""
        torch = self._torch
        assert self._pooling is not None and self._model is not None
        width = max(map(len, rows))
        pad = self._tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
            return pool(torch, hidden, mask, self._pooling).cpu()

    def _embed_rows(self, rows: list[list[int]]) -> list[list[float]]:
        return self._embed_tensor(rows).tolist()

    def embed(self, rows: list[list[int]]) -> list[list[float]]:
        """One vector per row, computed in the shared embedding passes. The caller holds :meth:`begin_use`."""
        if self.embedder is None:
            raise InvalidRequest(f"model {self.settings.model} is a {self.kind} model, not an embedding model; "
                                 "use /v1/completions or /v1/chat/completions", param="model")
        return self.embedder.run(rows)

    def close(self) -> None:
        self.batcher.stop()
        if self.embedder is not None:
            self.embedder.stop()


def _emptied(model: Any, torch: Any) -> Any:
    """The model with every parameter replaced by an empty (meta) one: its memory is freed, its modules kept.

    Each keeps its ``requires_grad``: ``load_state_dict(assign=True)`` keeps the module's, and with torch 2.13
    on a CPU a bfloat16 linear whose weight has ``requires_grad=False`` copies the weight on every call (every
    forward after a level-2 wake ran 3x slower: 0.12-0.17 s against 0.04 s, ``aten::copy_`` 96 of 140 ms).
    """
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(param, device="meta"),
                                                              requires_grad=param.requires_grad)
    return model


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise: the weights' RSS would stay)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _sampling_defaults(model: Any, settings: WorkerSettings) -> tuple[float, float]:
    """Defaults for requests that leave temperature/top_p out.

    The deployment's settings win; otherwise the model's generation_config
    (when it samples), otherwise OpenAI's 1.0.
    """
    gen = getattr(model, "generation_config", None)
    samples = bool(getattr(gen, "do_sample", False))
    temperature = getattr(gen, "temperature", None) if samples else None
    top_p = getattr(gen, "top_p", None) if samples else None
    return (settings.default_temperature if settings.default_temperature is not None else float(temperature or 1.0),
            settings.default_top_p if settings.default_top_p is not None else float(top_p or 1.0))


def _param_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
