"""The router's Prometheus metrics: routing outcomes, fallbacks, spills, failed attempts and the
state of every circuit (read from the breakers at scrape time)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.breaker import Breakers
from services.common.metrics import LLM_DURATION_BUCKETS, TTFT_BUCKETS

CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, breakers: Breakers) -> None:
        self.calls = Counter(
            "router_calls_total",
            "Routed chat calls by capability, the agent or provider that served, and outcome.",
            ["capability", "served_by", "status"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "router_fallbacks_total",
            "Calls served by a later candidate after an earlier one failed.",
            ["capability"],
            registry=registry,
        )
        self.spills = Counter(
            "router_spills_total",
            "Calls served by another candidate because the first-ranked one's expected wait "
            "was over the call's wait budget (from: that one; to: who served).",
            ["capability", "from", "to"],
            registry=registry,
        )
        self.failed_attempts = Counter(
            "router_failed_attempts_total",
            "Attempts a candidate failed, by candidate and kind.",
            ["candidate", "kind"],
            registry=registry,
        )
        self.duration = Histogram(
            "router_request_duration_seconds",
            "Routed calls, from the caller's request to the end of the answer.",
            ["capability", "served_by"],
            buckets=LLM_DURATION_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "router_time_to_first_token_seconds",
            "Routed streams, from the caller's request to the first chunk.",
            ["capability", "served_by"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.active = Gauge(
            "router_active_requests", "Calls open to upstreams now.", registry=registry
        )
        self.tokens = Counter(
            "router_cloud_tokens_total",
            "Tokens of cloud calls (local calls count theirs in each wrapper's metrics).",
            ["provider", "direction"],
            registry=registry,
        )
        self.cost = Counter(
            "router_cloud_cost_total",
            "What cloud calls cost, at the profile's prices.",
            ["provider"],
            registry=registry,
        )
        registry.register(_CircuitCollector(breakers))


class _CircuitCollector(Collector):
    def __init__(self, breakers: Breakers) -> None:
        self.breakers = breakers

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "router_circuit_state",
            "Circuit of each upstream endpoint: 0 closed, 1 half-open, 2 open.",
            labels=["endpoint"],
        )
        for endpoint, state in sorted(self.breakers.states().items()):
            gauge.add_metric([endpoint], CIRCUIT_STATES[state])
        yield gauge
