"""Worker settings, read once from the environment and validated at start-up.

Every variable is listed in :data:`WORKER_ENV` with its default and meaning;
the README's table is checked against it by a test.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fma_common.settings import (
    SettingsError,
    env_bool,
    env_choice,
    env_duration,
    env_float,
    env_int,
    env_str,
)

from .model_store import DEFAULT_MODEL, EMBEDDED_MODELS, ModelSourceError, default_cache_dir, parse_source

# name -> (default shown in the README, meaning)
WORKER_ENV: dict[str, tuple[str, str]] = {
    "FMA_MODEL": (DEFAULT_MODEL, "served model name (the `model` field clients send)"),
    "FMA_MODEL_SOURCE": ("embedded:NAME if NAME is embedded",
                         "where weights come from: `embedded:NAME`, `hf:ORG/NAME` or `path:/folder`"),
    "FMA_DTYPE": ("auto", "`auto` (bfloat16 on CUDA, float32 on CPU), `float32`, `bfloat16` or `float16`"),
    "FMA_DEVICE": ("auto", "`auto` (`cuda` when available, else `cpu`), `cuda`, `cuda:N` or `cpu`"),
    "FMA_CACHE_DIR": ("$XDG_CACHE_HOME/fma or ~/.cache/fma", "where converted models are kept"),
    "FMA_MAX_TOKENS": ("2048", "largest `max_tokens` a request may ask for"),
    "FMA_MAX_N": ("8", "largest `n` (choices per prompt)"),
    "FMA_DEFAULT_TEMPERATURE": ("the model's", "temperature for requests without one (else generation_config, else 1)"),
    "FMA_DEFAULT_TOP_P": ("the model's", "top_p for requests without one (else generation_config, else 1)"),
    "FMA_MAX_PROMPTS": ("16", "largest number of prompts in one `/v1/completions` request"),
    "FMA_CONTEXT_LENGTH": ("the model's", "override the context window (tokens); never above the model's"),
    "FMA_MAX_BODY_BYTES": ("1048576", "largest request body; larger gets 413"),
    "FMA_MAX_CONCURRENCY": ("1", "generations that run at the same time; the rest wait in the queue"),
    "FMA_MAX_QUEUE": ("32", "requests that may wait for a generation slot; more get 429 with Retry-After"),
    "FMA_QUEUE_TIMEOUT": ("60s", "how long a request may wait for a slot before a 429"),
    "FMA_TORCH_THREADS": ("cores / FMA_MAX_CONCURRENCY", "torch intra-op threads"),
    "FMA_SLEEP_DRAIN_TIMEOUT": ("30s", "how long /sleep waits for in-flight generations to finish"),
    "FMA_LOG_PROMPTS": ("false", "log prompt text (off by default: prompts are user data)"),
    "FMA_LOG_LEVEL": ("info", "log level"),
    "PORT": ("8000", "port gunicorn binds (Knative sets it)"),
    "FMA_HOST": ("0.0.0.0", "address gunicorn binds"),
    "FMA_WORKER_THREADS": ("FMA_MAX_CONCURRENCY + FMA_MAX_QUEUE + 8", "gunicorn gthread threads"),
    "FMA_GRACEFUL_TIMEOUT": ("60s", "how long SIGTERM waits for in-flight requests"),
    "HF_HUB_OFFLINE": ("1 unless set", "never reach the hub at run time; only cached or local models load"),
}


def _optional_float(env: Mapping[str, str], name: str, low: float, high: float) -> float | None:
    if not env.get(name):
        return None
    value = env_float(env, name, 0.0, minimum=low)
    if value > high:
        raise SettingsError(f"{name}: must be <= {high}, got {value}")
    return value


@dataclass(frozen=True)
class WorkerSettings:
    model: str
    source: str
    dtype: str
    device: str
    cache_dir: Path
    max_tokens: int
    max_n: int
    default_temperature: float | None
    default_top_p: float | None
    max_prompts: int
    context_length: int | None
    max_body_bytes: int
    max_concurrency: int
    max_queue: int
    queue_timeout_s: float
    torch_threads: int
    sleep_drain_timeout_s: float
    log_prompts: bool
    log_level: str
    port: int
    host: str
    worker_threads: int
    graceful_timeout_s: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if environ is None else environ
        model = env_str(env, "FMA_MODEL", DEFAULT_MODEL)
        default_source = f"embedded:{model}" if model in EMBEDDED_MODELS else ""
        source = env_str(env, "FMA_MODEL_SOURCE", default_source)
        if not source:
            raise SettingsError(f"FMA_MODEL_SOURCE: required for model {model!r}, which is not embedded "
                                f"(embedded: {', '.join(sorted(EMBEDDED_MODELS))})")
        try:
            parse_source(source)
        except ModelSourceError as exc:
            raise SettingsError(f"FMA_MODEL_SOURCE: {exc}") from None
        dtype = env_choice(env, "FMA_DTYPE", "auto", ("auto", "float32", "bfloat16", "float16"))
        device = env_str(env, "FMA_DEVICE", "auto").strip().lower()
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise SettingsError(f"FMA_DEVICE: {device!r} is not auto, cpu, cuda or cuda:N")
        max_concurrency = env_int(env, "FMA_MAX_CONCURRENCY", 1, minimum=1, maximum=64)
        max_queue = env_int(env, "FMA_MAX_QUEUE", 32, minimum=0, maximum=10_000)
        cores = os.cpu_count() or 1
        context = env_int(env, "FMA_CONTEXT_LENGTH", 0, minimum=0)
        return cls(
            model=model,
            source=source,
            dtype=dtype,
            device=device,
            cache_dir=default_cache_dir(dict(env)),
            max_tokens=env_int(env, "FMA_MAX_TOKENS", 2048, minimum=1),
            max_n=env_int(env, "FMA_MAX_N", 8, minimum=1, maximum=128),
            default_temperature=_optional_float(env, "FMA_DEFAULT_TEMPERATURE", 0.0, 2.0),
            default_top_p=_optional_float(env, "FMA_DEFAULT_TOP_P", 0.01, 1.0),
            max_prompts=env_int(env, "FMA_MAX_PROMPTS", 16, minimum=1, maximum=1024),
            context_length=context or None,
            max_body_bytes=env_int(env, "FMA_MAX_BODY_BYTES", 1 << 20, minimum=1024),
            max_concurrency=max_concurrency,
            max_queue=max_queue,
            queue_timeout_s=env_duration(env, "FMA_QUEUE_TIMEOUT", 60.0),
            torch_threads=env_int(env, "FMA_TORCH_THREADS", max(1, cores // max_concurrency), minimum=1),
            sleep_drain_timeout_s=env_duration(env, "FMA_SLEEP_DRAIN_TIMEOUT", 30.0),
            log_prompts=env_bool(env, "FMA_LOG_PROMPTS", False),
            log_level=env_choice(env, "FMA_LOG_LEVEL", "info", ("debug", "info", "warning", "error", "critical")),
            port=env_int(env, "PORT", 8000, minimum=1, maximum=65535),
            host=env_str(env, "FMA_HOST", "0.0.0.0"),
            worker_threads=env_int(env, "FMA_WORKER_THREADS", max_concurrency + max_queue + 8, minimum=2),
            graceful_timeout_s=env_duration(env, "FMA_GRACEFUL_TIMEOUT", 60.0),
        )
