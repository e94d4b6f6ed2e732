"""Worker settings: each one defined once, here, with its variable, default and meaning.

Read once from the environment and validated at start-up (a bad value stops
the worker with one line naming the variable); the README's table is
generated from this class (``fma settings worker --markdown``) and a test
keeps the two equal.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ValidationInfo, field_validator, model_validator

from fma_common.settings import AutoFlag, Duration, EnvSettings, Flag, Lower, context_env, setting
from fma_common.sources import DEFAULT_MODEL, EMBEDDED_MODELS, ModelSourceError, default_cache_dir, parse_source

LogLevel = Annotated[Literal["debug", "info", "warning", "error", "critical"], Lower]


class WorkerSettings(EnvSettings):
    model: str = setting("FMA_MODEL", DEFAULT_MODEL, "served model name (the `model` field clients send)",
                         min_length=1)
    source: str | None = setting(
        "FMA_MODEL_SOURCE", None, "where weights come from: `embedded:NAME`, `hf:ORG/NAME` or `path:/folder`",
        shown="`embedded:NAME` if NAME is embedded")
    kind: Annotated[Literal["chat", "completion", "embedding"], Lower] | None = setting(
        "FMA_MODEL_KIND", None, "what the model is for: `chat` or `completion` (a causal LM: `/v1/completions`, "
        "`/v1/chat/completions` for chat) or `embedding` (an encoder whose pooled states are vectors: "
        "`/v1/embeddings`); the requester sets it from the models file", shown="the embedded model's, else `chat`")
    dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"], Lower] = setting(
        "FMA_DTYPE", "auto", "`auto` (the checkpoint's own type where the device multiplies it natively: bfloat16 on "
        "CPUs with avx512_bf16 or AMX and on GPUs from compute capability 8.0; a GPU never float32; else "
        "float32), `float32`, `bfloat16` or `float16`")
    device: Annotated[str, Lower] = setting(
        "FMA_DEVICE", "auto", "`auto` (`cuda` when available, else `cpu`), `cuda`, `cuda:N` or `cpu`")
    gpus: int = setting("FMA_GPUS", "0", "GPUs this worker was given (the requester sets it from the model's "
                        "`knative.gpus`); when above 0 the worker refuses to start, with the reason, unless CUDA "
                        "sees them", ge=0, le=64)
    gpu_binding: Annotated[Literal["none", "dedicated", "shared"], Lower] = setting(
        "FMA_GPU_BINDING", "none", "how the GPUs were given: `dedicated` (its own `nvidia.com/gpu`), `shared` (the "
        "requester's, by device UUID) or `none`; names the likely cause when they are missing")
    gpu_uuids: str | None = setting("FMA_GPU_UUIDS", None, "the devices it was given (`GPU-...`/`MIG-...`, comma "
                                    "separated): CUDA must see these, not others", shown="unset")
    exit_on_load_failure: Flag | None = setting(
        "FMA_EXIT_ON_LOAD_FAILURE", None, "exit (the reason in the log and `/dev/termination-log`) when the model "
        "cannot load, so Knative reports the failed Revision at once; otherwise the worker stays up and `/ready` "
        "says why", shown="`true` under Knative (`K_SERVICE` set), else `false`")
    cache_dir: Path | None = setting("FMA_CACHE_DIR", None, "where converted models are kept",
                                     shown="`$XDG_CACHE_HOME/fma` or `~/.cache/fma`")
    hub_cache_dir: Path | None = setting("FMA_HUB_CACHE_DIR", None, "the model cache a hub model (`hf:`) is "
                                         "loaded from, filled by the requester (read-only here on Knative)",
                                         shown="`FMA_CACHE_DIR`")
    max_tokens: int = setting("FMA_MAX_TOKENS", "2048", "largest `max_tokens` a request may ask for", ge=1)
    max_n: int = setting("FMA_MAX_N", "8", "largest `n` (choices per prompt)", ge=1, le=128)
    default_temperature: float | None = setting(
        "FMA_DEFAULT_TEMPERATURE", None, "`temperature` for requests that send none; otherwise the model's "
        "`generation_config.json` (the embedded model: 0.2, its model card's advice), else 1.0",
        shown="the model's", ge=0.0, le=2.0)
    default_top_p: float | None = setting(
        "FMA_DEFAULT_TOP_P", None, "`top_p` for requests that send none; same rule (embedded model: 0.9)",
        shown="the model's", gt=0.0, le=1.0)
    max_prompts: int = setting("FMA_MAX_PROMPTS", "16", "largest number of prompts in one `/v1/completions` "
                               "request", ge=1, le=1024)
    context_length: int | None = setting("FMA_CONTEXT_LENGTH", None, "lower the context window (tokens); never "
                                         "above the model's", shown="the model's", ge=1)
    max_body_bytes: int = setting("FMA_MAX_BODY_BYTES", "1048576", "largest request body; larger gets 413",
                                  ge=1024)
    max_batch: int = setting("FMA_MAX_BATCH", "16", "sequences generated together, one forward pass per step "
                             "(a request with `n` choices counts `n`); the rest wait in the queue", ge=1, le=256)
    max_batch_tokens: int = setting("FMA_MAX_BATCH_TOKENS", "32768", "KV slots the running batch may hold: its "
                                    "rows times the longest row (prompt + `max_tokens`), since the cache is padded "
                                    "to its longest row; a request larger than this runs alone", ge=64)
    prefill_chunk: int = setting("FMA_PREFILL_CHUNK", "256", "prompt tokens prefilled per step: a longer prompt is "
                                 "prefilled in chunks between decode steps, so running streams wait at most one "
                                 "chunk", ge=1)
    prefill_budget: int = setting("FMA_PREFILL_BUDGET", "256", "prompt tokens prefilled per step across waiting "
                                  "requests (at least one chunk) before running streams decode again: higher "
                                  "lowers the time to first token of a burst, and lengthens running streams' "
                                  "gap between tokens while it lasts", ge=1)
    prefix_cache_tokens: int = setting(
        "FMA_PREFIX_CACHE_TOKENS", "2048", "prompt tokens kept with their keys and values after prefill, least "
        "recently used out first: a prompt that begins as a kept one (a shared system prompt, the turns before in "
        "a conversation) is prefilled only from where the two part; memory beside the batch's cache (the embedded "
        "model: 46 KB a token in float32, 23 in bfloat16), dropped at sleep; `0` keeps none", ge=0)
    max_queue: int = setting("FMA_MAX_QUEUE", "32", "requests that may wait for a generation slot; more get 429 "
                             "with `Retry-After`", ge=0, le=10_000)
    queue_timeout_s: Duration = setting("FMA_QUEUE_TIMEOUT", "60s", "how long a request may wait for a slot "
                                        "before a 429")
    pack_weights: AutoFlag = setting(
        "FMA_PACK_WEIGHTS", "auto", "on a CPU, give each linear layer a copy of its weight laid out once for "
        "oneDNN, made between the first decode steps after a load or wake (a second copy of the weights while "
        "awake, dropped at sleep): `auto` packs bfloat16 where oneDNN can (matrix products 20-30 % faster on an "
        "Intel Xeon with AMX) and float32 on x86 CPUs with AVX2 and no AVX-512 (+36 % tokens/s on the benchmark's "
        "mixed load at 8 clients on an AMD EPYC); `true` packs float32 on any CPU; `false` never packs")
    torch_threads: int | None = setting("FMA_TORCH_THREADS", None, "torch intra-op threads (one scheduler thread "
                                        "runs every forward pass)", shown="cores", ge=1)
    sleep_drain_timeout_s: Duration = setting("FMA_SLEEP_DRAIN_TIMEOUT", "30s", "how long `/sleep` waits for "
                                              "in-flight generations to finish")
    log_prompts: Flag = setting("FMA_LOG_PROMPTS", "false", "log prompt text (off by default: prompts are user "
                                "data)")
    log_level: LogLevel = setting("FMA_LOG_LEVEL", "info", "`debug`, `info`, `warning`, `error` or `critical`")
    worker_token: str | None = setting("FMA_WORKER_TOKEN", None, "when set, every route but `/health`, `/ready` "
                                       "and `/metrics` needs `Authorization: Bearer` this token (the requester "
                                       "sets it for the workers it starts)", shown="unset")
    port: int = setting("PORT", "8000", "port gunicorn binds (Knative sets it)", ge=1, le=65535)
    host: str = setting("FMA_HOST", "0.0.0.0", "address gunicorn binds")
    worker_threads: int | None = setting("FMA_WORKER_THREADS", None, "gunicorn gthread threads",
                                         shown="`FMA_MAX_BATCH` + `FMA_MAX_QUEUE` + 8", ge=2)
    graceful_timeout_s: Duration = setting("FMA_GRACEFUL_TIMEOUT", "60s", "how long SIGTERM waits for in-flight "
                                           "requests")
    hub_offline: Flag = setting("HF_HUB_OFFLINE", "1", "never reach the Hugging Face hub at run time; only "
                                "cached or local models load (`0` allows downloads)")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"{value!r} is not auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _derive(self, info: ValidationInfo) -> WorkerSettings:
        env = context_env(info)
        source = self.source
        if source is None:
            if self.model not in EMBEDDED_MODELS:
                raise ValueError(f"FMA_MODEL_SOURCE: required for model {self.model!r}, which is not embedded "
                                 f"(embedded: {', '.join(sorted(EMBEDDED_MODELS))})")
            source = f"embedded:{self.model}"
        try:
            parsed = parse_source(source)
        except ModelSourceError as exc:
            raise ValueError(f"FMA_MODEL_SOURCE: {exc}") from None
        kind = self.kind or (EMBEDDED_MODELS[parsed.ref].kind if parsed.kind == "embedded" else "chat")
        cores = os.cpu_count() or 1
        return self.model_copy(update={
            "source": source,
            "kind": kind,
            "cache_dir": self.cache_dir.expanduser() if self.cache_dir else default_cache_dir(env),
            "hub_cache_dir": (self.hub_cache_dir.expanduser() if self.hub_cache_dir
                              else self.cache_dir.expanduser() if self.cache_dir else default_cache_dir(env)),
            "torch_threads": self.torch_threads or cores,
            "exit_on_load_failure": (self.exit_on_load_failure if self.exit_on_load_failure is not None
                                     else bool(env.get("K_SERVICE"))),
            "worker_threads": self.worker_threads or self.max_batch + self.max_queue + 8,
        })
