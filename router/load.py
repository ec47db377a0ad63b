"""What the router measures of each upstream endpoint: its latency and the calls open to it.

Ranking reads it (router.candidates) and the walk over the candidates writes it
(router.forward).
"""

from __future__ import annotations

from dataclasses import dataclass

LATENCY_WEIGHT = 0.2  # of the newest call in an endpoint's moving latency average


@dataclass
class Load:
    """One endpoint: latency (moving average of whole calls), calls open now."""

    latency_ms: float | None = None
    in_flight: int = 0

    def observe(self, milliseconds: float) -> None:
        if self.latency_ms is None:
            self.latency_ms = milliseconds
        else:
            self.latency_ms += LATENCY_WEIGHT * (milliseconds - self.latency_ms)


class Loads(dict[str, Load]):
    """One load per endpoint, made on first use (a dict: the hot path reads it per call)."""

    def __missing__(self, endpoint: str) -> Load:
        load = self[endpoint] = Load()
        return load

    def in_flight(self) -> int:
        """Calls open to every upstream now (``router_active_requests``)."""
        return sum(load.in_flight for load in self.values())
