"""The pre-warmed launcher: forks worker processes that skip the import cost.

Importing torch and transformers costs a new worker process 3-5 s, most of a
cold start for a small model. The launcher pays it once: it imports them (and
the worker's own modules) and then waits for commands. Each spawn is a
``fork()``; the child already holds every imported module and goes straight
to gunicorn, which loads the model. This is FMA's launcher idea, in-process
and without a network API.

Protocol (JSON lines): the requester writes ``{"op": "spawn", "id", "env",
"log"}`` to stdin; the launcher answers ``{"op": "spawned", "id", "pid"}`` or
``{"op": "error", "id", "message"}`` on stdout and reports every child's end
as ``{"op": "exit", "pid", "code"}``. ``{"op": "prepare", "model", "env"}``
asks it to build that model's config, tokenizer and empty model ahead
(``prepared.py``), answered by ``{"op": "prepared", ...}``; preparing runs only
while no spawn is waiting, so it never delays a cold start. EOF on stdin (the requester is gone)
makes the launcher terminate its children and exit.

Fork safety: the launcher runs **one thread**; exits are reaped in a SIGCHLD
handler, and every message is one ``os.write`` (no buffered-stream locks a
forked child could inherit half-held). CUDA is never initialized here
(``import torch`` does not), so children may use the GPU. The worker's
gunicorn config module is deliberately *not* imported: gunicorn imports it
in the child, where it reads that child's environment and re-reads what the
hub libraries computed from the launcher's (``runtime_env``). A worker whose
environment differs in what cannot be re-read is never sent here: the
requester starts it as a plain process (``fma_common.fork_env``).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from typing import Any

_children: set[int] = set()


def _send(message: dict[str, Any]) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        try:
            written = os.write(1, data)
        except InterruptedError:
            continue
        data = data[written:]


def _reap(_signum: int, _frame: Any) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _children.discard(pid)
        _send({"op": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


def prewarm() -> float:
    """Import what every worker needs; returns the seconds it took."""
    started = time.monotonic()
    from fma_worker import runtime_env

    runtime_env.prepare()
    import accelerate  # noqa: F401  what a CPU worker's load imports: the empty model, the mapped weights
    import gunicorn.app.wsgiapp
    import gunicorn.workers.gthread  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401  the embedded model's architecture

    import fma_common.procs  # noqa: F401  the worker's gunicorn config imports it
    import fma_worker.app
    import fma_worker.engine
    import fma_worker.prepared
    import fma_worker.single  # noqa: F401

    transformers.utils.logging.disable_progress_bar()
    return time.monotonic() - started


def _run_child(env: dict[str, str], log_path: str) -> None:
    """In the forked child: become a worker. Never returns."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.environ.clear()
        os.environ.update(env)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        sys.argv = ["fma-worker"]
        from fma_worker import single

        single.serve()  # one process: gunicorn's worker without its arbiter (see single.py)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # report, then leave without running the parent's cleanup
        try:
            os.write(2, f"launcher child failed: {type(exc).__name__}: {exc}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(code)


class _Commands:
    """JSON-line commands from stdin, read with ``os.read`` (no buffered-stream lock to fork while held)."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self._buf = b""
        self.eof = False

    def pending(self) -> bool:
        """A complete command is waiting (or stdin ended): spawns go before preparing more models."""
        if b"\n" in self._buf or self.eof:
            return True
        try:
            readable, _, _ = select.select([self.fd], [], [], 0)
        except InterruptedError:
            return False
        return bool(readable)

    def next(self) -> bytes | None:
        """The next line; None at EOF (the requester is gone)."""
        while b"\n" not in self._buf:
            if self.eof:
                return None
            try:
                chunk = os.read(self.fd, 65536)
            except InterruptedError:
                continue
            if not chunk:
                self.eof = True
                if self._buf:
                    line, self._buf = self._buf, b""
                    return line
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line


def _prepare(cmd: dict[str, Any]) -> None:
    """Build a model's config, tokenizer and empty model now, so the workers forked for it skip that."""
    from fma_worker import prepared

    name = str(cmd.get("model", "?"))
    try:
        found = prepared.target(dict(cmd["env"]))
        if found is None:
            _send({"op": "prepared", "model": name, "skipped": "nothing to prepare ahead (not a local folder yet, "
                   "or its device and dtype are decided at load)"})
            return
        from fma_worker.settings import WorkerSettings

        folder, dtype, with_skeleton = found
        kind = WorkerSettings.from_env(dict(cmd["env"])).kind or "chat"
        parts = prepared.prepare(folder, dtype, with_skeleton=with_skeleton, kind=kind)
        _send({"op": "prepared", "model": name, "folder": str(folder), "seconds": round(parts.seconds, 3),
               "skeleton": parts.skeleton is not None})
    except Exception as exc:  # a bad model must not take the launcher down; its worker will report it
        _send({"op": "prepared", "model": name, "error": f"{type(exc).__name__}: {exc}"})


def _spawn(cmd: dict[str, Any]) -> None:
    env, log_path, ident = dict(cmd["env"]), str(cmd["log"]), cmd["id"]
    from fma_worker import prepared

    prepared.drop_stale()  # a replaced model's mapped files are not handed to the child, nor kept here (stats)
    # Block SIGCHLD around fork so the child's pid is recorded before a fast exit could be reported.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            _run_child(env, log_path)
        _children.add(pid)
        _send({"op": "spawned", "id": ident, "pid": pid})
    except OSError as exc:
        _send({"op": "error", "id": ident, "message": f"fork failed: {exc}"})
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


def serve() -> int:
    secs = prewarm()
    signal.signal(signal.SIGCHLD, _reap)
    _send({"op": "ready", "pid": os.getpid(), "prewarm_seconds": round(secs, 3)})
    commands = _Commands()
    to_prepare: list[dict[str, Any]] = []
    while True:
        if to_prepare and not commands.pending():
            _prepare(to_prepare.pop(0))  # only while no spawn waits
            continue
        line = commands.next()
        if line is None:
            break  # the requester is gone
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "spawn":
                _spawn(cmd)
            elif op == "prepare":
                to_prepare.append({"model": cmd.get("model"), "env": dict(cmd["env"])})
            else:
                raise ValueError(f"unknown op {op!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            _send({"op": "error", "id": None, "message": f"bad command: {exc}"})
    for pid in list(_children):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(serve())
