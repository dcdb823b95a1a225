"""Prometheus metrics: one registry per app, typed recorders for every metric.

Each worker exposes its own registry at ``/metrics``; Prometheus scrapes every worker
and sums. Metric names follow Prometheus conventions: counters end in ``_total`` (the
client library appends it), durations are in ``_seconds``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "Metrics", "hash_openid"]

# Grabs settle in about a millisecond; the tail that matters is 5 ms .. 1 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

Observe = Callable[[float], None]
Inc = Callable[[], None]


class Metrics:
    """The worker's Prometheus registry and typed recorders for every metric."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "hongbao_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "hongbao_http_request_duration_seconds",
            "Time from request to response, by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._grabs = Counter(
            "hongbao_grabs",
            "Red-packet grab outcomes (won, already_won, sold_out).",
            ["result"],
            registry=self.registry,
        )
        self._draws = Counter(
            "hongbao_draws",
            "Lottery draw outcomes (prize, no_prize, quota_exhausted).",
            ["result"],
            registry=self.registry,
        )
        self._ledger_lag = Gauge(
            "hongbao_ledger_lag",
            "Settled ledger entries in Redis streams not yet written to PostgreSQL, all "
            "campaigns (every worker samples the same total: take max, not sum).",
            registry=self.registry,
        )
        self._redis_errors = Counter(
            "hongbao_redis_errors",
            "Redis calls that failed (connection, timeout or server error).",
            registry=self.registry,
        )
        # labels() takes a lock and builds a tuple key; the hot path asks a plain dict.
        self._request_children: dict[tuple[str, str, int], Inc] = {}
        self._latency_children: dict[str, Observe] = {}
        self._grab_children: dict[str, Inc] = {}
        self._draw_children: dict[str, Inc] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and record its latency."""
        key = (route, method, status)
        inc = self._request_children.get(key)
        if inc is None:
            inc = self._requests.labels(route, method, str(status)).inc
            self._request_children[key] = inc
        inc()
        observe = self._latency_children.get(route)
        if observe is None:
            observe = self._latency.labels(route).observe
            self._latency_children[route] = observe
        observe(seconds)

    def count_grab(self, result: str) -> None:
        """Count one grab outcome."""
        inc = self._grab_children.get(result)
        if inc is None:
            inc = self._grabs.labels(result).inc
            self._grab_children[result] = inc
        inc()

    def count_draw(self, result: str) -> None:
        """Count one lottery draw outcome."""
        inc = self._draw_children.get(result)
        if inc is None:
            inc = self._draws.labels(result).inc
            self._draw_children[result] = inc
        inc()

    def set_ledger_lag(self, entries: int) -> None:
        """Report how many settled entries still wait to be written to PostgreSQL."""
        self._ledger_lag.set(entries)

    def count_redis_error(self) -> None:
        """Count one failed Redis call."""
        self._redis_errors.inc()

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


def hash_openid(openid: str, salt: str) -> str:
    """Stand-in for an openid in logs: SHA-256 of salt + openid, first 16 hex digits."""
    return hashlib.sha256(f"{salt}{openid}".encode()).hexdigest()[:16]
