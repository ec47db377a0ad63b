"""The registry's own metrics, beside the shared HTTP ones."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from registry.store import AgentStore


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry, store: AgentStore) -> None:
        self.registrations = Counter(
            "registry_registrations_total", "Accepted registrations.", registry=registry
        )
        heartbeats = Counter(
            "registry_heartbeats_total",
            "Heartbeats by result (ok, unknown_agent).",
            ["result"],
            registry=registry,
        )
        self.heartbeats_ok = heartbeats.labels("ok")
        self.heartbeats_unknown = heartbeats.labels("unknown_agent")
        self.deregistrations = Counter(
            "registry_deregistrations_total", "Agents deregistered by request.", registry=registry
        )
        self.reaped = Counter(
            "registry_reaped_total", "Agents removed after their grace expired.", registry=registry
        )
        registry.register(_AgentsByStatus(store))


class _AgentsByStatus(Collector):
    """Counted at scrape time: status is a function of the clock, not an event."""

    def __init__(self, store: AgentStore) -> None:
        self.store = store

    def collect(self):
        family = GaugeMetricFamily(
            "registry_agents", "Registered agents by status.", labels=["status"]
        )
        for status, count in self.store.count_by_status().items():
            family.add_metric([status], count)
        yield family

    def describe(self):
        yield GaugeMetricFamily(
            "registry_agents", "Registered agents by status.", labels=["status"]
        )
