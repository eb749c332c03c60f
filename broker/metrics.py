"""Prometheus metrics (SPEC §3.4), one registry per application instance."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_AUDIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


@dataclass
class Metrics:
    """The broker's metrics."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "broker_proxy_requests",
            "Proxied requests by outcome (allow, or the refusal reason)",
            ["outcome"],
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "broker_upstream_latency_seconds",
            "Time from forwarding to the upstream's response head",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.audit_latency = Histogram(
            "broker_audit_write_seconds",
            "Time to durably commit an audit event",
            buckets=_AUDIT_BUCKETS,
            registry=self.registry,
        )
        self.audit_failures = Counter(
            "broker_audit_write_failures",
            "Audit events that could not be committed",
            registry=self.registry,
        )
        self.audit_commit = Histogram(
            "broker_audit_commit_seconds",
            "Time to commit one group of audit events (one transaction, one fsync)",
            buckets=_AUDIT_BUCKETS,
            registry=self.registry,
        )
        self.audit_batch = Histogram(
            "broker_audit_batch_events",
            "Audit events committed together in one transaction",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self.live_tokens = Gauge(
            "broker_live_tokens", "Proxy tokens neither expired nor revoked", registry=self.registry
        )

    def observe_audit_batch(self, seconds: float, events: int) -> None:
        """Record one group commit of the audit writer (called from its thread)."""
        self.audit_commit.observe(seconds)
        self.audit_batch.observe(events)
