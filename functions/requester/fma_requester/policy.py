"""Scheduling policy as pure functions of plain data.

The state machine calls these with views taken *inside* its lock and acts
on the answer before releasing it, so a decision is never made on a stale
snapshot. Nothing here knows about processes, Kubernetes or time sources.

What a worker holds is what it holds *now*: a worker that is going to
sleep or stopping still holds its memory until that effect has completed,
so a replacement waits for it instead of starting beside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Holds = Literal["none", "awake", "asleep"]


@dataclass(frozen=True)
class WorkerView:
    """What the policy needs to know about one model's worker."""

    model: str
    phase: str  # the state machine's phase (cold, starting, ready, going_to_sleep, sleeping, waking, stopping, failed)
    in_flight: int
    waiters: int
    last_used: float
    idle_timeout: float
    holds: Holds = "none"
    memory_mib: int = 0  # footprint while awake (models file); 0 = not counted
    sleep_memory_mib: int = 0  # footprint while asleep

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and self.waiters == 0

    @property
    def footprint_mib(self) -> int:
        return {"awake": self.memory_mib, "asleep": self.sleep_memory_mib}.get(self.holds, 0)

    def after_pending(self) -> WorkerView:
        """The view once its effect in progress completes (what it will hold then)."""
        if self.phase == "stopping":
            return _replace(self, "cold", "none")
        if self.phase == "going_to_sleep":
            return _replace(self, "sleeping", "asleep")
        return self


def _replace(v: WorkerView, phase: str, holds: Holds) -> WorkerView:
    return WorkerView(v.model, phase, v.in_flight, v.waiters, v.last_used, v.idle_timeout, holds, v.memory_mib,
                      v.sleep_memory_mib)


@dataclass(frozen=True)
class Budget:
    max_loaded: int  # awake workers, transitional ones included
    sleepers: int  # sleeping workers
    memory_mib: int | None = None  # awake and sleeping footprints together, when set


@dataclass(frozen=True)
class Room:
    """The answer to "may this model start (or wake) now?"."""

    go: bool
    actions: tuple[tuple[str, Literal["sleep", "stop"]], ...] = ()  # take these now, then ask again
    reason: str = ""  # why not yet


def _fits(views: Sequence[WorkerView], budget: Budget, me: WorkerView) -> bool:
    awake = sum(1 for v in views if v.holds == "awake")
    if awake + 1 > budget.max_loaded:
        return False
    if budget.memory_mib is None:
        return True
    return sum(v.footprint_mib for v in views) + me.memory_mib <= budget.memory_mib


def plan_room(workers: Iterable[WorkerView], budget: Budget, model: str, *, sleep_level: int,
              reserved: Sequence[WorkerView] = ()) -> Room:
    """Decide whether ``model`` may start (or wake) now, and what must make room first.

    ``reserved`` are models ahead of this one in line, counted as if already
    awake. Idle awake workers are put away least recently used first: to
    sleep while the sleeper budget allows (and ``sleep_level`` > 0), else
    stopped; with a memory budget, idle sleepers may be stopped too. A
    worker with requests in flight or waiting is never chosen; if only such
    workers could make room, the answer is to wait, and nothing is evicted
    for nothing.
    """
    views = list(workers)
    me = next(v for v in views if v.model == model)
    ahead = [_replace(r, "starting", "awake") for r in reserved]
    others = [v for v in views if v.model != model and v.model not in {r.model for r in reserved}] + ahead
    if _fits(others, budget, me):
        return Room(True)
    projected = [v.after_pending() for v in others]
    if _fits(projected, budget, me):
        busy = sum(1 for v in others if v.phase in ("stopping", "going_to_sleep"))
        return Room(False, reason=f"waiting for {busy} worker(s) to finish stopping or going to sleep")
    for prefer_sleep in (True, False):
        actions = _evict(projected, budget, me, sleep_level if prefer_sleep else 0)
        if actions is not None:
            return Room(False, actions=tuple(actions), reason="making room")
    return Room(False, reason="every awake worker is busy")


def _evict(views: list[WorkerView], budget: Budget, me: WorkerView,
           sleep_level: int) -> list[tuple[str, Literal["sleep", "stop"]]] | None:
    """Victims (LRU, idle only) until ``me`` fits, or None if it cannot fit.

    A victim goes to sleep when that is allowed and enough (it frees its
    place among the awake and the difference between its awake and asleep
    footprints); when memory is short and sleeping would not cover it, it is
    stopped, which frees all of it.
    """
    current = {v.model: v for v in views}
    sleepers = sum(1 for v in views if v.holds == "asleep")  # ``views`` leaves ``me`` out
    actions: list[tuple[str, Literal["sleep", "stop"]]] = []

    def memory_short() -> int:
        if budget.memory_mib is None:
            return 0
        return sum(v.footprint_mib for v in current.values()) + me.memory_mib - budget.memory_mib

    for v in sorted((v for v in views if v.phase == "ready" and v.idle), key=lambda v: v.last_used):
        if _fits(list(current.values()), budget, me):
            return actions
        short = memory_short()
        if sleep_level > 0 and sleepers + 1 <= budget.sleepers and v.memory_mib - v.sleep_memory_mib >= short:
            actions.append((v.model, "sleep"))
            current[v.model] = _replace(v, "sleeping", "asleep")
            sleepers += 1
        else:
            actions.append((v.model, "stop"))
            current[v.model] = _replace(v, "cold", "none")
    if budget.memory_mib is not None:
        asleep_idle = sorted((v for v in current.values() if v.phase == "sleeping" and v.idle and v.sleep_memory_mib),
                             key=lambda v: v.last_used)
        for v in asleep_idle:
            if _fits(list(current.values()), budget, me):
                return actions
            actions = [a for a in actions if a[0] != v.model] + [(v.model, "stop")]
            current[v.model] = _replace(v, "cold", "none")
    return actions if _fits(list(current.values()), budget, me) else None


def idle_expired(workers: Iterable[WorkerView], now: float) -> list[str]:
    """Ready or sleeping workers with nothing in flight or waiting, unused for longer than their idle timeout."""
    return [w.model for w in workers
            if w.phase in ("ready", "sleeping") and w.idle and now - w.last_used >= w.idle_timeout]


def idle_left(w: WorkerView, now: float) -> float | None:
    """Seconds until ``idle_expired`` picks this worker if nothing uses it; None while busy or not up."""
    if w.phase not in ("ready", "sleeping") or not w.idle:
        return None
    return max(0.0, w.last_used + w.idle_timeout - now)


def excess_sleepers(workers: Iterable[WorkerView], sleepers: int) -> list[str]:
    """Idle sleeping workers beyond the budget, least recently used first.

    A sleeper with requests waiting is about to wake and one already
    stopping is on its way out: neither counts.
    """
    asleep = [w for w in workers if w.phase in ("sleeping", "going_to_sleep") and w.waiters == 0]
    extra = len(asleep) - sleepers
    if extra <= 0:
        return []
    idle = sorted((w for w in asleep if w.phase == "sleeping" and w.idle), key=lambda w: w.last_used)
    return [w.model for w in idle[:extra]]


def backoff_delay(failures: int, base: float, cap: float) -> float:
    """Exponential backoff after consecutive start failures: base after the first, doubling, capped."""
    if failures <= 0:
        return 0.0
    return min(cap, base * (2 ** (failures - 1)))
