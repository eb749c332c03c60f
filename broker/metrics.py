"""Prometheus metrics (docs/interfaces.md#metrics), one registry per application instance."""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from broker import serving
from broker.serving import ConnectionStats

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from datetime import datetime

    from prometheus_client import Metric

    from broker.domain import WorkerCredential
    from broker.services.audit_writer import EventWriter

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_COUNTED_CACHE_SIZE = 4096
_AUDIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


@dataclass
class Metrics:
    """The broker's metrics."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = LoopCounter(
            "broker_proxy_requests",
            "Proxied requests by client id ('-' when no token named one) and outcome "
            "(allow, a refusal reason, or an upstream failure)",
            ["client", "outcome"],
            registry=self.registry,
        )
        self.registry.register(_Refusals(self.requests))
        self.registry.register(_Connections())
        self._counted: dict[tuple[str, str], _Value] = {}
        self.upstream_latency = LoopHistogram(
            "broker_upstream_latency_seconds",
            "Time from forwarding to the upstream's response head",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.audit_latency = LoopHistogram(
            "broker_audit_write_seconds",
            "Time to durably commit an audit event",
            buckets=_AUDIT_BUCKETS,
            registry=self.registry,
        )
        self.upstream_credential_failures = Counter(
            "broker_upstream_credential_failures",
            "Proxied calls Canvas answered with an invalid-token 401: the worker credential "
            "is wrong, expired or revoked",
            ["credential"],
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
        self.keyring_reloads = Counter(
            "broker_keyring_reloads",
            "Times this process re-read its key file after it changed (result: reloaded), "
            "or found it unusable (result: failed)",
            ["result"],
            registry=self.registry,
        )
        self.credential_decrypt_failures = Counter(
            "broker_credential_decrypt_failures",
            "Worker tokens that did not decrypt with the keyring, even after reloading it "
            "(each one a 503 credential_unavailable)",
            registry=self.registry,
        )
        self.canvas_remaining = LoopGauge(
            "broker_canvas_capacity_remaining",
            "Canvas's remaining rate-limit capacity per worker credential, as last reported "
            "(X-Rate-Limit-Remaining) and aged by the outflow",
            ["credential"],
            registry=self.registry,
        )
        self.canvas_cost = LoopCounter(
            "broker_canvas_request_cost",
            "Canvas rate-limit cost (X-Request-Cost) of the client's proxied calls",
            ["client"],
            registry=self.registry,
        )
        self.canvas_held_back = Counter(
            "broker_canvas_held_back",
            "Calls answered 429 canvas_capacity: over the client's share of a credential "
            "whose Canvas capacity was under the reserve",
            ["credential", "client"],
            registry=self.registry,
        )
        self.canvas_sync_failures = Counter(
            "broker_canvas_share_sync_failures",
            "Rounds in which this process could not share its Canvas demand with the other "
            "processes and replicas (database down or slow); it retries every half second",
            registry=self.registry,
        )
        self.canvas_throttled = Counter(
            "broker_canvas_throttled",
            "Calls Canvas itself refused with its rate-limit 403 (relayed as sent)",
            ["credential", "client"],
            registry=self.registry,
        )
        self.credential_refreshes = Counter(
            "broker_credential_refreshes",
            "OAuth worker credentials' renewals and authorisations by outcome: refreshed, "
            "failed (tried again soon), refused (Canvas said no: the credential is unavailable), "
            "authorized, authorize_refused",
            ["outcome"],
            registry=self.registry,
        )
        self.credential_unavailable = Gauge(
            "broker_credential_unavailable",
            "1 for a worker credential whose calls are refused (503 credential_unavailable, or "
            "credential_expired for a manual token) until an admin acts (reason: "
            "not_authorized, refresh_refused, token_expired, credential_expired)",
            ["credential", "reason"],
            registry=self.registry,
        )
        self.credential_token_expiry = Gauge(
            "broker_credential_token_expires_seconds",
            "Seconds until the worker credential's stored token expires at Canvas (negative: "
            "expired), for credentials whose token has a known expiry",
            ["credential"],
            registry=self.registry,
        )
        self.live_tokens = Gauge(
            "broker_live_tokens", "Proxy tokens neither expired nor revoked", registry=self.registry
        )

    def observe_credentials(self, listed: Iterable[WorkerCredential], now: datetime) -> None:
        """Set the credential gauges from the credentials as stored now (at each scrape)."""
        self.credential_unavailable.clear()
        self.credential_token_expiry.clear()
        for credential in listed:
            reason = credential.unavailable_reason
            expiry = credential.token_expires_at
            if reason is None and expiry is not None and expiry <= now:
                reason = "credential_expired" if credential.kind == "manual" else "token_expired"
            if reason is not None:
                self.credential_unavailable.labels(credential.name, reason).set(1)
            if expiry is not None:
                self.credential_token_expiry.labels(credential.name).set(
                    round((expiry - now).total_seconds(), 3)
                )

    def count(self, client: str, outcome: str) -> None:
        """Count one proxied request of ``client`` with ``outcome``.

        The labelled child is looked up once per pair: ``labels()`` costs more than the
        increment itself, and clients and outcomes are few.
        """
        key = (client, outcome)
        child = self._counted.get(key)
        if child is None:
            if len(self._counted) >= _COUNTED_CACHE_SIZE:
                self._counted.clear()
            child = self._counted[key] = self.requests.labels(client=client, outcome=outcome)
        child.inc()

    def observe_keyring(self, event: str) -> None:
        """Count what the keyring's reloader reports (``KeyringReloader.observe``)."""
        if event == "undecryptable":
            self.credential_decrypt_failures.inc()
        else:
            self.keyring_reloads.labels(
                result="failed" if event == "reload_failed" else event
            ).inc()

    def watch_audit_writer(self, writer: EventWriter) -> None:
        """Report the completions ``writer`` keeps while the store is down, and drops."""
        self.registry.register(_Completions(writer))

    def observe_audit_batch(self, seconds: float, events: int) -> None:
        """Record one group commit of the audit writer (called from its thread)."""
        self.audit_commit.observe(seconds)
        self.audit_batch.observe(events)


UNAUTHENTICATED: Final = "-"
"""The ``client`` label of proxied requests whose token named no client."""

# Outcomes of calls that were forwarded; every other outcome is a refusal (nothing was sent).
FORWARDED_OUTCOMES: Final = frozenset(
    {
        "allow",
        "upstream_timeout",
        "upstream_unreachable",
        "upstream_body_failed",
        "upstream_credential_exposed",
        "upstream_credential_rejected",
    }
)


class _Refusals(Collector):
    """``broker_proxy_refusals_total{reason}``: refused proxied requests, summed over clients.

    Derived from ``broker_proxy_requests`` at scrape time, so the proxy counts each request
    once and the two can never disagree.
    """

    def __init__(self, requests: LoopCounter) -> None:
        self._requests = requests

    def describe(self) -> Iterable[Metric]:
        """The family this collector yields (no samples)."""
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        """Current totals by refusal reason."""
        totals: dict[str, float] = defaultdict(float)
        for metric in self._requests.collect():
            for sample in metric.samples:
                outcome = sample.labels.get("outcome", "")
                if sample.name.endswith("_total") and outcome not in FORWARDED_OUTCOMES:
                    totals[outcome] += sample.value
        family = self._family()
        for reason, value in sorted(totals.items()):
            family.add_metric([reason], value)
        return [family]

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "broker_proxy_refusals",
            "Proxied requests refused before anything was sent upstream, by reason",
            labels=["reason"],
        )


class _Completions(Collector):
    """The audit writer's completions kept for a retry and dropped (docs/audit.md#under-faults).

    ``broker_audit_completions_retained``: completions of answered calls that could not be
    committed yet and are held in memory; ``broker_audit_completions_dropped_total``: those
    dropped because ``BROKER_AUDIT_RETAINED_COMPLETIONS`` were already held (their calls stay
    ``pending``). Read from the writer at scrape time.
    """

    def __init__(self, writer: EventWriter) -> None:
        self._writer = writer

    def describe(self) -> Iterable[Metric]:
        """The families this collector yields (no samples)."""
        return self._families(0, 0)

    def collect(self) -> Iterable[Metric]:
        """The writer's current figures."""
        return self._families(self._writer.completions_retained, self._writer.completions_dropped)

    @staticmethod
    def _families(retained: int, dropped: int) -> list[Metric]:
        gauge = GaugeMetricFamily(
            "broker_audit_completions_retained",
            "Completions of answered calls held in memory until the audit store is back",
            value=retained,
        )
        counter = CounterMetricFamily(
            "broker_audit_completions_dropped",
            "Completions dropped because the in-memory queue was full: their calls stay pending",
            value=dropped,
        )
        return [gauge, counter]


class _Connections(Collector):
    """What this process's connection limits did (docs/deployment.md#connections).

    Read at scrape time from ``broker.serving.stats``.
    """

    def describe(self) -> Iterable[Metric]:
        """The families this collector yields (no samples)."""
        return self._families(ConnectionStats())

    def collect(self) -> Iterable[Metric]:
        """The process's current figures."""
        return self._families(serving.stats)

    @staticmethod
    def _families(stats: ConnectionStats) -> list[Metric]:
        return [
            GaugeMetricFamily(
                "broker_client_connections",
                "Client connections this process holds",
                value=stats.open,
            ),
            CounterMetricFamily(
                "broker_client_connections_refused",
                "Connections answered 503 too_many_connections: the cap was reached, none idle",
                value=stats.refused,
            ),
            CounterMetricFamily(
                "broker_client_connections_evicted",
                "Idle connections closed to make room for a new one at the cap",
                value=stats.evicted,
            ),
            CounterMetricFamily(
                "broker_request_head_timeouts",
                "Connections closed because a request head did not arrive within "
                "BROKER_HEADER_TIMEOUT",
                value=stats.head_timeouts,
            ),
        ]


# prometheus_client's own text for a bucket bound ("0.005", "1.0", "+Inf"); untyped there.
_go_float: Callable[[float], str] = floatToGoString

# --- Metrics of every proxied call -------------------------------------------------------
#
# prometheus_client takes a lock per update, and its histogram finds the bucket in a Python
# loop: about 42,000 instructions per proxied call for five updates (bench/README.md,
# "Costs CPython hides"). The metrics updated on every call are plain numbers instead,
# updated on the event loop's thread only (every proxied call and every scrape run there, so
# nothing races), and turned into the same families, samples and ``_created`` series as
# prometheus_client's at scrape time. The other metrics change rarely and stay as they are.


class _Value:
    """One series' number and when it was created."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (a counter: never negative)."""
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount

    def set(self, value: float) -> None:
        """Set the value (a gauge)."""
        self.value = float(value)


class _Labelled(Collector):
    """A counter or gauge with labels, exposed as prometheus_client's ``Counter``/``Gauge``."""

    def __init__(
        self,
        kind: type[CounterMetricFamily | GaugeMetricFamily],
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        registry: CollectorRegistry,
    ) -> None:
        self._kind = kind
        self._name = name
        self._documentation = documentation
        self._labelnames = labelnames
        self._series: dict[tuple[str, ...], _Value] = {}
        registry.register(self)

    def labels(self, **values: str) -> _Value:
        """The series of these label values (created at zero on first use)."""
        if values.keys() != set(self._labelnames):
            raise ValueError(f"{self._name} takes the labels {', '.join(self._labelnames)}")
        key = tuple(str(values[name]) for name in self._labelnames)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Value()
        return series

    def describe(self) -> Iterable[Metric]:
        """The family this collector yields (no samples)."""
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        """Every series now."""
        family = self._family()
        for key, series in list(self._series.items()):
            if isinstance(family, CounterMetricFamily):
                family.add_metric(key, series.value, created=series.created)
            else:
                family.add_metric(key, series.value)
        return [family]

    def _family(self) -> CounterMetricFamily | GaugeMetricFamily:
        return self._kind(self._name, self._documentation, labels=self._labelnames)


class LoopCounter(_Labelled):
    """A labelled counter updated on the event loop (``labels(...).inc(amount)``)."""

    def __init__(
        self, name: str, documentation: str, labelnames: list[str], registry: CollectorRegistry
    ) -> None:
        super().__init__(CounterMetricFamily, name, documentation, tuple(labelnames), registry)


class LoopGauge(_Labelled):
    """A labelled gauge updated on the event loop (``labels(...).set(value)``)."""

    def __init__(
        self, name: str, documentation: str, labelnames: list[str], registry: CollectorRegistry
    ) -> None:
        super().__init__(GaugeMetricFamily, name, documentation, tuple(labelnames), registry)


class LoopHistogram(Collector):
    """A histogram without labels updated on the event loop (``observe(amount)``).

    An observation lands in the first bucket whose bound is at least the amount, as in
    prometheus_client, found by ``bisect`` in C.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        bounds = [float(bound) for bound in buckets]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError("histogram buckets must be distinct and in increasing order")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._name = name
        self._documentation = documentation
        self._bounds = bounds
        self._counts = [0] * len(bounds)
        self._sum = 0.0
        self._created = time.time()
        registry.register(self)

    def observe(self, amount: float) -> None:
        """Count one observation."""
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def describe(self) -> Iterable[Metric]:
        """The family this collector yields (no samples)."""
        return [HistogramMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterable[Metric]:
        """Cumulative buckets, count, sum and creation time now."""
        family = HistogramMetricFamily(self._name, self._documentation)
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip(self._bounds, self._counts, strict=True):
            cumulative += count
            buckets.append((_go_float(bound), float(cumulative)))
        family.add_metric([], buckets, self._sum)
        family.add_sample(f"{self._name}_created", {}, self._created)
        return [family]
