"""LocalActuator: workers as child processes of the requester.

Concurrency model
-----------------
All per-model state lives in ``_Slot`` records owned by this object and
guarded by **one** condition variable, ``_cond``. Every decision (start?
evict? reap?) is taken while holding it, on current state, and every change
is followed by ``notify_all`` so waiters re-check. Slow work - spawning a
process and waiting for its ``/ready``, HTTP calls to a worker - runs on
background threads *outside* the lock; they re-take it only to publish the
outcome. Under gunicorn's gevent worker those threads are greenlets.

* Single flight: the first request for a cold model moves its slot to
  ``starting`` and starts one starter thread; later requests only wait on the
  condition. Waiters are bounded per model (``max_queue`` -> 429) and by a
  deadline (``queue_timeout`` -> 503 naming the last state seen). A client
  that goes away stops waiting, but the start goes on for the others.
* A failed start wakes its waiters at once with the reason (the tail of the
  worker's log); the next request after it retries only after an exponential
  backoff, so a broken model is not restarted in a loop.
* A watcher thread per child blocks in ``wait()`` and reports the exit the
  moment it happens, so a crash is noticed immediately, not at the next
  request.
* Every child holds the read end of a "lifeline" pipe whose write end only
  this process holds. If the requester dies in any way - even SIGKILL - the
  kernel closes it, the child's gunicorn sees EOF and shuts itself down, so
  no worker outlives its requester.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fma_common.procs import (
    WORKER_APP,
    WORKER_CONFIG,
    free_port,
    log_tail,
    start_gunicorn,
    stop_process_group,
    wait_ready,
)

from . import policy
from .actuator import Actuation, WorkerStatus
from .launcher_client import LauncherClient, LauncherError
from .metrics import RequesterMetrics
from .registry import ModelRegistry, ModelSpec
from .settings import RequesterSettings
from .slots import EventSink, Slot, SlotActuator

log = logging.getLogger("fma.requester.local")

@dataclass
class _Slot(Slot):
    proc: subprocess.Popen | None = None
    log_path: str | None = None
    actuating: str | None = None  # "cold" or "wake" while starting
    actuation_started: float = 0.0
    stopping: bool = False  # an exit we asked for is not a crash


class LocalActuator(SlotActuator):
    backend = "local"

    def __init__(self, settings: RequesterSettings, registry: ModelRegistry, metrics: RequesterMetrics,
                 *, emit: EventSink | None = None, worker_env: dict[str, str] | None = None) -> None:
        super().__init__(registry, metrics, {spec.name: _Slot(spec) for spec in registry}, emit=emit,
                         connect_timeout_s=settings.upstream_connect_timeout_s)
        self.settings = settings
        self.worker_env = worker_env or {}
        self._lifeline_r, self._lifeline_w = os.pipe()
        os.set_inheritable(self._lifeline_w, False)
        self._reaper: threading.Thread | None = None
        self._launcher: LauncherClient | None = None
        self._launcher_lock = threading.Lock()

    # ---- status ---------------------------------------------------------------

    def _views(self) -> list[policy.WorkerView]:
        return [policy.WorkerView(s.spec.name, s.state, s.in_flight, s.waiters, s.last_used_mono,
                                  s.spec.idle_timeout or 0.0, s.spec.memory_mib or 0) for s in self._slots.values()]

    # ---- ensure_ready ---------------------------------------------------------

    def _begin_actuation(self, slot: Slot) -> bool:
        assert isinstance(slot, _Slot)
        if not self._make_room(slot):
            return False  # budget full of busy workers: wait for one to go idle, then retry
        if slot.state == "sleeping":
            self._begin_wake(slot)
        else:
            self._begin_start(slot)
        return True

    # ---- making room (budget) -------------------------------------------------

    def _make_room(self, slot: _Slot) -> bool:
        """Under the lock: True if ``slot`` may start now, evicting idle workers
        (least recently used first) until the budget allows it."""
        budget = self.registry.budget
        while True:
            decision = policy.pick_eviction(self._views(), budget.max_loaded, slot.spec.name,
                                            memory_budget_mib=budget.memory_mib,
                                            need_mib=slot.spec.memory_mib or 0)
            if decision is True:
                return True
            if decision is None:
                return False
            victim = self._slots[decision]
            level = self.settings.evict_sleep_level
            log.info("evicting %s (least recently used, idle) to make room for %s", victim.spec.name,
                     slot.spec.name)
            self.metrics.evictions.labels(victim.spec.name).inc()
            sleepers_after = sum(1 for s in self._slots.values() if s.state == "sleeping" and s is not slot) + 1
            if level and sleepers_after <= budget.sleepers:
                self._begin_sleep(victim, level)  # no longer awake: counts neither as loaded nor as memory
            else:
                self._begin_stop(victim, "evicted")

    # ---- starting ---------------------------------------------------------------

    def _begin_start(self, slot: _Slot) -> None:
        slot.attempt += 1
        slot.actuating = "cold"
        slot.actuation_started = time.monotonic()
        slot.error = None
        port = free_port(self.settings.worker_host)
        slot.url = f"http://{self.settings.worker_host}:{port}"
        self._set_state(slot, "starting")
        threading.Thread(target=self._start_worker, args=(slot, slot.attempt, port),
                         name=f"start-{slot.spec.name}", daemon=True).start()

    def worker_environment(self, spec: ModelSpec, port: int) -> dict[str, str]:
        env = {**os.environ, **self.worker_env, **spec.env}
        for key in ("FMA_BIND", "FMA_MODELS", "FMA_ACTUATOR"):
            env.pop(key, None)  # requester settings must not leak into the worker
        env.update({
            "FMA_MODEL": spec.name, "FMA_MODEL_SOURCE": spec.source, "FMA_DTYPE": spec.dtype,
            "FMA_DEVICE": spec.device, "PORT": str(port), "FMA_HOST": self.settings.worker_host,
            "FMA_CACHE_DIR": str(self.settings.cache_dir), "FMA_LIFELINE_FD": str(self._lifeline_r),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        })
        return env

    def _start_worker(self, slot: _Slot, attempt: int, port: int) -> None:
        spec = slot.spec
        log_dir = self.settings.worker_log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{spec.name.replace('/', '_')}.log"
        t0 = time.monotonic()
        try:
            proc = self._spawn(self.worker_environment(spec, port), log_path)
        except OSError as exc:
            self._start_failed(slot, attempt, None, f"could not spawn the worker: {exc}")
            return
        with self._cond:
            if slot.attempt != attempt or self._closing:
                stop_process_group(proc, 5)
                return
            slot.proc = proc
            slot.log_path = str(log_path)
            slot.stopping = False
        threading.Thread(target=self._watch, args=(slot, proc), name=f"watch-{spec.name}", daemon=True).start()
        log.info("starting worker for %s on %s (pid %d, log %s)", spec.name, slot.url, proc.pid, log_path)
        try:
            wait_ready(slot.url or "", proc, spec.start_timeout or 600.0, log_path)
        except (RuntimeError, TimeoutError) as exc:
            reason = str(exc).split("\n", 1)[0]
            self._start_failed(slot, attempt, proc, f"{reason}; log tail: {log_tail(log_path, 1500).strip()}")
            return
        # From the request that asked for it, so waiting for the launcher counts too.
        secs = time.monotonic() - min(t0, slot.actuation_started or t0)
        with self._cond:
            if slot.attempt != attempt or slot.proc is not proc:
                return
            slot.failures = 0
            slot.actuating = None
            slot.last_actuation = Actuation("cold", secs)
            self._touch(slot)
            self._set_state(slot, "ready")
            status = self._status(slot)
        self.metrics.actuation.labels(spec.name, "cold").observe(secs)
        log.info("worker for %s ready in %.2f s (cold start)", spec.name, secs)
        self.emit("ai.llm-d.fma.worker.started", status.as_dict())

    def _spawn(self, env: dict[str, str], log_path: Any) -> Any:
        """Fork from the pre-warmed launcher when it is up; else a plain process."""
        launcher = self._ensure_launcher() if self.settings.launcher else None
        if launcher is not None:
            try:
                return launcher.spawn(env, log_path)
            except LauncherError as exc:
                log.warning("launcher could not spawn (%s); starting the worker directly", exc)
        return start_gunicorn(WORKER_CONFIG, WORKER_APP, env, log_path, pass_fds=(self._lifeline_r,))

    def _ensure_launcher(self) -> LauncherClient | None:
        with self._launcher_lock:
            if self._closing:
                return None
            if self._launcher is None or not self._launcher.alive:
                env = {**os.environ, **self.worker_env, "FMA_LIFELINE_FD": str(self._lifeline_r),
                       "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
                try:
                    self._launcher = LauncherClient(env, self.settings.worker_log_dir / "launcher.log",
                                                    pass_fds=(self._lifeline_r,))
                except OSError as exc:
                    log.warning("could not start the launcher: %s", exc)
                    self._launcher = None
            return self._launcher

    def _start_failed(self, slot: _Slot, attempt: int, proc: subprocess.Popen | None, reason: str) -> None:
        with self._cond:
            if slot.attempt != attempt:
                return
            slot.stopping = True
            slot.failures += 1
            slot.retry_at = time.monotonic() + policy.backoff_delay(
                slot.failures, self.settings.restart_backoff_s, self.settings.restart_backoff_max_s)
            slot.error = reason[:4000]
            slot.actuating = None
            self._set_state(slot, "failed")
            status = self._status(slot)
        if proc is not None:
            stop_process_group(proc, 5)
        log.warning("worker for %s failed to start (failure %d): %s", slot.spec.name, slot.failures, reason[:300])
        self.emit("ai.llm-d.fma.worker.failed", status.as_dict())

    def _watch(self, slot: _Slot, proc: subprocess.Popen) -> None:
        code = proc.wait()
        with self._cond:
            if slot.proc is not proc:
                return
            slot.proc = None
            expected = slot.stopping or self._closing
            if expected:
                if slot.state != "failed":
                    self._set_state(slot, "cold")
                return
            # A crash: waiters on a start attempt fail fast; the next request restarts.
            slot.failures += 1
            slot.retry_at = time.monotonic()  # a crash of a running worker restarts on demand at once
            tail = log_tail(Path(slot.log_path), 1500).strip() if slot.log_path else ""
            slot.error = f"worker exited with code {code}; log tail: {tail}"
            self._set_state(slot, "failed")
            status = self._status(slot)
        log.warning("worker for %s exited unexpectedly with code %s", slot.spec.name, code)
        self.metrics.crashes.labels(slot.spec.name).inc()
        self.emit("ai.llm-d.fma.worker.failed", status.as_dict())

    # ---- sleep / wake / stop ------------------------------------------------------

    def _begin_wake(self, slot: _Slot) -> None:
        slot.attempt += 1
        slot.actuating = "wake"
        self._set_state(slot, "starting")
        threading.Thread(target=self._wake_worker, args=(slot, slot.attempt), daemon=True).start()

    def _wake_worker(self, slot: _Slot, attempt: int) -> None:
        t0 = time.monotonic()
        try:
            resp = self._http.post(f"{slot.url}/wake_up")
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            self._start_failed(slot, attempt, slot.proc, f"wake failed: {exc}")
            return
        secs = time.monotonic() - t0
        with self._cond:
            if slot.attempt != attempt:
                return
            slot.actuating = None
            slot.last_actuation = Actuation("wake", secs)
            self._set_state(slot, "ready")
            status = self._status(slot)
        self.metrics.actuation.labels(slot.spec.name, "wake").observe(secs)
        log.info("worker for %s awake in %.3f s", slot.spec.name, secs)
        self.emit("ai.llm-d.fma.worker.ready", status.as_dict())

    def _begin_sleep(self, slot: _Slot, level: int) -> None:
        """Under the lock: mark sleeping now, tell the worker on a thread."""
        self._set_state(slot, "sleeping")
        threading.Thread(target=self._sleep_worker, args=(slot, level, slot.attempt), daemon=True).start()

    def _sleep_worker(self, slot: _Slot, level: int, attempt: int) -> None:
        try:
            self._http.post(f"{slot.url}/sleep", params={"level": level}).raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("could not put %s to sleep (%s); stopping it instead", slot.spec.name, exc)
            with self._cond:
                if slot.attempt == attempt:
                    self._begin_stop(slot, "sleep failed")
            return
        with self._cond:
            status = self._status(slot)
            self._trim_sleepers()
        self.emit("ai.llm-d.fma.worker.sleeping", status.as_dict())

    def _after_sleep(self) -> None:
        self._trim_sleepers()

    def _trim_sleepers(self) -> None:
        for name in policy.excess_sleepers(self._views(), self.registry.budget.sleepers):
            self._begin_stop(self._slots[name], "over the sleeper budget")

    def _begin_stop(self, slot: _Slot, why: str) -> None:
        """Under the lock: the slot is cold from now on; the process stops on a thread."""
        proc = slot.proc
        slot.stopping = True
        slot.attempt += 1  # any start or wake in progress is now stale
        slot.actuating = None
        if slot.state != "cold":
            self._set_state(slot, "cold")
        if proc is not None:
            log.info("stopping worker for %s (%s)", slot.spec.name, why)
            threading.Thread(target=stop_process_group, args=(proc, self.settings.drain_timeout_s),
                             daemon=True).start()

    def release(self, model: str) -> WorkerStatus:
        with self._cond:
            slot = self._slot(model)
            proc = slot.proc
            self._begin_stop(slot, "released")
            slot.error = None
            slot.proc = None
            status = self._status(slot)
        if proc is not None:
            stop_process_group(proc, self.settings.drain_timeout_s)
        self.emit("ai.llm-d.fma.worker.released", status.as_dict())
        return status

    def warm(self, model: str) -> WorkerStatus:
        self.ensure_ready(model).done()
        return self.describe(model)

    # ---- background ---------------------------------------------------------------

    def start(self) -> None:
        if self.settings.launcher:
            # Pre-warm now, so the first cold start already skips the imports.
            threading.Thread(target=self._ensure_launcher, name="fma-launcher-start", daemon=True).start()
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap_loop, name="fma-reaper", daemon=True)
            self._reaper.start()
        for spec in self.registry:
            if spec.preload:
                threading.Thread(target=self._preload, args=(spec.name,), daemon=True).start()

    def _preload(self, model: str) -> None:
        try:
            self.warm(model)
        except Exception as exc:  # reported in the slot's status and log
            log.warning("preload of %s failed: %s", model, exc)

    def _reap_loop(self) -> None:
        while True:
            with self._cond:
                if self._closing:
                    return
                for name in policy.idle_expired(self._views(), time.monotonic()):
                    log.info("scaling %s to zero after %.0f s idle", name, self._slots[name].spec.idle_timeout)
                    self.metrics.idle_stops.labels(name).inc()
                    self._begin_stop(self._slots[name], "idle")
                self._cond.wait(self.settings.reaper_interval_s)

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closing = True
            procs = [s.proc for s in self._slots.values() if s.proc is not None]
            for s in self._slots.values():
                s.stopping = True
            self._cond.notify_all()
        threads = [threading.Thread(target=stop_process_group, args=(p, timeout)) for p in procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 10)
        with self._launcher_lock:
            launcher, self._launcher = self._launcher, None
        if launcher is not None:
            launcher.close()
        self._http.close()
        log.info("stopped %d worker(s)", len(procs))

