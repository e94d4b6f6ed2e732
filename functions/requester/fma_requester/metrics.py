"""Prometheus series of the requester, on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STATES = ("cold", "starting", "ready", "sleeping", "failed")
PHASES = ("cold", "starting", "ready", "going_to_sleep", "sleeping", "waking", "stopping", "failed")
_ACTUATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class RequesterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.actuation = Histogram("fma_actuation_seconds",
                                   "Time from a request's arrival until its worker was ready, by path",
                                   ["model", "path"], buckets=_ACTUATION_BUCKETS, registry=r)
        self.requests = Counter("fma_requests", "Inference requests by model, endpoint and status",
                                ["model", "endpoint", "status"], registry=r)
        self.queued = Gauge("fma_queued_requests", "Requests waiting for a worker to become ready", ["model"],
                            registry=r)
        self.in_flight = Gauge("fma_in_flight_requests", "Requests being served by a worker", ["model"],
                               registry=r)
        self.rejections = Counter("fma_rejections", "Requests refused before reaching a worker", ["model", "reason"],
                                  registry=r)
        self.evictions = Counter("fma_evictions", "Workers put away to make room under the budget", ["model"],
                                 registry=r)
        self.idle_stops = Counter("fma_idle_scale_to_zero", "Workers stopped after their idle timeout", ["model"],
                                  registry=r)
        self.crashes = Counter("fma_worker_crashes", "Workers that exited without being asked to", ["model"],
                               registry=r)
        self.worker_state = Gauge("fma_worker_state", "1 for the current state of each model's worker",
                                  ["model", "state"], registry=r)
        self.worker_phase = Gauge("fma_worker_phase", "1 for the current fine-grained phase of each model's worker",
                                  ["model", "phase"], registry=r)
        self.upstream_errors = Counter("fma_upstream_errors", "Failures talking to a worker", ["model", "kind"],
                                       registry=r)
        self.events_sent = Counter("fma_events_sent", "Lifecycle CloudEvents the sink accepted", ["type"],
                                   registry=r)
        self.events_dropped = Counter("fma_events_dropped", "Lifecycle CloudEvents not delivered, by reason "
                                      "(queue_full, timeout, unreachable, rejected, error)", ["reason"], registry=r)
        self.queue_wait = Histogram("fma_queue_wait_seconds",
                                    "Time a request waited in the requester for a ready worker (every path)",
                                    ["model"], buckets=_ACTUATION_BUCKETS, registry=r)
        # fma_actuation_seconds{path=cold|wake} is observed once per actuation, from the first request (or
        # warm call) that found the worker cold or asleep; this is its latest value, for a per-model table.
        self.last_time_to_ready = Gauge("fma_last_time_to_ready_seconds",
                                        "The latest actuation's time from the first request to ready, by path",
                                        ["model", "path"], registry=r)
        self.workers = Gauge("fma_workers", "Models whose worker is in each state now (awake = ready)", ["state"],
                             registry=r)
        self._states: dict[str, str] = {}
        self.ttfb = Histogram("fma_upstream_first_byte_seconds", "Worker response start, as seen by the requester",
                              ["model"], buckets=_ACTUATION_BUCKETS, registry=r)

    def set_worker_state(self, model: str, state: str, phase: str | None = None) -> None:
        for s in STATES:
            self.worker_state.labels(model, s).set(1 if s == state else 0)
        for ph in PHASES:
            self.worker_phase.labels(model, ph).set(1 if ph == (phase or state) else 0)
        self._states[model] = state
        for s in STATES:
            self.workers.labels(s).set(sum(1 for v in self._states.values() if v == s))
