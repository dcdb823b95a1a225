"""Prometheus metrics: one registry per app, typed recorders for every metric.

Each worker exposes its own registry at ``/metrics``; Prometheus scrapes every worker
and sums. Metric names follow Prometheus conventions: counters end in ``_total``,
durations are in ``_seconds``.

The per-request recorders are plain dict and list updates, read by a collector at
scrape time: prometheus_client's own metrics take a lock on every update, which on the
closed-window paths cost a measurable share of the request.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Metrics", "Pseudonyms"]

# Campaigns labelled in hongbao_campaign_ledger_lag at most: the label set is read from
# Redis by the lag sampler, never from requests, and only campaigns with entries waiting.
CAMPAIGN_SERIES_MAX = 50
# Grabs settle in about a millisecond; the tail that matters is 5 ms .. 1 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The "le" label of each bucket, as Prometheus clients write them ("0.001" .. "+Inf").
_LE = (*(repr(b) for b in LATENCY_BUCKETS), "+Inf")


class _Latency:
    """One route's latency histogram: a count per bucket (the last is +Inf) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0


class _HotPath(Collector):
    """Renders the per-request counters of a Metrics at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        requests = CounterMetricFamily(
            "hongbao_http_requests",
            "HTTP requests answered, by route template, method and status.",
            labels=["route", "method", "status"],
        )
        for (route, method, status), n in list(m.requests.items()):
            requests.add_metric([route, method, str(status)], n)
        yield requests
        latency = HistogramMetricFamily(
            "hongbao_http_request_duration_seconds",
            "Time from request to response, by route template.",
            labels=["route"],
        )
        for route, hist in list(m.latency.items()):
            buckets, cumulative = [], 0
            for le, n in zip(_LE, hist.counts, strict=True):
                cumulative += n
                buckets.append((le, float(cumulative)))
            latency.add_metric([route], buckets, hist.total)
        yield latency
        for name, doc, counts in (
            ("hongbao_grabs", "Red-packet grab outcomes (won, already_won, sold_out).", m.grabs),
            (
                "hongbao_draws",
                "Lottery draw outcomes (prize, no_prize, quota_exhausted).",
                m.draws,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["result"])
            for result, n in list(counts.items()):
                family.add_metric([result], n)
            yield family


class Metrics:
    """The worker's Prometheus registry and typed recorders for every metric."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, _Latency] = {}
        self.grabs: dict[str, int] = {}
        self.draws: dict[str, int] = {}
        self.registry.register(_HotPath(self))
        # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
        ProcessCollector(registry=self.registry)
        self._ledger_lag = Gauge(
            "hongbao_ledger_lag",
            "Settled ledger entries in Redis streams not yet written to PostgreSQL, all "
            "campaigns (every worker samples the same total: take max, not sum).",
            registry=self.registry,
        )
        self._campaign_ledger_lag = Gauge(
            "hongbao_campaign_ledger_lag",
            "Ledger entries of one campaign not yet in PostgreSQL; only campaigns with entries "
            "waiting, at most CAMPAIGN_SERIES_MAX of them (take max, not sum).",
            labelnames=["campaign"],
            registry=self.registry,
        )
        self._shard_ledger_lag = Gauge(
            "hongbao_shard_ledger_lag",
            "On a Redis Cluster: ledger entries not yet in PostgreSQL in the streams each "
            "master holds, by master (host:port; take max, not sum).",
            labelnames=["shard"],
            registry=self.registry,
        )
        self._events_live = Gauge(
            "hongbao_events_live",
            "1 while the worker's event listener is subscribed and resynced (its memory of "
            "revoked sessions and sold-out campaigns is trusted), else 0.",
            registry=self.registry,
        )
        self._ledger_up = Gauge(
            "hongbao_ledger_up",
            "1 when this worker's last PostgreSQL probe (every 2 s, and GET /healthz/ledger) "
            "answered, else 0. Grabs do not need PostgreSQL; the ledger lags while it is 0.",
            registry=self.registry,
        )
        self._payout_backlog = Gauge(
            "hongbao_payout_backlog",
            "About how many payout bills wait to be created at WeChat Pay (the queue from "
            "its head to its tail; sampled with the PostgreSQL probe where payouts are on).",
            registry=self.registry,
        )
        self._loop_stall = Gauge(
            "hongbao_loop_stall_recent_max_seconds",
            "Longest delay of the event loop's 10 ms probe tick over the last 5-10 s "
            "(how long the loop was blocked at worst, recently).",
            registry=self.registry,
        )
        self._loop_stalls = Counter(
            "hongbao_loop_stalls",
            "Event-loop probe ticks delayed more than 50 ms (the loop was blocked that long).",
            registry=self.registry,
        )
        self._redis_errors = Counter(
            "hongbao_redis_errors",
            "Redis calls that failed (connection, timeout or server error).",
            registry=self.registry,
        )
        self._audit_failures = Counter(
            "hongbao_audit_failures",
            "State-changing operator calls whose audit row PostgreSQL did not take "
            "(the call went ahead; the row is in the ERROR log line instead).",
            registry=self.registry,
        )

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and record its latency."""
        key = (route, method, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = _Latency()
        hist.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        hist.total += seconds

    def count_grab(self, result: str) -> None:
        """Count one grab outcome."""
        self.grabs[result] = self.grabs.get(result, 0) + 1

    def count_draw(self, result: str) -> None:
        """Count one lottery draw outcome."""
        self.draws[result] = self.draws.get(result, 0) + 1

    def set_campaign_ledger_lag(self, by_campaign: dict[str, int]) -> None:
        """Report the lag of each campaign with entries waiting (the largest few only)."""
        self._campaign_ledger_lag.clear()
        waiting = sorted((n, cid) for cid, n in by_campaign.items() if n > 0)
        for n, cid in waiting[-CAMPAIGN_SERIES_MAX:]:
            self._campaign_ledger_lag.labels(cid).set(n)

    def set_shard_ledger_lag(self, by_shard: dict[str, int]) -> None:
        """Report the lag held by each master of a Redis Cluster."""
        self._shard_ledger_lag.clear()
        for shard, n in by_shard.items():
            self._shard_ledger_lag.labels(shard).set(n)

    def set_ledger_lag(self, entries: int) -> None:
        """Report how many settled entries still wait to be written to PostgreSQL."""
        self._ledger_lag.set(entries)

    def set_events_live(self, live: bool) -> None:
        """Report whether the event listener is live."""
        self._events_live.set(1 if live else 0)

    def set_ledger_up(self, up: bool) -> None:
        """Report whether PostgreSQL answered the last probe."""
        self._ledger_up.set(1 if up else 0)

    def set_payout_backlog(self, bills: int) -> None:
        """Report the payout queue's length."""
        self._payout_backlog.set(bills)

    def set_loop_stall(self, seconds: float) -> None:
        """Report the longest recent event-loop stall."""
        self._loop_stall.set(seconds)

    def count_loop_stall(self) -> None:
        """Count one event-loop stall over 50 ms."""
        self._loop_stalls.inc()

    def count_redis_error(self) -> None:
        """Count one failed Redis call."""
        self._redis_errors.inc()

    def count_audit_failure(self) -> None:
        """Count one audit row that could not be written."""
        self._audit_failures.inc()

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


class Pseudonyms:
    """Stand-ins for openids in logs: BLAKE2b-64 of the openid keyed with SHA-256 of the
    salt (LOG_SALT), as 16 hex digits. Keyed BLAKE2 is a PRF by design, and the key is
    derived once instead of hashing salt + openid per request."""

    def __init__(self, salt: str) -> None:
        # The keyed state, made once: each pseudonym copies it instead of keying anew.
        self._keyed = hashlib.blake2b(key=hashlib.sha256(salt.encode()).digest(), digest_size=8)

    def __call__(self, openid: str) -> str:
        digest = self._keyed.copy()
        digest.update(openid.encode())
        return digest.hexdigest()
