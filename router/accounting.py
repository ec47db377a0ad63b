"""What a routed call leaves behind: the router's metrics, its route record, and for a
cloud call the call record with the provider's tokens at the profile's prices.

A local model call's own record (with its tokens) comes from the agent that served it
(DESIGN 5); the router records only how the call was routed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from router.candidates import Candidate
from router.errors import UpstreamFailed
from router.metrics import RouterMetrics
from router.usage import UsageLog
from schemas.config import ProviderConfig
from schemas.usage import Endpoint, Status, UsageRecord
from services.common.context import current_request_id, new_id


@dataclass(frozen=True)
class Outcome:
    """How one request was routed: what served it (None: nothing could) after what."""

    capability: str
    candidate: Candidate | None
    tried: list[tuple[Candidate, UpstreamFailed]]
    stream: bool
    began: float
    # Served by another candidate because the first-ranked one, expected to wait this
    # long (ms; None: not known), was not within the call's wait budget: the call spilled.
    spilled_from: tuple[Candidate, float | None] | None = None
    endpoint: Endpoint = "chat"


@dataclass
class Accounting:
    metrics: RouterMetrics
    usage: UsageLog
    providers: Mapping[str, ProviderConfig]  # their prices
    clock: Callable[[], float]
    wall_clock: Callable[[], float]

    def attempt_failed(self, candidate: Candidate, failure: UpstreamFailed) -> None:
        self.metrics.failed_attempts.labels(candidate.name, failure.kind).inc()

    def served(self, outcome: Outcome) -> None:
        """A candidate answered (its answer may still be streaming)."""
        assert outcome.candidate is not None
        self.metrics.calls.labels(outcome.capability, outcome.candidate.name, "ok").inc()
        if outcome.tried:
            self.metrics.fallbacks.labels(outcome.capability).inc()
        if outcome.spilled_from is not None:
            first = outcome.spilled_from[0].name
            self.metrics.spills.labels(outcome.capability, first, outcome.candidate.name).inc()

    def unserved(self, outcome: Outcome) -> None:
        """No candidate could serve the call."""
        self.metrics.calls.labels(outcome.capability, "", "error").inc()
        self.record(outcome, status="error", first_at=None)

    def record(
        self,
        outcome: Outcome,
        *,
        status: Status,
        first_at: float | None,
        usage: list[int] | None = None,
    ) -> None:
        """The call has ended (``first_at``: when a stream's first chunk came): its route
        record and durations, and a cloud call's record with its ``usage``."""
        now = self.clock()
        candidate = outcome.candidate
        latency_ms = (now - outcome.began) * 1000
        request_id = current_request_id() or new_id()
        route = UsageRecord(
            record_id=new_id(),
            kind="route",
            request_id=request_id,
            time=datetime.fromtimestamp(self.wall_clock(), UTC),
            agent_id=candidate.agent_id if candidate else None,
            provider=candidate.provider if candidate else "none",
            model=candidate.model if candidate else "",
            capability=outcome.capability,
            latency_ms=latency_ms,
            time_to_first_token_ms=(
                (first_at - outcome.began) * 1000 if first_at is not None else latency_ms
            ),
            stream=outcome.stream,
            status=status,
            fallback_from=outcome.tried[0][0].name if outcome.tried else None,
            reason="spill" if outcome.spilled_from else None,
            spill_wait_ms=outcome.spilled_from[1] if outcome.spilled_from else None,
            endpoint=outcome.endpoint,
        )
        self.usage.add(route)
        if candidate is None:
            return
        labels = (outcome.capability, candidate.name)
        self.metrics.duration.labels(*labels).observe(latency_ms / 1000)
        if outcome.stream and first_at is not None:
            self.metrics.time_to_first_token.labels(*labels).observe(first_at - outcome.began)
        if not candidate.is_agent and usage is not None:  # an agent reports its own calls
            self._cloud_call(route, candidate.provider, usage)

    def _cloud_call(self, route: UsageRecord, name: str, usage: list[int]) -> None:
        """A cloud call's record, made from its route's: nobody else reports it."""
        provider = self.providers[name]
        prompt, completion = usage
        cost = (
            prompt / 1000 * provider.price_per_1k_input
            + completion / 1000 * provider.price_per_1k_output
        )
        self.metrics.tokens.labels(name, "input").inc(prompt)
        self.metrics.tokens.labels(name, "output").inc(completion)
        self.metrics.cost.labels(name).inc(cost)
        update = {"record_id": new_id(), "kind": "call", "fallback_from": None}
        update |= {"reason": None, "spill_wait_ms": None}
        update |= {"prompt_tokens": prompt, "completion_tokens": completion, "cost": cost}
        self.usage.add(route.model_copy(update=update))
