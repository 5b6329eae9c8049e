"""Prometheus metrics of the sidecar, on a registry of its own (one per app instance)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _QueueCollector(Collector):
    """Queue depth read at scrape time, so it is right even after a restart."""

    def __init__(self, counts: Callable[[], Mapping[Any, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        counts = self.counts()
        yield GaugeMetricFamily("g0129_queue_pending", "Jobs accepted but not yet finished.", value=counts.get("pending", 0))
        yield GaugeMetricFamily("g0129_queue_dead", "Jobs in the dead-letter state.", value=counts.get("dead", 0))


class Metrics:
    def __init__(self, queue_counts: Callable[[], Mapping[Any, int]], ruleset_version: str = "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Which rule tables decide: a site's edit shows here as in every decision.
        Info("g0129_ruleset", "The rule tables in use.", registry=r).info({"version": ruleset_version})
        self.notifications = Counter(
            "g0129_notifications_received", "Notifications received, by shape.", ["shape"], registry=r
        )
        self.deduplicated = Counter(
            "g0129_notifications_deduplicated", "Notified changes already queued or done (not queued again).", registry=r
        )
        self.decisions = Counter("g0129_decisions", "Decisions made, by outcome.", ["outcome"], registry=r)
        self.writebacks = Counter(
            "g0129_writebacks", "Claim write-backs, by result (created, updated, unchanged, conflict, dry-run, own-echo).", ["result"], registry=r
        )
        self.retries = Counter("g0129_retries", "Retries: HTTP calls retried, and jobs put back for later.", ["kind"], registry=r)
        self.dead_letters = Counter("g0129_dead_letters", "Jobs dead-lettered.", registry=r)
        self.latency = Histogram(
            "g0129_processing_latency_seconds",
            "From accepting a notification to finishing its job.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
            registry=r,
        )
        r.register(_QueueCollector(queue_counts))

    def render(self) -> bytes:
        return generate_latest(self.registry)
