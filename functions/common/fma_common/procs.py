"""Starting and stopping gunicorn servers as child processes.

Used by the local actuator (one worker process per model), the benchmarks and
the tests, so all three start servers the same way: the checked-in gunicorn
config, a new session (so a whole process group can be signalled), output to
a log file, and readiness learned from ``GET /ready``.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .logs import tail

if TYPE_CHECKING:
    import httpx

WORKER_CONFIG = "fma_worker.gunicorn_conf"
WORKER_APP = "fma_worker.app:create_app()"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


# Below the kernel's ephemeral range: ports it never picks by itself, for an outgoing connection or a bind to 0.
PORT_SPAN = 8192


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now and that the kernel will not hand to anyone else before our child binds it.

    The child binds it a few hundred milliseconds later (a worker, a requester). A port from ``bind(0)`` lies in
    the kernel's ephemeral range, where every outgoing connection (the requester's own to its workers) draws its
    local port: one that draws ours in that window makes the child fail with "Address already in use" (seen in
    CI). So the port comes from the ``PORT_SPAN`` ports just below that range, at random, and is checked free by
    binding it; only two of our own pickers choosing the same port in the same window can still collide.
    """
    low, _ = _ephemeral_range()
    first = max(1024, low - PORT_SPAN)
    if first < low:
        for _ in range(64):
            port = random.randrange(first, low)
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue  # a listener or a connection there: another
                return port
    with socket.socket() as s:  # a machine whose ephemeral range starts near 1024: the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]


def start_gunicorn(config_module: str, app: str, env: Mapping[str, str], log_path: Path,
                   cwd: Path | None = None, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", f"python:{config_module}", app],
            env=dict(env), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, start_new_session=True, pass_fds=pass_fds)


def log_tail(log_path: Path, limit: int = 4000) -> str:
    return tail(log_path, limit)


class Cancelled(RuntimeError):
    """The wait was called off (the worker was released while it started)."""


@dataclass(frozen=True)
class Ready:
    seconds: float  # waited here
    start: dict[str, Any]  # the server's account of its start (fma_worker.timeline), {} if it gives none
    seen_at: float  # wall time the answer arrived


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, log_path: Path | None = None,
               interval: float = 0.05, cancel: threading.Event | None = None) -> Ready:
    """Wait until ``/ready`` answers 200.

    Asks with ``?wait=``, so a worker holds the answer until its model is loaded and it leaves the moment
    loading ends (no polling interval added to every cold start); before the server listens, connecting is
    retried every 10 ms (a refused connection costs microseconds). A server that ignores ``wait`` is polled
    every ``interval``. Raises ``RuntimeError`` (with the log tail) if the process exits first or reports
    ``{"status": "failed"}``, ``TimeoutError`` at the deadline, and :class:`Cancelled` as soon as ``cancel``
    is set (within a second: a held request is re-asked every second while a cancel may come).
    """
    import httpx  # here, not at import: a worker's gunicorn config imports this module (0.1 s of httpx)

    started = time.monotonic()
    deadline = started + timeout
    hold = 1.0 if cancel is not None else 5.0
    with httpx.Client(timeout=httpx.Timeout(hold + 5.0, connect=2.0)) as client:
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{url}: start cancelled")
            if proc.poll() is not None:
                tail = log_tail(log_path) if log_path else ""
                raise RuntimeError(f"server exited with code {proc.returncode} before it was ready\n{tail}")
            pause = 0.01
            try:
                wait = max(0.0, min(hold, deadline - time.monotonic()))
                asked = time.monotonic()
                resp = client.get(f"{url}/ready", params={"wait": f"{wait:.2f}"})
                if resp.status_code == 200:
                    return Ready(time.monotonic() - started, _start_report(resp), time.time())
                failure = _reported_failure(resp)
                if failure:
                    # The server is up but says it can never become ready (e.g. the model failed to load).
                    raise RuntimeError(f"server reports it failed: {failure}")
                # Up and not ready: ask again at once if it held the answer, else (it ignores wait) poll.
                pause = 0.0 if wait and time.monotonic() - asked >= 0.9 * wait else interval
            except httpx.HTTPError:
                pass
            if time.monotonic() >= deadline:
                tail = log_tail(log_path) if log_path else ""
                raise TimeoutError(f"{url} not ready after {timeout:.0f} s\n{tail}")
            if cancel is not None:
                cancel.wait(pause)
            else:
                time.sleep(pause)


def _start_report(resp: httpx.Response) -> dict[str, Any]:
    if not resp.headers.get("content-type", "").startswith("application/json"):
        return {}
    try:
        body = resp.json()
    except ValueError:
        return {}
    start = body.get("start") if isinstance(body, dict) else None
    return start if isinstance(start, dict) else {}


def _reported_failure(resp: httpx.Response) -> str | None:
    if not resp.headers.get("content-type", "").startswith("application/json"):
        return None
    try:
        body = resp.json()
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("status") == "failed":
        return str(body.get("error") or "unknown error")
    return None


def stop_process_group(proc: subprocess.Popen, timeout: float = 30.0) -> int | None:
    """SIGTERM the process (gunicorn drains), then SIGKILL its group at the deadline."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
    return proc.returncode


def watch_lifeline(fd: int, on_eof: Callable[[], None]) -> threading.Thread:
    """Call ``on_eof`` when the other end of an inherited pipe is closed.

    The parent keeps the only write end; when it exits, however it exits, the
    kernel closes it and ``read`` returns EOF here.
    """
    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        on_eof()

    thread = threading.Thread(target=watch, name="fma-lifeline", daemon=True)
    thread.start()
    return thread
