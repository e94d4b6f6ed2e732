"""A small simulated Knative Serving controller for the fake API server.

It reacts to Service writes the way Knative's reconciler does at the API
level: it observes the new generation (``Ready=Unknown``), then either brings
the revision up and publishes ``Ready=True`` with ``status.url``,
``status.address.url`` and ``observedGeneration``, or fails it with Knative's
reasons. In ``process`` mode a revision is a real local worker process (the
container's env, a free port); in ``ready`` mode only the status is written.
Scale-from-zero of pods (the activator) is not simulated.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from kube_fake import FakeKube

from fma_common.procs import WORKER_APP, WORKER_CONFIG, free_port, start_gunicorn, stop_process_group, wait_ready


def _cond(kind: str, status: str, reason: str | None = None, message: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": kind, "status": status, "lastTransitionTime": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if reason:
        out["reason"] = reason
    if message:
        out["message"] = message
    return out


class SimulatedKnative:
    def __init__(self, kube: FakeKube, workdir: Path, cache_dir: Path | None = None, default: str = "ready") -> None:
        self.kube = kube
        self.workdir = workdir
        self.cache_dir = cache_dir
        self.default = default
        self.behaviour: dict[str, str] = {}  # Service name -> ready | process | fail | unschedulable | never | slow:S
        self.procs: dict[str, subprocess.Popen] = {}
        self.reconciled: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._closing = False
        self._workers: list[threading.Thread] = []
        self._events: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        kube.listeners.append(lambda kind, obj: self._events.put((kind, obj)))
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                return
            kind, obj = item
            name = obj["metadata"]["name"]
            if kind == "DELETED":
                proc = self.procs.pop(name, None)
                if proc:
                    threading.Thread(target=stop_process_group, args=(proc, 10), daemon=True).start()
                continue
            if (obj["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by") is None:
                continue  # not a worker (e.g. the requester's own Service): leave its status alone
            generation = obj["metadata"]["generation"]
            if (obj.get("status") or {}).get("observedGeneration", 0) >= generation:
                continue  # a status write, or a generation already handled
            worker = threading.Thread(target=self._reconcile, args=(obj,), daemon=True)
            self._workers.append(worker)
            worker.start()

    def _reconcile(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        name, ns, generation = meta["name"], meta["namespace"], meta["generation"]
        self.reconciled.append((name, generation))
        revision = f"{name}-{generation:05d}"
        mode = self.behaviour.get(name, self.default)
        self.kube.set_status(ns, name, {"observedGeneration": generation, "conditions": [
            _cond("Ready", "Unknown", "RevisionMissing", f'Configuration "{name}" is waiting for a Revision to '
                  "become ready."),
            _cond("ConfigurationsReady", "Unknown"), _cond("RoutesReady", "Unknown")]})
        if mode.startswith("slow:"):
            time.sleep(float(mode.split(":", 1)[1]))
            mode = "ready"
        if mode == "never":
            return
        if mode in ("fail", "unschedulable"):
            why = ("Container failed with: model failed to load (exit code 1)" if mode == "fail" else
                   "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")
            message = f'Revision "{revision}" failed with message: {why}'
            self.kube.set_status(ns, name, {"observedGeneration": generation, "conditions": [
                _cond("Ready", "False", "RevisionFailed", message),
                _cond("ConfigurationsReady", "False", "RevisionFailed", message),
                _cond("RoutesReady", "False", "RevisionMissing")]})
            return
        address = f"http://{name}.{ns}.svc.cluster.local"
        if mode == "process":
            started = self._run_revision(name, obj)
            if started is None:
                return  # the controller is stopping
            address = started
        self.kube.set_status(ns, name, {
            "observedGeneration": generation, "url": f"http://{name}.{ns}.svc.cluster.local",
            "address": {"url": address}, "latestCreatedRevisionName": revision,
            "latestReadyRevisionName": revision,
            "conditions": [_cond("Ready", "True"), _cond("ConfigurationsReady", "True"), _cond("RoutesReady", "True")]})

    def _run_revision(self, name: str, obj: dict[str, Any]) -> str | None:
        """A revision's pod, as a local process with the container's environment."""
        container = obj["spec"]["template"]["spec"]["containers"][0]
        env = {**os.environ, **{e["name"]: e["value"] for e in container.get("env", [])}}
        port = free_port()
        env.update(PORT=str(port), FMA_HOST="127.0.0.1")
        if self.cache_dir:
            env["FMA_CACHE_DIR"] = str(self.cache_dir)  # the "/cache" volume
        with self._lock:
            old = self.procs.pop(name, None)
        if old:
            stop_process_group(old, 10)
        log = self.workdir / f"{name}.log"
        with self._lock:
            if self._closing:  # never leave a pod behind a stopped controller
                return None
            proc = start_gunicorn(WORKER_CONFIG, WORKER_APP, env, log)
            self.procs[name] = proc
        wait_ready(f"http://127.0.0.1:{port}", proc, 120, log)
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        """Stop reconciling, then every revision process, including one being started."""
        self._events.put(None)
        with self._lock:
            self._closing = True
        for worker in self._workers:
            worker.join(30)
        with self._lock:
            procs, self.procs = list(self.procs.values()), {}
        for proc in procs:
            stop_process_group(proc, 10)
