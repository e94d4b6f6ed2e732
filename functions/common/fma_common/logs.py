"""Logging shared by every process: one line per event to stderr; worker log files.

:func:`setup_logging` is called from the application factories and the CLI;
idempotent, so gunicorn's re-imports and tests that build many apps do not
stack handlers. :func:`tail` and :func:`rotate` serve the log files the local
actuator's workers write.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

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


def tail(path: Path | str, limit: int = 4000) -> str:
    """The last ``limit`` bytes of a log file, read from its end (never the whole file)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read(limit)
    except OSError:
        return ""
    return data.decode(errors="replace")


def rotate(path: Path | str, max_bytes: int, backups: int) -> bool:
    """Rotate a log file by size, leaving ``path.1`` ... ``path.N`` behind.

    Workers write their logs through a descriptor opened with ``O_APPEND``
    (they cannot be told to reopen), so this is logrotate's *copytruncate*:
    copy the file to ``path.1``, then truncate it in place; the writer's
    next append lands at the new end. A line written between the copy and
    the truncation can be lost, which is the known price of copytruncate.
    Returns True if the file was rotated.
    """
    path = Path(path)
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except OSError:
        return False
    try:
        if backups <= 0:
            os.truncate(path, 0)
            return True
        for n in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{n}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
        os.truncate(path, 0)
    except OSError:
        return False
    return True
