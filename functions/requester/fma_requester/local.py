"""Local effects: workers as child processes of the requester.

:class:`LocalEffects` is the state machine's :class:`~fma_requester.effects.Effects`
on this machine: a start is a process (forked from the pre-warmed launcher
when possible, see ``supervision.py``) that is ready when its ``/ready``
answers 200; a stop is SIGTERM (gunicorn drains), then SIGKILL of the group
at the grace deadline; sleep and wake are the worker's vLLM sleep API; the
log is the worker's own log file. :class:`LocalActuator` is the state
machine with these effects plugged in.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from fma_common import logs
from fma_common.procs import Ready, free_port, stop_process_group, wait_ready

from . import model_cache
from .control import WorkerControl
from .effects import Effects, WorkerHandle
from .lifecycle import EventSink, Lifecycle, LifecycleConfig
from .metrics import RequesterMetrics
from .registry import ModelRegistry, ModelSpec
from .settings import RequesterSettings
from .supervision import ProcessSupervisor

log = logging.getLogger("fma.requester.local")

# Requester settings that must not leak into a worker's environment.
_REQUESTER_ONLY = ("FMA_BIND", "FMA_MODELS", "FMA_ACTUATOR")


def start_steps(ready: Ready, asked_at: float) -> dict[str, float]:
    """A cold start's timeline: the worker's own steps (spawn, boot, load phases), then how long after it was
    ready the requester learned it (``ready_seen``); ``total`` from the ask to that moment."""
    steps = {k: float(v) for k, v in (ready.start.get("steps") or {}).items() if isinstance(v, (int, float))}
    ready_at = ready.start.get("ready_at")
    if isinstance(ready_at, (int, float)):
        steps["ready_seen"] = max(0.0, ready.seen_at - ready_at)
    steps["total"] = ready.seen_at - asked_at
    return {k: round(v, 4) for k, v in steps.items()}


class LocalEffects(Effects):
    backend = "local"
    stop_on_shutdown = True

    def __init__(self, settings: RequesterSettings, *, worker_env: dict[str, str] | None = None,
                 supervisor: ProcessSupervisor | None = None) -> None:
        self.settings = settings
        base = {**os.environ, **(worker_env or {})}
        self.supervisor = supervisor or ProcessSupervisor(settings, base)
        self._control = WorkerControl(settings.control_timeout_s, settings.upstream_connect_timeout_s,
                                      token=settings.worker_token)

    def worker_environment(self, spec: ModelSpec, port: int) -> dict[str, str]:
        """The worker's environment: the requester's, then the model's own ``env`` (which wins)."""
        env = {**self.supervisor.base_env}
        for key in _REQUESTER_ONLY:
            env.pop(key, None)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.update(spec.admission_env())
        env.update(spec.env)
        env.update({
            "FMA_MODEL": spec.name, "FMA_MODEL_SOURCE": spec.source, "FMA_DTYPE": spec.dtype,
            "FMA_MODEL_KIND": spec.model_kind,
            "FMA_DEVICE": spec.device, "PORT": str(port), "FMA_HOST": self.settings.worker_host,
            "FMA_CACHE_DIR": str(self.settings.cache_dir), "FMA_LIFELINE_FD": str(self.supervisor.lifeline_fd),
            "FMA_HUB_CACHE_DIR": str(self.settings.hub_cache_dir or self.settings.cache_dir),
        })
        env.pop("HF_TOKEN", None)  # the requester fetches hub models; a worker loads them offline, tokenless
        for key in ("FMA_API_KEYS", "FMA_ADMIN_KEYS", "FMA_API_KEYS_FILE", "FMA_ADMIN_KEYS_FILE"):
            env.pop(key, None)  # clients' keys are the requester's business, not its workers'
        if self.settings.worker_token:
            env["FMA_WORKER_TOKEN"] = self.settings.worker_token
        return env

    # ---- Effects ------------------------------------------------------------------------

    def start(self, spec: ModelSpec, handle: WorkerHandle, timeout: float) -> str:
        try:
            log_path = self.supervisor.log_path(spec.name)
        except OSError as exc:
            raise RuntimeError(f"cannot create the worker log folder {self.settings.worker_log_dir}: "
                               f"{exc.strerror or exc}") from None
        asked_at = time.time()
        self._fetch_hub_model(spec, handle)
        port = free_port(self.settings.worker_host)  # after the fetch (minutes at worst): it is bound at once
        url = f"http://{self.settings.worker_host}:{port}"
        env = self.worker_environment(spec, port)
        env["FMA_SPAWNED_AT"] = repr(asked_at)  # the worker's start timeline counts from here
        with handle.lock:
            if handle.cancelled:
                raise RuntimeError("start cancelled")
            proc, how = self.supervisor.spawn(spec.name, env, log_path)
            handle.data.update(proc=proc, log_path=log_path)
        self.supervisor.watch(proc, lambda code: self._exited(spec, handle, code), spec.name)
        handle.progress = f"pid {proc.pid} loading"
        log.info("starting worker for %s on %s (pid %d, %s, log %s)", spec.name, url, proc.pid, how, log_path)
        ready = wait_ready(url, proc, timeout, log_path, cancel=handle.cancel_event)
        handle.steps = start_steps(ready, asked_at)
        return url

    def _fetch_hub_model(self, spec: ModelSpec, handle: WorkerHandle) -> None:
        assert self.settings.hub_cache_dir is not None

        def progress(message: str) -> None:
            handle.progress = message
            log.info("%s: %s", spec.name, message)

        if model_cache.fetch_before_start(spec, self.settings.hub_cache_dir, model_cache.hub_env(spec), progress):
            # Now a folder like any other: the launcher builds its config, tokenizer and empty model ahead, so
            # the next cold start (after a release, a crash) skips them as an embedded model's does.
            self.supervisor.prepare([(spec.name, self.worker_environment(spec, 8000))])  # a port: never bound

    def _exited(self, spec: ModelSpec, handle: WorkerHandle, code: int) -> None:
        tail = self.read_log(spec, handle, 1500).strip()
        self.listener.worker_exited(handle, f"exited with code {code}; log tail: {tail}")

    def stop(self, spec: ModelSpec, handle: WorkerHandle, grace: float) -> None:
        handle.cancel()
        with handle.lock:  # a spawn in progress finishes first, so its process is stopped too
            proc = handle.data.get("proc")
        if proc is not None:
            try:
                stop_process_group(proc, grace)
            except Exception as exc:  # never raise: report and move on
                log.error("stopping pid %s for %s failed: %s", getattr(proc, "pid", "?"), spec.name, exc)

    def sleep(self, spec: ModelSpec, handle: WorkerHandle, level: int, timeout: float) -> None:
        self._control.sleep(handle, level, timeout)

    def wake(self, spec: ModelSpec, handle: WorkerHandle, timeout: float) -> None:
        self._control.wake(handle, timeout)

    def probe(self, spec: ModelSpec, handle: WorkerHandle, timeout: float) -> bool:
        proc = handle.data.get("proc")
        if proc is not None and proc.poll() is not None:
            return False
        return self._control.alive(handle, timeout)

    def read_log(self, spec: ModelSpec, handle: WorkerHandle, limit: int) -> str:
        path = handle.data.get("log_path")
        return logs.tail(Path(path), limit) if path else ""

    def open(self, registry: ModelRegistry) -> None:
        self.supervisor.prewarm(self._to_prepare(registry))

    def reload(self, registry: ModelRegistry) -> None:
        self.supervisor.prepare(self._to_prepare(registry))  # a thread: this runs under the machine's lock

    def _to_prepare(self, registry: ModelRegistry) -> list[tuple[str, dict[str, str]]]:
        """The models whose config, tokenizer and empty model the launcher builds ahead: preloaded ones first,
        then the others in the file's order, at most ``FMA_LAUNCHER_PREPARE`` (each costs it 15-50 MB)."""
        specs = sorted(registry, key=lambda spec: not spec.preload)[: self.settings.launcher_prepare]
        return [(spec.name, self.worker_environment(spec, 8000)) for spec in specs]  # a port: never bound

    def housekeeping(self) -> None:
        self.supervisor.rotate_logs()

    def close(self) -> None:
        self.supervisor.close()
        self._control.close()


class LocalActuator(Lifecycle):
    """The state machine driving local worker processes."""

    def __init__(self, settings: RequesterSettings, registry: ModelRegistry, metrics: RequesterMetrics,
                 *, emit: EventSink | None = None, worker_env: dict[str, str] | None = None,
                 config: LifecycleConfig | None = None) -> None:
        self.settings = settings
        super().__init__(registry, metrics, LocalEffects(settings, worker_env=worker_env), emit=emit,
                         config=config or LifecycleConfig.from_settings(settings))
