"""The server's Prometheus metrics (prometheus_client, one registry per app): requests by route
and status, request latency, batch sizes, exits per step and images per second."""
from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # the *_created series say when a counter was made: noise here

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RATE_WINDOW_S = 10.0


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("glancefocus_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("glancefocus_request_seconds",
                                 "Time from receiving a request to its answer, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("glancefocus_batch_size",
                                    "Images run together in one step graph call",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.exits = Counter("glancefocus_exits", "Images that left at each step (1 = the glance)",
                             ["step"], registry=self.registry)
        self.in_flight = Gauge("glancefocus_requests_in_flight",
                               "Prediction requests received and not yet answered",
                               registry=self.registry)
        self.images = Counter("glancefocus_images", "Images classified", registry=self.registry)
        self.rate = Gauge("glancefocus_images_per_second",
                          f"Images classified per second over the last {RATE_WINDOW_S:g} s",
                          registry=self.registry)
        self.rate.set_function(self.images_per_second)
        self._recent: collections.deque = collections.deque()
        self._lock = threading.Lock()
        # the labelled series, made once: labels() checks and looks them up under a lock on
        # every call (~8 us a request)
        self._answered: dict = {}
        self._exits: dict = {}

    def answered(self, route: str, status: int, seconds: float) -> None:
        """One request answered: counted by route and status, its latency by route."""
        series = self._answered.get((route, status))
        if series is None:
            series = self._answered[route, status] = (
                self.requests.labels(route=route, status=str(status)),
                self.latency.labels(route=route))
        series[0].inc()
        series[1].observe(seconds)

    def on_step(self, batch_sizes: list, finished: list) -> None:
        """Called by the batcher's worker after each round of steps."""
        for size in batch_sizes:
            self.batch_size.observe(size)
        if finished:
            now = time.monotonic()
            with self._lock:
                self._recent.append((now, len(finished)))
            self.images.inc(len(finished))
            for answer in finished:
                series = self._exits.get(answer.exit_step)
                if series is None:
                    series = self._exits[answer.exit_step] = self.exits.labels(
                        step=str(answer.exit_step))
                series.inc()

    def images_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S
