"""Requester settings: each one defined once, here, with its variable, default and meaning.

Read once from the environment at start-up; the README's table is generated
from this class (``fma settings requester --markdown``) and a test keeps the
two equal. The Knative actuator's own settings are in ``knative.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import ValidationInfo, field_validator, model_validator

from fma_common.settings import Duration, EnvSettings, Flag, Lower, context_env, setting
from fma_common.sources import default_cache_dir

LogLevel = Annotated[Literal["debug", "info", "warning", "error", "critical"], Lower]


def parse_binds(text: str) -> tuple[str, ...]:
    binds = tuple(b.strip() for b in text.split(",") if b.strip())
    if not binds:
        raise ValueError("no address given")
    for b in binds:
        host, sep, port = b.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{b!r} is not HOST:PORT")
    return binds


class RequesterSettings(EnvSettings):
    binds: tuple[str, ...] | None = setting(
        "FMA_BIND", None, "addresses to serve on, comma-separated; every route is served on each",
        shown="127.0.0.1:8080,127.0.0.1:8081 (0.0.0.0:$PORT and 127.0.0.1:$FMA_SPI_PORT when PORT is set)")
    port: int | None = setting("PORT", None, "the port Knative assigns; without `FMA_BIND` the requester serves "
                               "`0.0.0.0:$PORT`", shown="unset", ge=1, le=65535)
    spi_port: int = setting(
        "FMA_SPI_PORT", "8081", "with `PORT` set and no `FMA_BIND` (Knative), the requester also serves every "
        "route on 127.0.0.1 at this port inside its pod, so the FMA example's `kubectl port-forward $REQUESTER_POD "
        "8081:8081` works as written (port-forward reaches the pod's loopback; Knative routes only `$PORT`, and the "
        "pod network cannot reach a loopback listener); `0` turns it off", ge=0, le=65535)
    actuator: Annotated[Literal["local", "knative"], Lower] = setting(
        "FMA_ACTUATOR", "local", "`local` (child processes) or `knative` (one Knative Service per model)")
    models_file: str | None = setting("FMA_MODELS", None, "YAML file listing the served models (see Models file)",
                                      shown="built-in default")
    models_reload_s: Duration = setting("FMA_MODELS_RELOAD", "5s", "how often the models file (and the worker "
                                        "template) are checked for changes, which are applied without a restart; "
                                        "`0` turns it off")
    cache_dir: Path | None = setting("FMA_CACHE_DIR", None, "where converted models are kept (passed to local "
                                     "workers)", shown="`$XDG_CACHE_HOME/fma` or `~/.cache/fma`")
    hub_cache_dir: Path | None = setting("FMA_HUB_CACHE_DIR", None, "the model cache hub models (`hf:`) are "
                                         "fetched into before their first worker starts; on Knative a "
                                         "PersistentVolumeClaim the workers mount read-only",
                                         shown="`FMA_CACHE_DIR`")
    worker_host: str = setting("FMA_WORKER_HOST", "127.0.0.1", "address local workers bind")
    launcher: Flag = setting("FMA_LAUNCHER", "true", "fork local workers from a pre-warmed launcher (torch "
                             "already imported); a worker whose environment the launcher cannot honour starts "
                             "as a plain process")
    launcher_prepare: int = setting("FMA_LAUNCHER_PREPARE", "8", "models whose config, tokenizer and empty model "
                                    "the launcher builds before their first start (preloaded ones first; 15-50 MB "
                                    "each); `0` builds them in each worker", ge=0, le=1000)
    worker_log_dir: Path | None = setting("FMA_WORKER_LOG_DIR", None, "where local workers write their logs",
                                          shown="`$FMA_CACHE_DIR/logs`")
    worker_log_max_bytes: int = setting("FMA_WORKER_LOG_MAX_BYTES", "10485760", "a worker log larger than this "
                                        "is rotated (copied to `.1`, then truncated)", ge=4096)
    worker_log_backups: int = setting("FMA_WORKER_LOG_BACKUPS", "3", "rotated worker logs kept per model", ge=0,
                                      le=100)
    restart_backoff_s: Duration = setting("FMA_RESTART_BACKOFF", "2s", "delay before retrying a worker that "
                                          "failed to start (doubles with each failure in a row)")
    restart_backoff_max_s: Duration = setting("FMA_RESTART_BACKOFF_MAX", "60s", "longest delay between start "
                                              "retries")
    evict_sleep_level: int = setting("FMA_EVICT_SLEEP_LEVEL", "2", "sleep level used when a worker is evicted to "
                                     "make room (0 = stop it)", ge=0, le=2)
    upstream_connect_timeout_s: Duration = setting("FMA_UPSTREAM_CONNECT_TIMEOUT", "5s", "connect timeout to a "
                                                   "worker")
    upstream_read_timeout_s: Duration = setting("FMA_UPSTREAM_READ_TIMEOUT", "600s", "longest silence from a "
                                                "worker while waiting for a response")
    control_timeout_s: Duration = setting("FMA_CONTROL_TIMEOUT", "120s", "longest wait for one sleep call to a "
                                          "worker")
    stream_keepalive_s: Duration = setting("FMA_STREAM_KEEPALIVE", "5s", "a streamed request whose worker is not "
                                           "ready after this long gets `200` and an SSE comment (`: keepalive`) "
                                           "this often until its first token, so clients and proxies do not give "
                                           "up on a long cold start; `0` turns it off")
    drain_timeout_s: Duration = setting("FMA_DRAIN_TIMEOUT", "30s", "how long in-flight requests may finish: on "
                                        "SIGTERM, before a worker sleeps, and when a worker is stopped")
    max_body_bytes: int = setting("FMA_MAX_BODY_BYTES", "1048576", "largest request body; larger gets 413",
                                  ge=1024)
    reaper_interval_s: Duration = setting("FMA_REAPER_INTERVAL", "1s", "how often idle workers and deadlines "
                                          "are checked")
    log_level: LogLevel = setting("FMA_LOG_LEVEL", "info", "log level")
    connections: int = setting("FMA_CONNECTIONS", "1000", "simultaneous client connections (gevent "
                               "worker_connections); the pool to workers is as large", ge=16)
    api_keys: str | None = setting("FMA_API_KEYS", None, "API keys for inference (completions, models, workers' "
                                   "status, CloudEvents), comma-separated; sent as `Authorization: Bearer KEY`. "
                                   "With no keys at all, auth is off", shown="unset")
    api_keys_file: Path | None = setting("FMA_API_KEYS_FILE", None, "a file of inference keys, one per line "
                                         "(`#` comments), e.g. a mounted Secret", shown="unset")
    admin_keys: str | None = setting("FMA_ADMIN_KEYS", None, "admin keys, comma-separated: everything that changes "
                                     "state (sleep, wake, warm, release, readiness, worker-control events) and "
                                     "inference", shown="unset")
    admin_keys_file: Path | None = setting("FMA_ADMIN_KEYS_FILE", None, "a file of admin keys, one per line",
                                           shown="unset")
    worker_token: str | None = setting("FMA_WORKER_TOKEN", None, "the token the requester sends its workers "
                                       "(they answer only it); local workers get a random one per requester "
                                       "start, Knative workers the one you set here and in their Secret",
                                       shown="random (local)")
    events_oidc_audience: str | None = setting(
        "FMA_EVENTS_OIDC_AUDIENCE", None, "accept CloudEvents carrying a Knative Eventing OIDC token for this "
        "audience (the Triggers' `subscriber.audience`) from the senders in `FMA_EVENTS_OIDC_SUBJECTS`, checked "
        "with a TokenReview; with keys on, Broker deliveries need it", shown="unset")
    events_oidc_subjects: str | None = setting(
        "FMA_EVENTS_OIDC_SUBJECTS", None, "who may send events with such a token: usernames or globs, "
        "comma-separated (`system:serviceaccount:NS:*-oidc-eventing.knative.dev-trigger`)", shown="unset")
    tls_certfile: Path | None = setting("FMA_TLS_CERTFILE", None, "serve HTTPS on every bind with this PEM "
                                        "certificate (chain); needs `FMA_TLS_KEYFILE`", shown="unset (HTTP)")
    tls_keyfile: Path | None = setting("FMA_TLS_KEYFILE", None, "the certificate's PEM private key",
                                       shown="unset")
    sink: str | None = setting("K_SINK", None, "where lifecycle CloudEvents are sent (Knative SinkBinding sets it)",
                               shown="unset")
    ce_overrides: str | None = setting("K_CE_OVERRIDES", None, "`{\"extensions\": {...}}` added to every lifecycle "
                                       "event (SinkBinding sets it from its `ceOverrides`)", shown="unset")
    events_queue: int = setting("FMA_EVENTS_QUEUE", "256", "lifecycle events waiting to be sent; when the sink "
                                "falls this far behind, new events are dropped and counted", ge=1, le=100_000)
    events_timeout_s: Duration = setting("FMA_EVENTS_TIMEOUT", "2s", "longest wait for the sink to answer one "
                                         "lifecycle event")
    events_deadline_s: Duration = setting(
        "FMA_EVENTS_DEADLINE", "540s", "longest a `completion.requested` event may take, its worker's start "
        "included; past it the reply is `completion.failed` (`deadline_exceeded`), not a retry. Each layer answers "
        "before the one that retries it: this, below the requester's `timeoutSeconds` (600), below the Triggers' "
        "`delivery.timeout` (PT11M)")
    events_retries: int = setting("FMA_EVENTS_RETRIES", "2", "retries of a lifecycle event the sink did not "
                                  "take (5xx, 404, 408, 409, 429, no answer), before it is dropped", ge=0, le=10)

    @field_validator("binds", mode="before")
    @classmethod
    def _binds(cls, value: object) -> object:
        return parse_binds(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _derive(self, info: ValidationInfo) -> RequesterSettings:
        env = context_env(info)
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("FMA_TLS_CERTFILE and FMA_TLS_KEYFILE: set both (HTTPS) or neither (HTTP)")
        for name, path in (("FMA_TLS_CERTFILE", self.tls_certfile), ("FMA_TLS_KEYFILE", self.tls_keyfile)):
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        cache = self.cache_dir.expanduser() if self.cache_dir else default_cache_dir(env)
        if self.binds:
            binds = self.binds
        elif self.port:
            spi = (f"127.0.0.1:{self.spi_port}",) if self.spi_port and self.spi_port != self.port else ()
            binds = (f"0.0.0.0:{self.port}", *spi)
        else:
            binds = ("127.0.0.1:8080", "127.0.0.1:8081")
        return self.model_copy(update={
            "binds": binds, "cache_dir": cache,
            "hub_cache_dir": self.hub_cache_dir.expanduser() if self.hub_cache_dir else cache,
            "worker_log_dir": self.worker_log_dir.expanduser() if self.worker_log_dir else cache / "logs"})
