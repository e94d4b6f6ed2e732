"""The requester as a Knative Function (func-python's instanced form: ``new()``, ``start``, ``handle``, ``stop``,
``alive``, ``ready``).

``start(cfg)`` builds the same Flask app gunicorn serves (``fma_requester.app.create_app``) from the configuration
func-python passes (the environment; nothing is read at import) and serves it through
``fma_common.asgi_wsgi.WsgiBridge``: a client that leaves a stream closes the requester's upstream stream, as
under gunicorn. One instance is the state owner, as one gunicorn worker is. ``stop()`` refuses new requests,
drains those in flight for ``FMA_DRAIN_TIMEOUT`` and stops the workers and watches (``shutdown_all``).
func-python answers ``/health/liveness`` and ``/health/readiness`` from ``alive()``/``ready()``; ``/health``,
``/ready`` and every API route stay the app's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fma_common.asgi_wsgi import BridgedFunction

log = logging.getLogger("fma.requester.function")


class Requester(BridgedFunction):
    def __init__(self) -> None:
        self.app: Any = None
        self.drain_timeout_s = 30.0
        self.threads = 256

    def start(self, cfg: Mapping[str, str]) -> None:
        from fma_common.asgi_wsgi import WsgiBridge
        from fma_requester.app import create_app
        from fma_requester.settings import RequesterSettings

        settings = RequesterSettings.from_env(dict(cfg))
        self.app = create_app(settings)
        self.drain_timeout_s = settings.drain_timeout_s
        # Each open stream holds a thread here (gevent's cheap streams are gunicorn's): FMA_FUNCTION_THREADS bounds
        # them; the requester's own admission (max_queue per model) answers 429 before they run out.
        self.threads = int(dict(cfg).get("FMA_FUNCTION_THREADS", "256"))
        self.bridge = WsgiBridge(self.app.wsgi_app, threads=self.threads, max_body=settings.max_body_bytes)
        self._drain_on_sigterm()
        log.info("requester function started (%s actuator, %d threads)", settings.actuator, self.threads)

    def _drain_on_sigterm(self) -> None:
        """On SIGTERM func-python's hypercorn stops accepting, waits its ``graceful_timeout`` (3 s) and cancels what
        is left: a stream cut there ends with neither ``[DONE]`` nor an error. So the requester's drain starts with
        the signal, with that grace as its deadline, and its relayed streams end themselves with a
        ``shutting_down`` error event before it (fma_requester/drain.py), as under gunicorn.

        func-python installs its SIGTERM handler on the event loop before the server starts us (start runs in the
        lifespan startup, on that loop); ours is put in front of it and then calls it. asyncio keeps a loop's
        handlers in ``_signal_handlers`` (CPython's unix_events.py); without it the drain is not wired (logged)."""
        import asyncio
        import signal

        from fma_requester import drain

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not under an ASGI server's loop (a test calling start() directly)
        try:
            from hypercorn.config import Config

            grace = float(Config().graceful_timeout)
        except ImportError:
            grace = 3.0
        previous = getattr(loop, "_signal_handlers", {}).get(signal.SIGTERM)
        if previous is None:
            log.warning("no SIGTERM handler on the server's loop: streams open at shutdown end without an event")
            return

        def on_sigterm() -> None:
            drain.begin(grace)
            previous._run()  # func-python's own: stop the server

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)

    def stop(self) -> None:
        from fma_requester.app import shutdown_all

        if self.bridge is not None:
            self.bridge.drain(self.drain_timeout_s)
        shutdown_all(self.drain_timeout_s)
        if self.bridge is not None:
            self.bridge.close()

    def alive(self) -> tuple[bool, str]:
        return True, "running" if self.app is not None else "starting"

    def ready(self) -> tuple[bool, str]:
        if self.app is None:
            return False, "starting"
        ready = self.app.extensions["fma"]["ready"].is_set()
        return ready, "ready" if ready else "not ready"


def new() -> Requester:
    return Requester()
