"""The per-call metrics (broker.metrics' Loop* types) expose what prometheus_client's would."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from broker.metrics import LoopCounter, LoopGauge, LoopHistogram, Metrics

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _text(registry: CollectorRegistry) -> str:
    """The exposition with the creation times (seconds since the epoch) masked."""
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 <t>", generate_latest(registry).decode())


AMOUNTS = st.one_of(
    st.sampled_from([0.0, *BUCKETS, 61.0, 1e9]),
    st.floats(min_value=0, max_value=100, allow_nan=False),
)


@settings(max_examples=200)
@given(st.lists(AMOUNTS, max_size=30))
def test_a_histogram_exposes_the_samples_of_prometheus_clients(amounts: list[float]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LoopHistogram("x_seconds", "Some latency", BUCKETS, registry=ours)
    reference = Histogram("x_seconds", "Some latency", buckets=BUCKETS, registry=theirs)
    for amount in amounts:
        mine.observe(amount)
        reference.observe(amount)
    assert _text(ours) == _text(theirs)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "-"]), st.sampled_from(["allow", "no"]), AMOUNTS),
        max_size=30,
    )
)
def test_a_counter_and_a_gauge_expose_the_samples_of_prometheus_clients(
    updates: list[tuple[str, str, float]],
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = LoopCounter("x_calls", "Calls", ["client", "outcome"], registry=ours)
    gauge = LoopGauge("x_left", "Left", ["client"], registry=ours)
    reference_counter = Counter("x_calls", "Calls", ["client", "outcome"], registry=theirs)
    reference_gauge = Gauge("x_left", "Left", ["client"], registry=theirs)
    for client, outcome, amount in updates:
        counter.labels(client=client, outcome=outcome).inc(amount)
        reference_counter.labels(client=client, outcome=outcome).inc(amount)
        gauge.labels(client=client).set(amount)
        reference_gauge.labels(client=client).set(amount)
    assert _text(ours) == _text(theirs)


def test_wrong_labels_a_negative_increment_and_unordered_buckets_are_refused() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("x_calls", "Calls", ["client"], registry=registry)
    with pytest.raises(ValueError, match="takes the labels client"):
        counter.labels(outcome="allow")
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels(client="a").inc(-1)
    with pytest.raises(ValueError, match="increasing order"):
        LoopHistogram("y_seconds", "Y", (1, 0.5), registry=registry)


def test_refusals_are_summed_over_clients_from_the_per_call_counter() -> None:
    metrics = Metrics()
    metrics.count("a", "allow")
    metrics.count("a", "scope_denied")
    metrics.count("b", "scope_denied")
    metrics.count("-", "invalid_token")
    text = generate_latest(metrics.registry).decode()
    assert 'broker_proxy_refusals_total{reason="scope_denied"} 2.0' in text
    assert 'broker_proxy_refusals_total{reason="invalid_token"} 1.0' in text
    assert 'broker_proxy_requests_total{client="a",outcome="allow"} 1.0' in text
    assert 'reason="allow"' not in text
