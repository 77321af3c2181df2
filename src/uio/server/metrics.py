"""Prometheus metrics of the server, in a registry of its own (one per app)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class Metrics:
    """Requests by task and status, latency, batch sizes, queue depth, examples computed and their rate."""

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("uio_requests", "HTTP task requests answered, by task and status code",
                                ["task", "status"], registry=self.registry)
        self.latency = Histogram("uio_request_seconds", "Time from a task request's arrival to its answer",
                                 ["task"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("uio_batch_size", "Examples per run() call",
                                    buckets=tuple(range(1, max_batch + 1)), registry=self.registry)
        self.queue_depth = Gauge("uio_queue_depth", "Requests waiting for the model", registry=self.registry)
        self.examples = Counter("uio_examples", "Examples computed by the model", registry=self.registry)
        self.examples_per_second = Gauge("uio_examples_per_second", "Examples per second of the last run() call",
                                         registry=self.registry)
        self.dropped = Counter("uio_requests_dropped", "Queued requests dropped because their client left",
                               registry=self.registry)

    def observe_batch(self, size: int, seconds: float) -> None:
        """Record one run() call of ``size`` examples."""
        self.batch_size.observe(size)
        self.examples.inc(size)
        self.examples_per_second.set(size / seconds if seconds > 0 else 0.0)

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
