"""Where this worker's start spent its time, from the spawn to readiness.

A cold start crosses three processes (the requester asks, the launcher forks,
gunicorn boots and the engine loads), so each records wall-clock marks and
the requester puts them together (``GET /ready?wait=`` answers with
:func:`report`). ``FMA_SPAWNED_AT`` is the wall time at which the requester
asked for this process; the rest are marked here, once each.
"""

from __future__ import annotations

import os
import time
from typing import Any

_marks: dict[str, float] = {}


def mark(name: str) -> None:
    """Record when this process first got to ``name`` (later calls keep the first time)."""
    _marks.setdefault(name, time.time())


def report(load_phases: dict[str, float] | None) -> dict[str, Any]:
    """Seconds per step of this start: spawn (asked -> this process ran its config), arbiter, worker_process, app
    and engine (gunicorn, then the Flask app), then the engine's load phases; ``ready_at`` is the wall time it
    became ready."""
    steps: dict[str, float] = {}
    spawned = os.environ.get("FMA_SPAWNED_AT")
    try:
        asked = float(spawned) if spawned else None
    except ValueError:
        asked = None
    config, load = _marks.get("config"), _marks.get("load")
    if asked is not None and config is not None:
        steps["spawn"] = config - asked
    # gunicorn's arbiter until it listens, its worker process, the Flask app (settings, metrics, the engine).
    previous = config
    for step, name in (("arbiter", "listening"), ("worker_process", "worker"), ("app", "app"), ("engine", "load")):
        at = _marks.get(name)
        if previous is not None and at is not None:
            steps[step] = at - previous
            previous = at
    for phase, secs in (load_phases or {}).items():
        steps[phase] = secs
    ready = _marks.get("ready")
    if ready is not None and load is not None:
        # What the phases leave out: the load's own bookkeeping between them.
        steps["other"] = max(0.0, (ready - load) - sum((load_phases or {}).values()))
    out: dict[str, Any] = {"steps": {k: round(v, 4) for k, v in steps.items()}}
    if ready is not None:
        out["ready_at"] = ready
        if asked is not None:
            out["since_asked"] = round(ready - asked, 4)
    return out
