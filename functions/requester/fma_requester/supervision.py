"""Process supervision for local workers: spawning, watching, the lifeline, the launcher, log files.

``LocalEffects`` decides nothing and this module decides nothing either; it
owns the operating-system side of local workers:

* **Spawning**: fork from the pre-warmed launcher (torch already imported)
  when the worker's environment allows it (``fma_common.fork_env``), else a
  plain ``python -m gunicorn`` process. Either way the worker gets a new
  session, so its whole process group can be signalled.
* **Watching**: one thread per child blocks on its exit and reports it at
  once, so a crash is noticed when it happens, not at the next request.
* **Lifeline**: every child holds the read end of a pipe whose write end only
  this process holds. If the requester dies in any way - even SIGKILL - the
  kernel closes it, the child sees EOF and shuts itself down, so no worker
  outlives its requester.
* **Logs**: one file per model in ``FMA_WORKER_LOG_DIR``, rotated by size
  (``fma_common.logs.rotate``), read from the end for error messages.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fma_common import logs
from fma_common.fork_env import fork_blockers
from fma_common.procs import WORKER_APP, WORKER_CONFIG, start_gunicorn

from .launcher_client import LauncherClient, LauncherError
from .settings import RequesterSettings

log = logging.getLogger("fma.requester.supervision")


def log_file_name(model: str) -> str:
    """A file name for a model's log, distinct for every model name and from the launcher's ``launcher.log``.

    Model names may hold ``/`` and worse, so they are made safe; when that changed the name (``a/b`` and ``a_b``
    would both be ``a_b``) a short hash of the exact name is added. The ``worker-`` prefix keeps a model named
    ``launcher`` out of the launcher's log.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._") or "model"
    if slug != model:
        slug += "-" + hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"worker-{slug}.log"


class ProcessSupervisor:
    def __init__(self, settings: RequesterSettings, base_env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.base_env = dict(os.environ if base_env is None else base_env)
        self._lifeline_r, self._lifeline_w = os.pipe()
        os.set_inheritable(self._lifeline_w, False)
        self._launcher: LauncherClient | None = None
        self._launcher_lock = threading.Lock()
        self._closing = False
        self._told_plain: set[tuple[str, ...]] = set()

    @property
    def lifeline_fd(self) -> int:
        return self._lifeline_r

    @property
    def log_dir(self) -> Path:
        assert self.settings.worker_log_dir is not None
        return self.settings.worker_log_dir

    def launcher_environment(self) -> dict[str, str]:
        env = {**self.base_env, "FMA_LIFELINE_FD": str(self._lifeline_r)}
        env.setdefault("HF_HUB_OFFLINE", "1")
        return env

    # ---- the launcher ----------------------------------------------------------------

    def prewarm(self, prepare: list[tuple[str, dict[str, str]]] | None = None) -> None:
        """Start the launcher in the background, so the first cold start already skips the imports; then ask
        it to prepare these models (name, worker environment) ahead, in this order."""
        if self.settings.launcher:
            threading.Thread(target=self._start_and_prepare, args=(prepare or [],), name="fma-launcher-start",
                             daemon=True).start()

    def prepare(self, models: list[tuple[str, dict[str, str]]]) -> None:
        """Ask a running launcher to prepare these models ahead (a changed models file); never blocks for long."""
        if self.settings.launcher and models:
            threading.Thread(target=self._start_and_prepare, args=(models,), name="fma-launcher-prepare",
                             daemon=True).start()

    def _start_and_prepare(self, models: list[tuple[str, dict[str, str]]]) -> None:
        launcher = self._ensure_launcher()
        if launcher is None:
            return
        for name, env in models:
            if fork_blockers(launcher.env, env):
                continue  # it will start as a plain process: nothing forked would use the parts
            try:
                launcher.prepare(name, env)
            except LauncherError as exc:
                log.warning("could not ask the launcher to prepare %s: %s", name, exc)
                return

    def _ensure_launcher(self) -> LauncherClient | None:
        with self._launcher_lock:
            if self._closing:
                return None
            if self._launcher is None or not self._launcher.alive:
                try:
                    self.log_dir.mkdir(parents=True, exist_ok=True)
                    self._launcher = LauncherClient(self.launcher_environment(), self.log_dir / "launcher.log",
                                                    pass_fds=(self._lifeline_r,))
                except OSError as exc:
                    log.warning("could not start the launcher: %s", exc)
                    self._launcher = None
            return self._launcher

    # ---- spawning ---------------------------------------------------------------------

    def spawn(self, model: str, env: Mapping[str, str], log_path: Path) -> tuple[Any, str]:
        """Start a worker; returns (a Popen-like process, "launcher" or "plain")."""
        launcher = self._ensure_launcher() if self.settings.launcher else None
        if launcher is not None:
            blockers = fork_blockers(launcher.env, env)
            if blockers:
                key = (model, *blockers)
                if key not in self._told_plain:
                    self._told_plain.add(key)
                    log.info("starting %s as a plain process: %s differ(s) from the launcher's and cannot be "
                             "re-read after fork", model, ", ".join(blockers))
            else:
                try:
                    return launcher.spawn(env, log_path), "launcher"
                except LauncherError as exc:
                    log.warning("launcher could not spawn %s (%s); starting it as a plain process", model, exc)
        return start_gunicorn(WORKER_CONFIG, WORKER_APP, env, log_path, pass_fds=(self._lifeline_r,)), "plain"

    def watch(self, proc: Any, on_exit: Callable[[int], None], name: str) -> None:
        def wait() -> None:
            code = proc.wait()
            on_exit(code)

        threading.Thread(target=wait, name=f"fma-watch-{name}", daemon=True).start()

    # ---- logs ------------------------------------------------------------------------

    def log_path(self, model: str) -> Path:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self.log_dir / log_file_name(model)

    def rotate_logs(self) -> None:
        try:
            paths = [p for p in self.log_dir.iterdir() if p.suffix == ".log"]
        except OSError:
            return
        for path in paths:
            if logs.rotate(path, self.settings.worker_log_max_bytes, self.settings.worker_log_backups):
                log.info("rotated %s", path)

    # ---- shutdown ---------------------------------------------------------------------

    def close(self) -> None:
        with self._launcher_lock:
            self._closing = True
            launcher, self._launcher = self._launcher, None
        if launcher is not None:
            launcher.close()
