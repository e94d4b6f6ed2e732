"""Prometheus series of one worker, on a registry of its own.

A registry per app (not the process-global default) lets tests build several
apps in one process and keeps ``/metrics`` free of unrelated collectors.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


def resident_bytes() -> int | None:
    """This process's resident memory (Linux ``/proc/self/statm``), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class WorkerMetrics:
    def __init__(self, model: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.model = model
        self.requests = Counter("fma_worker_requests", "Inference requests by endpoint and HTTP status",
                                ["model", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("fma_worker_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.prefix_hit_tokens = Counter("fma_worker_prefix_cache_hit_tokens", "Prompt tokens whose keys and "
                                         "values came from the prefix cache instead of a forward pass", ["model"],
                                         registry=r)
        self.completion_tokens = Counter("fma_worker_completion_tokens", "Completion tokens generated",
                                         ["model"], registry=r)
        self.ttft = Histogram("fma_worker_time_to_first_token_seconds",
                              "From request admission to the first generated token", ["model"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("fma_worker_queue_wait_seconds", "Time waiting for a generation slot",
                                    ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.load = Histogram("fma_worker_load_seconds", "Model load time (weights to device, ready to serve)",
                              ["model", "phase"], buckets=_LOAD_BUCKETS, registry=r)
        self.load_throughput = Gauge("fma_worker_load_bytes_per_second", "Weight bytes loaded per second, last load",
                                     ["model"], registry=r)
        self.sleep = Histogram("fma_worker_sleep_seconds", "Time to put the model to sleep", ["model", "level"],
                               buckets=_LOAD_BUCKETS, registry=r)
        self.wake = Histogram("fma_worker_wake_seconds", "Time to wake the model", ["model", "level"],
                              buckets=_LOAD_BUCKETS, registry=r)
        self.state = Gauge("fma_worker_state", "1 for the current engine state", ["model", "state"], registry=r)
        self.in_flight = Gauge("fma_worker_in_flight", "Generations running now", ["model"], registry=r)
        self.queued = Gauge("fma_worker_queued", "Requests waiting for a generation slot", ["model"], registry=r)
        self.batch_rows = Histogram("fma_worker_batch_rows", "Sequences in each decode step's forward pass",
                                    ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.resident = Gauge("fma_worker_resident_bytes", "Resident memory of the worker process (weights "
                              "included while awake)", registry=r)
        self.resident.set_function(lambda: resident_bytes() or 0)
        self.rejected = Counter("fma_worker_rejected", "Requests rejected before generation", ["model", "reason"],
                                registry=r)

    def set_state(self, state: str, all_states: tuple[str, ...]) -> None:
        for s in all_states:
            self.state.labels(self.model, s).set(1 if s == state else 0)
