"""What the router measures of each upstream endpoint: its latency and the calls open to it,
and a candidate's expected wait made of those and the load its agent reports.

Ranking reads it (router.candidates) and the walk over the candidates writes it
(router.forward).
"""

from __future__ import annotations

from dataclasses import dataclass

from router.candidates import Candidate
from schemas import agents

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


def expected_wait_ms(candidate: Candidate, load: Load, now: float) -> float | None:
    """How long a new call to ``candidate`` would wait for a slot (ms); None: unknown.

    For a registry agent, two estimates::

        own      = floor(load.in_flight / parallel) x service_ms      (agents.expected_wait_ms:
                   0 while a slot is free; None when busy and service_ms is unknown)
        reported = the agent's last reported expected_wait_ms, less the time since it
                   was reported (``now``, wall clock): its queue has drained meanwhile
        wait     = max(own, reported); own when nothing is reported; None when own is None

    ``load.in_flight`` is the router's own calls open to the agent; ``parallel`` the
    agent's reported slots (unreported: 1, the embedded host's); ``service_ms`` the time
    a call holds a slot as the agent reports it, else the router's own latency average
    of whole calls. The report counts every caller's calls, the router's among them: the
    larger of the two, not the sum, so that the router's calls are not counted twice; the
    router's own count is the fresher of the two (a report is up to a heartbeat old).
    When the router's calls fill the agent's slots and nothing says how long a call takes,
    the wait is unknown whatever the report says: a report of an idle agent from before a
    burst would otherwise call it free while the burst queues there.
    A keyed cloud provider: 0 (no queue the router knows of). Arithmetic only: it runs
    for every candidate of every call.
    """
    if not candidate.is_agent:
        return 0.0
    reported = candidate.reported_load
    if reported is None:
        return agents.expected_wait_ms(load.in_flight, 1, load.latency_ms)
    service_ms = reported.service_ms_per_call
    own = agents.expected_wait_ms(
        load.in_flight,
        reported.parallel or 1,
        service_ms if service_ms is not None else load.latency_ms,
    )
    theirs = reported.expected_wait_ms
    if own is None or theirs is None:
        return own
    if candidate.reported_at is not None:
        # A clock behind the registry's gives a negative age: no discount, the safe side.
        theirs -= max(0.0, now - candidate.reported_at) * 1000
    return max(own, theirs)
