"""A worker forked from the launcher serves in one process: gunicorn's gthread worker without its arbiter.

A plain ``gunicorn`` is two processes: the arbiter binds the socket and forks the worker that loads the app.
For a worker forked from the launcher that second fork cost 40-70 ms of every cold start (the arbiter's
start-up, then a fork of a process holding torch), and the model could only start loading after it. Here the
launcher's child is the worker: it creates the app first (the weights start loading on their thread at once),
binds the socket while they load, and runs the same ``gthread`` worker class with the same settings
(``gunicorn_conf``).

What the arbiter did, and where it went:

* **SIGTERM drains**: the gthread worker's own loop stops accepting and finishes in-flight requests (streams
  too) for up to ``graceful_timeout``; that code is the worker's, not the arbiter's. The requester SIGKILLs
  the process group at its grace deadline, as before.
* **No orphans**: the lifeline (``FMA_LIFELINE_FD``) is watched here, as ``when_ready`` does for an arbiter;
  the worker also stops if its parent (the launcher) changes.
* **Readiness** is the same ``/ready``: connections made while the app loads wait in the socket's backlog.
* **Stopping is quick**: gthread keeps idle kept-alive connections for 2 s after SIGTERM, in case a request
  is already on its way on one. Our only client is the requester, which sends nothing to a worker it is
  stopping, and an evicted worker's memory is what the next model waits for: 0.1 s here.
* Given up: the arbiter's restart of a crashed worker process and its heartbeat kill. Neither applied: the
  requester sees the exit and starts a new worker, and its health probe catches one that hangs.

A plain process (no launcher: ``fma worker``, Knative pods, ``FMA_LAUNCHER=false``) still runs gunicorn with
its arbiter.
"""

from __future__ import annotations

import os
from typing import Any

from gunicorn.app.base import BaseApplication

from . import timeline


class _Server(BaseApplication):
    """gunicorn's settings from ``fma_worker.gunicorn_conf``, and the app already built."""

    def __init__(self, wsgi: Any) -> None:
        self._wsgi = wsgi
        super().__init__()

    def load_config(self) -> None:
        from fma_worker import gunicorn_conf

        for key, value in vars(gunicorn_conf).items():
            if key in self.cfg.settings:
                self.cfg.set(key.lower(), value)

    def load(self) -> Any:
        return self._wsgi


# Idle kept-alive connections are closed this long after SIGTERM (gthread's STOP_KEEPALIVE_LINGER, 2 s).
STOP_LINGER_S = 0.1


def serve() -> None:
    """Run the worker in this process until SIGTERM (drained) or the lifeline ends; raises SystemExit."""
    from gunicorn import sock
    from gunicorn.workers import gthread

    if hasattr(gthread, "STOP_KEEPALIVE_LINGER"):
        gthread.STOP_KEEPALIVE_LINGER = STOP_LINGER_S

    timeline.mark("config")
    from fma_worker import gunicorn_conf
    from fma_worker.app import create_app

    app = create_app()  # the model starts loading on its thread now
    server = _Server(app)
    cfg = server.cfg
    log = cfg.logger_class(cfg)
    sockets = sock.create_sockets(cfg, log)
    log.info("Listening at: %s (%s), one process (forked from the launcher)",
             ",".join(str(s) for s in sockets), os.getpid())
    gunicorn_conf.when_ready(None)  # watch the lifeline
    worker = cfg.worker_class(1, os.getppid(), sockets, server, cfg.timeout / 2.0, cfg, log)
    worker.pid = os.getpid()
    try:
        worker.init_process()  # signals, then the serving loop; returns after a drained stop
    finally:
        worker.tmp.close()
    raise SystemExit(0)
