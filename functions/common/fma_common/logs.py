"""Logging set-up shared by every process: one line per event, to stderr.

Called from the application factories and the CLI; idempotent, so gunicorn's
re-imports and tests that build many apps do not stack handlers.
"""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not any(getattr(h, "_fma", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._fma = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    # Third-party chatter that would drown the lines operators need.
    for noisy in ("urllib3", "httpx", "httpcore", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
