"""Per-endpoint circuit breakers: closed, open for a cool-down, then one half-open trial.

A circuit opens after ``failures`` consecutive failures, or when at least half a window
of recent calls has failed at ``failure_rate`` or more, or at once on a refused
connection: nothing listens there (a killed wrapper), and DESIGN 7 wants a dead wrapper
out of routing within a second of its first failed call. While open, the endpoint is not a
candidate; after the cool-down one call may try it (half-open): success closes the
circuit, failure opens it again for another cool-down.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

State = Literal["closed", "open", "half_open"]


@dataclass
class Breaker:
    failures: int
    failure_rate: float
    window: int
    cooldown: float
    clock: Callable[[], float]
    state: State = "closed"
    consecutive: int = 0
    opened_at: float = 0.0
    trial_running: bool = False
    recent: deque[bool] = field(init=False)

    def __post_init__(self) -> None:
        self.recent = deque(maxlen=self.window)

    def allows(self) -> bool:
        """Whether the endpoint is a candidate now (a decision; nothing is claimed)."""
        if self.state == "open" and self.clock() - self.opened_at >= self.cooldown:
            self.state = "half_open"
            self.trial_running = False
        return self.state == "closed" or (self.state == "half_open" and not self.trial_running)

    def begin(self) -> bool:
        """Claim a call to the endpoint; half-open, only one trial call gets through."""
        if not self.allows():
            return False
        if self.state == "half_open":
            self.trial_running = True
        return True

    def retry_after(self) -> float:
        """Seconds until the circuit lets a call through again."""
        if self.state != "open":
            return 0.0
        return max(0.0, self.cooldown - (self.clock() - self.opened_at))

    def succeeded(self) -> None:
        self.recent.append(True)
        self.consecutive = 0
        self.state = "closed"
        self.trial_running = False

    def released(self) -> None:
        """A claimed call ended saying nothing about the endpoint (a 429, one request's
        own 500, a caller that left): a half-open trial may be made again."""
        self.trial_running = False

    def failed(self, *, refused: bool = False) -> None:
        self.recent.append(False)
        self.consecutive += 1
        failed_share = self.recent.count(False) / len(self.recent)
        enough = len(self.recent) >= self.window // 2
        if (
            refused
            or self.state == "half_open"
            or self.consecutive >= self.failures
            or (enough and failed_share >= self.failure_rate)
        ):
            self.state = "open"
            self.opened_at = self.clock()
            self.trial_running = False
            self.recent.clear()


class Breakers:
    """One breaker per endpoint, made on first use."""

    def __init__(self, make: Callable[[], Breaker]) -> None:
        self._make = make
        self._by_endpoint: dict[str, Breaker] = {}

    def __getitem__(self, endpoint: str) -> Breaker:
        breaker = self._by_endpoint.get(endpoint)
        if breaker is None:
            breaker = self._by_endpoint[endpoint] = self._make()
        return breaker

    def states(self) -> dict[str, State]:
        return {endpoint: breaker.state for endpoint, breaker in self._by_endpoint.items()}
