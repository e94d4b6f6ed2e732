"""gunicorn configuration of the worker (``gunicorn -c python:fma_worker.gunicorn_conf``).

Concurrency model: **one process, gthread**. The model is loaded once, in
that process, on a background thread (so boot is instant and ``/health``
answers while weights load). Request threads share the model; the engine's
admission slots decide how many generate at once, and the thread pool is sized
larger than slots + queue so ``/health``, ``/ready`` and ``/metrics`` always
find a free thread even while long generations stream. torch releases the GIL
inside its kernels, so probes stay responsive during a forward pass.

Why not gevent: a forward pass is one long C call that would block the whole
event loop, probes included. Why not several processes: each would hold its
own copy of the weights and the sleep API would only reach one of them.

SIGTERM: gunicorn stops accepting, lets in-flight requests (streams included)
finish for up to ``graceful_timeout``, then exits. ``timeout`` is the
heartbeat limit of the worker's main loop, which keeps running while a model
loads on its thread; it is still set well above the longest model load seen.
"""

import os
import signal
import threading

from fma_common.procs import watch_lifeline
from fma_worker import runtime_env, timeline
from fma_worker.settings import WorkerSettings

timeline.mark("config")  # this process (plain or forked) got as far as gunicorn reading its config
timeline.mark_process_start()
# First, in a plain process and in one forked from the launcher alike: the
# library environment is this worker's own (see runtime_env).
runtime_env.prepare()
_settings = WorkerSettings.from_env()

bind = [f"{_settings.host}:{_settings.port}"]
worker_class = "gthread"
workers = 1
threads = _settings.worker_threads
timeout = 300
graceful_timeout = int(_settings.graceful_timeout_s)
keepalive = 75  # longer than typical proxy idle timeouts, so pooled connections are reused
accesslog = None  # the app logs one line per request itself, without bodies
errorlog = "-"
loglevel = _settings.log_level
proc_name = f"fma-worker:{_settings.model}"
# gunicorn 25+ opens a management socket at one fixed path ($HOME/.gunicorn/gunicorn.ctl) for every server:
# each worker would take it from the last, and it lets whoever can reach it stop or reconfigure the server.
control_socket_disable = True


LIFELINE_GRACE_S = 2.0  # the requester is gone: nobody can receive what is still being generated


def _requester_gone() -> None:
    """SIGTERM (what can end in a moment ends: streams notice their client left), then the whole process group
    is killed: a non-streamed generation for a client that no longer exists would otherwise run on for the full
    ``graceful_timeout``, holding the model's memory with no requester to count it."""
    os.kill(os.getpid(), signal.SIGTERM)
    timer = threading.Timer(LIFELINE_GRACE_S, lambda: os.killpg(os.getpgrp(), signal.SIGKILL))
    timer.daemon = True
    timer.start()


def when_ready(server) -> None:
    """Shut down if the process that started us goes away.

    A requester passes the read end of a pipe in ``FMA_LIFELINE_FD``; EOF on it
    means the requester is gone (even after SIGKILL), so no worker outlives it.
    Workers lead their own process group (``start_new_session``, or ``setsid``
    in the launcher), which is what the escalation kills.
    """
    timeline.mark("listening")
    fd = os.environ.get("FMA_LIFELINE_FD")
    if fd and fd.isdigit():
        watch_lifeline(int(fd), _requester_gone)


def post_fork(server, worker) -> None:
    timeline.mark("worker")
    # Only the arbiter watches the lifeline; the fd is not needed in the worker.
    fd = os.environ.get("FMA_LIFELINE_FD")
    if fd and fd.isdigit():
        try:
            os.close(int(fd))
        except OSError:
            pass
