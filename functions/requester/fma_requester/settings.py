"""Requester settings, read once from the environment and validated at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fma_common.settings import SettingsError, env_bool, env_choice, env_duration, env_int, env_str
from fma_worker.model_store import default_cache_dir

# name -> (default shown in the README, meaning)
REQUESTER_ENV: dict[str, tuple[str, str]] = {
    "FMA_BIND": ("127.0.0.1:8080,127.0.0.1:8081 (0.0.0.0:$PORT when PORT is set)",
                 "addresses to serve on, comma-separated; every route is served on each"),
    "FMA_ACTUATOR": ("local", "`local` (child processes) or `knative` (one Knative Service per model)"),
    "FMA_MODELS": ("built-in default", "YAML file listing the served models (see Models file)"),
    "FMA_WORKER_HOST": ("127.0.0.1", "address local workers bind"),
    "FMA_LAUNCHER": ("true", "fork local workers from a pre-warmed launcher (torch already imported)"),
    "FMA_WORKER_LOG_DIR": ("$FMA_CACHE_DIR/logs", "where local workers write their logs"),
    "FMA_RESTART_BACKOFF": ("2s", "first delay before retrying a worker that failed to start (doubles)"),
    "FMA_RESTART_BACKOFF_MAX": ("60s", "longest delay between start retries"),
    "FMA_EVICT_SLEEP_LEVEL": ("2", "sleep level used when a worker is evicted to make room (0 = stop it)"),
    "FMA_UPSTREAM_CONNECT_TIMEOUT": ("5s", "connect timeout to a worker"),
    "FMA_UPSTREAM_READ_TIMEOUT": ("600s", "longest silence from a worker while waiting for a response"),
    "FMA_DRAIN_TIMEOUT": ("30s", "on SIGTERM, how long in-flight requests may finish before workers stop"),
    "FMA_MAX_BODY_BYTES": ("1048576", "largest request body; larger gets 413"),
    "FMA_REAPER_INTERVAL": ("1s", "how often idle workers are checked"),
    "FMA_LOG_PROMPTS": ("false", "log prompt text (off by default)"),
    "FMA_LOG_LEVEL": ("info", "log level"),
    "FMA_CONNECTIONS": ("1000", "simultaneous client connections (gevent worker_connections)"),
    "K_SINK": ("unset", "where lifecycle CloudEvents are sent (Knative SinkBinding sets it)"),
}


def _default_binds(env: Mapping[str, str]) -> str:
    if env.get("PORT"):
        return f"0.0.0.0:{env['PORT']}"
    return "127.0.0.1:8080,127.0.0.1:8081"


def parse_binds(text: str) -> tuple[str, ...]:
    binds = tuple(b.strip() for b in text.split(",") if b.strip())
    if not binds:
        raise SettingsError("FMA_BIND: no address given")
    for b in binds:
        host, sep, port = b.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(f"FMA_BIND: {b!r} is not HOST:PORT")
    return binds


@dataclass(frozen=True)
class RequesterSettings:
    binds: tuple[str, ...]
    actuator: str
    models_file: str | None
    cache_dir: Path
    worker_host: str
    launcher: bool
    worker_log_dir: Path
    restart_backoff_s: float
    restart_backoff_max_s: float
    evict_sleep_level: int
    upstream_connect_timeout_s: float
    upstream_read_timeout_s: float
    drain_timeout_s: float
    max_body_bytes: int
    reaper_interval_s: float
    log_prompts: bool
    log_level: str
    connections: int
    sink: str | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RequesterSettings:
        env = os.environ if environ is None else environ
        cache_dir = default_cache_dir(dict(env))
        log_dir = env_str(env, "FMA_WORKER_LOG_DIR", str(cache_dir / "logs"))
        return cls(
            binds=parse_binds(env_str(env, "FMA_BIND", _default_binds(env))),
            actuator=env_choice(env, "FMA_ACTUATOR", "local", ("local", "knative")),
            models_file=env.get("FMA_MODELS") or None,
            cache_dir=cache_dir,
            worker_host=env_str(env, "FMA_WORKER_HOST", "127.0.0.1"),
            launcher=env_bool(env, "FMA_LAUNCHER", True),
            worker_log_dir=Path(log_dir).expanduser(),
            restart_backoff_s=env_duration(env, "FMA_RESTART_BACKOFF", 2.0),
            restart_backoff_max_s=env_duration(env, "FMA_RESTART_BACKOFF_MAX", 60.0),
            evict_sleep_level=env_int(env, "FMA_EVICT_SLEEP_LEVEL", 2, minimum=0, maximum=2),
            upstream_connect_timeout_s=env_duration(env, "FMA_UPSTREAM_CONNECT_TIMEOUT", 5.0),
            upstream_read_timeout_s=env_duration(env, "FMA_UPSTREAM_READ_TIMEOUT", 600.0),
            drain_timeout_s=env_duration(env, "FMA_DRAIN_TIMEOUT", 30.0),
            max_body_bytes=env_int(env, "FMA_MAX_BODY_BYTES", 1 << 20, minimum=1024),
            reaper_interval_s=env_duration(env, "FMA_REAPER_INTERVAL", 1.0),
            log_prompts=env_bool(env, "FMA_LOG_PROMPTS", False),
            log_level=env_choice(env, "FMA_LOG_LEVEL", "info", ("debug", "info", "warning", "error", "critical")),
            connections=env_int(env, "FMA_CONNECTIONS", 1000, minimum=16),
            sink=env.get("K_SINK") or None,
        )
