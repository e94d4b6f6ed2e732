"""Scheduling policy as pure functions of plain data.

The actuators call these with a snapshot taken *inside* their lock and act on
the answer before releasing it, so a decision is never made on stale state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerView:
    """What the policy needs to know about one worker."""

    model: str
    state: str  # cold | starting | ready | sleeping | failed
    in_flight: int
    waiters: int
    last_used: float
    idle_timeout: float
    memory_mib: int = 0  # declared footprint while awake (models file); 0 = not counted


def idle_expired(workers: Iterable[WorkerView], now: float) -> list[str]:
    """Workers with nothing in flight or waiting, unused for longer than their idle timeout."""
    return [w.model for w in workers
            if w.state in ("ready", "sleeping") and w.in_flight == 0 and w.waiters == 0
            and now - w.last_used >= w.idle_timeout]


def awake_count(workers: Iterable[WorkerView]) -> int:
    return sum(1 for w in workers if w.state in ("ready", "starting"))


def awake_memory(workers: Iterable[WorkerView]) -> int:
    return sum(w.memory_mib for w in workers if w.state in ("ready", "starting"))


def pick_eviction(workers: Iterable[WorkerView], max_loaded: int, exclude: str, *,
                  memory_budget_mib: int | None = None, need_mib: int = 0) -> str | bool | None:
    """Decide whether starting ``exclude`` needs room, and which worker gives it.

    Room means fewer than ``max_loaded`` awake workers and, with a memory
    budget, the awake workers' declared memory plus ``need_mib`` within it.
    Returns ``True`` when there is room already, the model name of the least
    recently used idle awake worker to put away (call again: more may be
    needed), or ``None`` when the budget is full and every awake worker is
    busy (the caller must wait).
    """
    ws = [w for w in workers if w.model != exclude]
    fits_count = awake_count(ws) < max_loaded
    fits_memory = memory_budget_mib is None or awake_memory(ws) + need_mib <= memory_budget_mib
    if fits_count and fits_memory:
        return True
    idle = [w for w in ws if w.state == "ready" and w.in_flight == 0 and w.waiters == 0]
    if not idle:
        return None
    return min(idle, key=lambda w: w.last_used).model


def excess_sleepers(workers: Iterable[WorkerView], sleepers: int) -> list[str]:
    """Sleeping workers beyond the budget, least recently used first."""
    asleep = sorted((w for w in workers if w.state == "sleeping" and w.in_flight == 0 and w.waiters == 0),
                    key=lambda w: w.last_used)
    extra = len(asleep) - sleepers
    return [w.model for w in asleep[:extra]] if extra > 0 else []


def backoff_delay(failures: int, base: float, cap: float) -> float:
    """Exponential backoff after consecutive start failures (0 failures: no wait)."""
    if failures <= 0:
        return 0.0
    return min(cap, base * (2 ** (failures - 1)))
