"""Where this worker's start spent its time, from the spawn to readiness.

A cold start crosses three processes (the requester asks, the launcher forks,
gunicorn boots and the engine loads), so each records wall-clock marks and
the requester puts them together (``GET /ready?wait=`` answers with
:func:`report`). ``FMA_SPAWNED_AT`` is the wall time at which the requester
asked for this process; the rest are marked here, once each.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

_marks: dict[str, float] = {}
# Boot marks and the step that ends at each: what happened since the mark before it.
_BOOT = {"config": "spawn", "listening": "arbiter", "worker": "worker_process", "app": "app", "load": "engine"}


def process_started_at() -> float | None:
    """Wall time at which the kernel started this process (``/proc/self/stat`` field 22, clock ticks since boot),
    through ``CLOCK_BOOTTIME`` rather than ``btime`` (whole seconds); None where there is no procfs."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            # Field 2 (the command) may hold spaces and parentheses: split after its closing one.
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 overall; fields[0] here is field 3
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age


def mark_process_start() -> None:
    """Record when this process began (gunicorn's config, read first thing by a plain process's arbiter): the
    ``interpreter`` step, up to the ``config`` mark, is Python's start and gunicorn's own imports."""
    started = process_started_at()
    if started is not None:
        _marks.setdefault("process", started)


def mark(name: str) -> None:
    """Record when this process first got to ``name`` (later calls keep the first time)."""
    _marks.setdefault(name, time.time())


def report(load_phases: dict[str, float] | None) -> dict[str, Any]:
    """Seconds per step of this start: spawn (asked -> this process ran its config) or, where nobody said when it
    was asked, interpreter (the process began -> it ran its config), arbiter, worker_process, app
    and engine (gunicorn, then the Flask app; a forked worker has neither arbiter nor worker process), then the
    engine's load phases; ``ready_at`` is the wall time it became ready."""
    steps: dict[str, float] = {}
    spawned = os.environ.get("FMA_SPAWNED_AT")
    try:
        asked = float(spawned) if spawned else None
    except ValueError:
        asked = None
    config, load = _marks.get("config"), _marks.get("load")
    if asked is not None and config is not None:
        steps["spawn"] = config - asked
    elif config is not None and "process" in _marks:
        # A plain process (a Knative pod's): nobody recorded when it was asked for, but the kernel knows when
        # it began. Left out where spawn is known, which already includes it.
        steps["interpreter"] = max(0.0, config - _marks["process"])
    # The boot, mark to mark up to the engine's start: gunicorn's arbiter until it listens, its worker process,
    # the Flask app. A worker forked from the launcher has no arbiter and binds its socket while the model
    # loads (single.py): marks after the engine's start overlap the load and are left out of the sum.
    chain = sorted((at, name) for name, at in _marks.items() if name in _BOOT and (load is None or at <= load))
    for (before, _), (at, name) in itertools.pairwise(chain):
        steps[_BOOT[name]] = at - before
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
