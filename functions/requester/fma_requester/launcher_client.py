"""The requester's side of the pre-warmed launcher (``fma_worker.launcher``).

The launcher runs as a child of the requester with torch and transformers
already imported; ``spawn`` asks it to fork a worker and returns a
:class:`LaunchedProcess`, which behaves like ``subprocess.Popen`` for what the
actuator needs (``pid``, ``poll``, ``wait``, ``send_signal``). The launcher
reports each child's exit, so a crash is seen the moment it happens even
though the worker is the launcher's child, not ours.

The requester process itself never imports torch: the launcher is a separate
interpreter started with ``python -m fma_worker.launcher``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("fma.requester.launcher")

# When the launcher is gone, its children are stopped: SIGTERM, then SIGKILL for their process group after this.
ORPHAN_GRACE_S = 5.0


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (not ours to wait for: an orphan's exit is reaped by init)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class LauncherError(RuntimeError):
    pass


class LaunchedProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, 9)
        except (ProcessLookupError, PermissionError):
            self.send_signal(9)

    def _exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    def _orphaned(self) -> None:
        """The launcher that reported this process's exit is gone: stop the process, and report its exit only
        once it is really gone. A hung or stopped worker ignores SIGTERM; marked exited at once, it would be
        skipped by the stop that follows (no SIGKILL) and live on beside the worker that replaces it."""
        def stop() -> None:
            self.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + ORPHAN_GRACE_S
            killed = False
            while _alive(self.pid):
                if not killed and time.monotonic() >= deadline:
                    log.warning("pid %s did not stop within %.0f s of its launcher's end; killing it", self.pid,
                                ORPHAN_GRACE_S)
                    self.kill_group()
                    killed = True
                time.sleep(0.05)
            self._exit(-signal.SIGKILL if killed else -1)

        threading.Thread(target=stop, name=f"fma-orphan-{self.pid}", daemon=True).start()


class LauncherClient:
    def __init__(self, env: Mapping[str, str], log_path: Path, pass_fds: tuple[int, ...] = ()) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fma_worker.launcher"], env=dict(env), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log_file, pass_fds=pass_fds, start_new_session=True)
        self.log_path = log_path
        self.env = dict(env)  # what the launcher imported its libraries under (see fma_common.fork_env)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._ready = threading.Event()
        self._dead = threading.Event()
        self._ids = itertools.count(1)
        self._pending: dict[int, dict[str, Any]] = {}
        self._children: dict[int, LaunchedProcess] = {}
        self.prewarm_seconds: float | None = None
        self.prepared: set[str] = set()  # models whose parts the launcher built ahead (see fma_worker.prepared)
        threading.Thread(target=self._read, name="fma-launcher-reader", daemon=True).start()

    @property
    def alive(self) -> bool:
        return not self._dead.is_set() and self.proc.poll() is None

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout) and self.alive

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            op = msg.get("op")
            if op == "ready":
                self.prewarm_seconds = msg.get("prewarm_seconds")
                log.info("launcher pid %s pre-warmed in %.2f s", msg.get("pid"), self.prewarm_seconds or 0.0)
                self._ready.set()
            elif op in ("spawned", "error"):
                child = LaunchedProcess(msg["pid"]) if op == "spawned" else None
                with self._lock:
                    waiter = self._pending.pop(msg.get("id"), None)
                    if child is not None:
                        self._children[child.pid] = child
                    if waiter is not None:
                        waiter["reply"], waiter["child"] = msg, child
                        waiter["event"].set()
                if waiter is None and child is not None:
                    # Forked after its requester gave up waiting: nobody owns it, so it must not live.
                    log.warning("launcher forked pid %s after the spawn timed out; stopping it", child.pid)
                    child.kill_group()
            elif op == "prepared":
                if msg.get("error"):
                    log.warning("launcher could not prepare %s ahead: %s", msg.get("model"), msg["error"])
                elif msg.get("skipped"):
                    log.info("launcher prepared nothing ahead for %s: %s", msg.get("model"), msg["skipped"])
                else:
                    log.info("launcher prepared %s ahead in %.2f s (config, tokenizer%s)", msg.get("model"),
                             msg.get("seconds") or 0.0, ", empty model" if msg.get("skeleton") else "")
                    self.prepared.add(str(msg.get("model")))
            elif op == "exit":
                with self._lock:
                    child = self._children.pop(msg["pid"], None)
                if child is not None:
                    child._exit(int(msg.get("code", -1)))
        # stdout closed: the launcher is gone. Its children live on (own
        # sessions); we can no longer learn their exits, so report them lost.
        self._dead.set()
        self._ready.set()
        with self._lock:
            pending = list(self._pending.values())
            children = list(self._children.values())
            self._children.clear()
        for waiter in pending:
            waiter["event"].set()
        for child in children:
            child._orphaned()
        log.warning("launcher exited (code %s); stopping the %d worker(s) it had forked", self.proc.poll(),
                    len(children))

    def _write(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        with self._write_lock:  # one whole line at a time: spawns and prepares come from different threads
            try:
                self.proc.stdin.write((json.dumps(message) + "\n").encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError) as exc:
                raise LauncherError(f"launcher is gone: {exc}") from None

    def prepare(self, model: str, env: Mapping[str, str]) -> None:
        """Ask the launcher to build this model's config, tokenizer and empty model before it is needed.

        Fire and forget: the launcher does it only while no spawn waits, and answers in the log.
        """
        self._write({"op": "prepare", "model": model, "env": dict(env)})

    def spawn(self, env: Mapping[str, str], log_path: Path, timeout: float = 120.0) -> LaunchedProcess:
        if not self.wait_ready(timeout):
            raise LauncherError("launcher is not running")
        ident = next(self._ids)
        waiter: dict[str, Any] = {"event": threading.Event(), "reply": None, "child": None}
        with self._lock:
            self._pending[ident] = waiter
        try:
            self._write({"op": "spawn", "id": ident, "env": dict(env), "log": str(log_path)})
            waiter["event"].wait(30)
        finally:
            with self._lock:
                self._pending.pop(ident, None)  # from now on a late reply has no owner, and is killed
        reply, child = waiter["reply"], waiter["child"]
        if reply is None:
            raise LauncherError("launcher did not answer a spawn within 30 s" if self.alive else
                                "launcher exited during a spawn")
        if child is None:
            raise LauncherError(reply.get("message", "spawn failed"))
        return child

    def close(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()  # EOF: the launcher terminates its children and exits
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
