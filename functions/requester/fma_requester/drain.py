"""The requester's shutdown drain: since when it has been draining, and until when in-flight work may run.

gunicorn stops accepting on SIGTERM and gives in-flight requests ``graceful_timeout``
(``FMA_DRAIN_TIMEOUT``); at that deadline it kills whatever is left, and a stream killed there ends with
neither ``[DONE]`` nor an error, which a client cannot tell from a short answer. So a relayed stream that
is still running just before the deadline ends itself with one SSE error event (503 ``shutting_down``),
and the client knows to retry. ``gunicorn_conf.post_worker_init`` calls :func:`begin` on SIGTERM.
"""

from __future__ import annotations

import time

MARGIN_S = 1.0  # ended this long before the deadline, so the error event is written before the kill

_deadline: float | None = None


def begin(timeout_s: float) -> None:
    global _deadline
    if _deadline is None:
        _deadline = time.monotonic() + timeout_s


def draining() -> bool:
    return _deadline is not None


def closing_soon() -> bool:
    """True once the drain deadline is less than :data:`MARGIN_S` away."""
    return _deadline is not None and time.monotonic() >= _deadline - MARGIN_S


def reset() -> None:
    """For tests that build several apps in one process."""
    global _deadline
    _deadline = None
