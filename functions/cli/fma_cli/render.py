"""How the CLI shows things: aligned tables, json/yaml, human durations, colour.

Pure functions of their inputs (the clock and "is this a terminal" are
arguments), so tests read the exact text a user sees.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

OUTPUTS = ("table", "json", "yaml")

# The colour of each state in a terminal: green serves now, yellow is on the way, blue is parked.
STATE_COLOURS = {"ready": "green", "starting": "yellow", "waking": "yellow", "going_to_sleep": "blue",
                 "sleeping": "blue", "stopping": "yellow", "cold": None, "failed": "red"}
_ANSI = {"red": 31, "green": 32, "yellow": 33, "blue": 34}


def use_colour(stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> bool:
    """Colour only for a terminal, and never with NO_COLOR set (https://no-color.org) or TERM=dumb."""
    env = os.environ if env is None else env
    stream = stream or sys.stdout
    if env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def paint(text: str, colour: str | None, enabled: bool) -> str:
    if not enabled or colour is None:
        return text
    return f"\x1b[{_ANSI[colour]}m{text}\x1b[0m"


def seconds(value: float | None) -> str:
    """A duration: ``0.95s``, ``12.3s``, ``4m05s``, ``2h10m``."""
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f}s"
    if value < 60:
        return f"{value:.1f}s"
    minutes, secs = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def ago(timestamp: float | None, now: float) -> str:
    """How long ago a wall-clock time was: ``just now``, ``42s ago``, ``3m ago``, ``2h ago``, ``5d ago``."""
    if timestamp is None:
        return "never"
    delta = max(0.0, now - timestamp)
    if delta < 1:
        return "just now"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if delta >= size:
            return f"{int(delta // size)}{unit} ago"
    return f"{int(delta)}s ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, colours: Sequence[Sequence[str | None]] = (),
          colour: bool = False, right: Sequence[str] = ()) -> str:
    """Columns aligned on the text as printed; colour codes do not count towards the width."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = []

    def line(cells: Sequence[str], tints: Sequence[str | None]) -> str:
        out = []
        for i, (cell, w) in enumerate(zip(cells, widths, strict=True)):
            padded = cell.rjust(w) if headers[i] in right else cell.ljust(w)
            out.append(paint(padded, tints[i] if i < len(tints) else None, colour))
        return "  ".join(out).rstrip()

    lines.append(line(headers, ()))
    for i, row in enumerate(rows):
        lines.append(line(row, colours[i] if i < len(colours) else ()))
    return "\n".join(lines)


def dump(data: Any, output: str) -> str:
    if output == "json":
        return json.dumps(data, indent=2)
    import yaml

    return yaml.safe_dump(data, sort_keys=False).rstrip("\n")


def state_text(w: Mapping[str, Any]) -> str:
    phase = w.get("phase") or w["state"]
    return w["state"] if phase == w["state"] else f"{w['state']} ({phase})"


def workers_table(rows: Sequence[Mapping[str, Any]], now: float, colour: bool) -> str:
    headers = ("MODEL", "STATE", "BACKEND", "IN-FLIGHT", "QUEUED", "LAST USED", "LAST ACTUATION", "IDLE LEFT")
    cells, tints = [], []
    for w in rows:
        act = w.get("last_actuation")
        idle = w.get("idle_left_s")
        cells.append((w["model"], state_text(w), w.get("backend", "-"), str(w.get("in_flight", 0)),
                      str(w.get("queued", 0)), ago(w.get("last_used"), now),
                      f"{act['path']} {seconds(act['seconds'])}" if act else "-",
                      seconds(idle) if idle is not None else "-"))
        tints.append((None, STATE_COLOURS.get(w.get("phase") or w["state"])))
    text = table(headers, cells, colours=tints, colour=colour, right=("IN-FLIGHT", "QUEUED"))
    problems = [f"{w['model']}: {w['error']}" for w in rows if w.get("error")]
    problems += [f"{w['model']}: {w['detail']}" for w in rows if w.get("detail") and not w.get("error")]
    return text + ("\n\n" + "\n".join(problems) if problems else "")


def cache_text(cache: Mapping[str, Any] | None) -> str:
    """``cached 548 MB bfloat16`` (the checkpoint's own dtype), ``not cached``, ``in the image``, ``local folder``."""
    if not cache:
        return "-"
    if cache.get("state") == "cached":
        size = cache.get("bytes", 0)
        text = f"cached {size / 1e9:.1f} GB" if size >= 1e9 else f"cached {size / 1e6:.0f} MB"
        return f"{text} {cache['dtype']}" if cache.get("dtype") else text
    return str(cache.get("state", "-"))


def models_table(rows: Sequence[Mapping[str, Any]], colour: bool) -> str:
    cells = [(m["id"], m.get("kind", "-"), m.get("state", "-"), m.get("backend", "-"), cache_text(m.get("cache")),
              ", ".join(m.get("aliases") or []) or "-") for m in rows]
    tints = [(None, None, STATE_COLOURS.get(m.get("state", ""))) for m in rows]
    return table(("MODEL", "KIND", "STATE", "BACKEND", "CACHE", "ALIASES"), cells, colours=tints, colour=colour)


def progress_line(model: str, w: Mapping[str, Any] | None, elapsed: float) -> str:
    """One line of ``fma warm``'s progress: what the worker is doing and for how long."""
    if w is None:
        return f"{model}: {seconds(elapsed)} asking the requester"
    detail = f": {w['detail']}" if w.get("detail") else ""
    return f"{model}: {seconds(elapsed)} {state_text(w)}{detail}"
