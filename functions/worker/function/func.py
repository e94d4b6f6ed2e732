"""The worker as a Knative Function (func-python's instanced form: ``new()``, ``start``, ``handle``, ``stop``,
``alive``, ``ready``).

The instance builds the same Flask app gunicorn serves (``fma_worker.app.create_app``) in ``start(cfg)``, from the
configuration func-python passes (the environment: nothing is read at import), and serves it through
``fma_common.asgi_wsgi.WsgiBridge``, so a client that leaves a stream frees its batch rows as under gunicorn.
func-python answers ``/health/liveness`` and ``/health/readiness`` from ``alive()`` and ``ready()``; every other
path, ``/health``, ``/ready`` and ``/loaded`` included, is the app's own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fma_common.asgi_wsgi import BridgedFunction

log = logging.getLogger("fma.worker.function")


class Worker(BridgedFunction):
    def __init__(self) -> None:
        self.engine: Any = None
        self.drain_timeout_s = 60.0

    def start(self, cfg: Mapping[str, str]) -> None:
        from fma_common.asgi_wsgi import WsgiBridge
        from fma_worker.app import create_app
        from fma_worker.settings import WorkerSettings

        settings = WorkerSettings.from_env(dict(cfg))
        app = create_app(settings)
        self.engine = app.extensions["fma"]["engine"]
        self.drain_timeout_s = settings.graceful_timeout_s
        # As many threads as gunicorn's gthread worker would have: every request slot and the queue.
        self.bridge = WsgiBridge(app.wsgi_app, threads=settings.worker_threads or 64,
                                 max_body=settings.max_body_bytes)
        log.info("worker function started for %s", settings.model)

    def stop(self) -> None:
        """Drain what is in flight (up to FMA_GRACEFUL_TIMEOUT), then free the model."""
        if self.bridge is not None:
            self.bridge.drain(self.drain_timeout_s)
            self.bridge.close()
        if self.engine is not None:
            self.engine.close()

    def alive(self) -> tuple[bool, str]:
        if self.engine is None:
            return True, "starting"
        return (self.engine.state != "failed"), self.engine.state

    def ready(self) -> tuple[bool, str]:
        """Ready as Knative's probe means it here: the model is loaded, awake or asleep (the app's /loaded)."""
        if self.engine is None:
            return False, "starting"
        return self.engine.state in ("ready", "sleeping"), self.engine.state


def new() -> Worker:
    return Worker()
