"""Who can serve a capability, best first: the routing decision without the call."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from schemas.agents import AgentLoad, AgentRecord
from schemas.config import ProviderConfig
from schemas.routing import RouteCandidate

LOCAL = "local"


@dataclass(frozen=True)
class Candidate:
    provider: str  # a registry agent's locality (LOCAL or "cloud"), or a provider's name
    model: str
    endpoint: str  # the base URL: an agent's endpoint, or a provider's base_url
    agent_id: str | None
    cost_per_1k_tokens: float
    # The capability it serves a call with: the one asked for, or a fallback of it.
    capability: str
    # An agent's load as the registry last had it (None: unknown, or stale).
    reported_load: AgentLoad | None = field(default=None, compare=False)
    reported_at: float | None = field(default=None, compare=False)  # epoch s, registry clock

    @property
    def local(self) -> bool:
        return self.provider == LOCAL

    @property
    def is_agent(self) -> bool:
        """A registry agent (local, or a wrapper in front of a cloud): called at its
        endpoint, and it reports its own calls; else a keyed provider the router calls."""
        return self.agent_id is not None

    @property
    def name(self) -> str:
        """Who it is in headers, metrics and records: the agent, or the provider."""
        return self.agent_id or self.provider

    def public(self) -> RouteCandidate:
        return RouteCandidate(
            provider=self.provider,
            model=self.model,
            endpoint=self.endpoint,
            agent_id=self.agent_id,
            cost_per_1k_tokens=self.cost_per_1k_tokens,
        )


def agent_candidate(agent: AgentRecord, capability: str) -> Candidate:
    return Candidate(
        provider=agent.locality,  # LOCAL, or "cloud" for an agent in front of a cloud
        model=str(agent.metadata.get("model") or agent.agent_id),
        endpoint=agent.endpoint,
        agent_id=agent.agent_id,
        cost_per_1k_tokens=agent.cost_per_1k_tokens,
        capability=capability,
        reported_load=agent.load,
        reported_at=agent.load_reported_at.timestamp() if agent.load_reported_at else None,
    )


def provider_candidate(name: str, provider: ProviderConfig, capability: str) -> Candidate:
    return Candidate(
        provider=name,
        model=provider.models[capability],
        endpoint=provider.base_url.rstrip("/"),
        agent_id=None,
        cost_per_1k_tokens=(provider.price_per_1k_input + provider.price_per_1k_output) / 2,
        capability=capability,
    )


def by_capability(agents: Iterable[AgentRecord]) -> dict[str, list[Candidate]]:
    """The passing agents' candidates by the capability they serve: made once per registry
    read, so that ranking reads only the agents with the capability asked for, however
    many the registry has, and makes none of them per call."""
    index: dict[str, list[Candidate]] = {}
    for agent in agents:
        if agent.status == "passing":
            for capability in agent.capabilities:
                index.setdefault(capability, []).append(agent_candidate(agent, capability))
    return index


# A candidate's expected wait (ms; None: unknown, router.load.expected_wait_ms) and the
# router's own calls open to it: what ranking reads of its load.
Waiting = Callable[[Candidate], tuple[float | None, int]]


def rank(
    capability: str,
    agents: Mapping[str, Sequence[Candidate]],
    *,
    fallbacks: Mapping[str, list[str]],
    providers: Mapping[str, ProviderConfig],
    prefer_local: bool,
    usable: Callable[[str], bool],
    waiting: Waiting,
) -> list[Candidate]:
    """Every candidate for ``capability``, best first.

    ``agents`` is :func:`by_capability`'s index. Candidates: passing agents with the
    capability, then agents with one of its fallback
    capabilities, then keyed cloud providers with either. Order: local first when
    ``prefer_local``, the capability itself before a fallback, then cost, then the
    lowest expected wait (unknown after known), then the fewest of the router's calls
    open (so that equal replicas both serve), then the name. Endpoints whose circuit is
    open (``usable`` says no) are left out.
    """
    found: dict[str, Candidate] = {}  # by endpoint: one agent, once, at its best
    for wanted in (capability, *fallbacks.get(capability, ())):
        for candidate in agents.get(wanted, ()):
            found.setdefault(candidate.endpoint, candidate)
        for name, provider in providers.items():
            if wanted in provider.models:
                candidate = provider_candidate(name, provider, wanted)
                found.setdefault(f"{name}:{candidate.model}", candidate)

    def order(candidate: Candidate) -> tuple:
        wait, in_flight = waiting(candidate)
        return (
            prefer_local and not candidate.local,
            candidate.capability != capability,  # a fallback
            candidate.cost_per_1k_tokens,
            wait is None,
            wait or 0.0,
            in_flight,
            candidate.name,
        )

    return sorted((c for c in found.values() if usable(c.endpoint)), key=order)


def within_budget(
    ranked: list[Candidate], waiting: Waiting, budget_ms: float | None
) -> tuple[list[Candidate], tuple[Candidate, float | None] | None]:
    """The order a call with a wait budget tries ``ranked`` in, and whom it spills from.

    Three groups, each tried before the next (a budget never leaves a candidate out):
    those expected to wait within ``budget_ms``, in rank order (an idle agent is, known
    or not: a slot is free); those whose wait is unknown (the router's calls fill their
    slots and nothing says yet how long a call takes), the fewest of the router's calls
    first, so that a burst spreads over them rather than queueing behind the first call
    at one of them; those over the budget, the shortest wait first. The spill: the
    first-ranked candidate and its wait (None: unknown) when it is not within the budget
    (a call another candidate serves then spilled), else None. No budget: ``ranked`` as
    it is, and nothing spills."""
    if budget_ms is None or not ranked:
        return ranked, None
    within: list[Candidate] = []
    others: list[tuple[bool, float, int, Candidate]] = []  # unknown first, then over
    spill: tuple[Candidate, float | None] | None = None
    for index, candidate in enumerate(ranked):
        wait, in_flight = waiting(candidate)
        if wait is not None and wait <= budget_ms:
            within.append(candidate)
            continue
        if index == 0:
            spill = (candidate, wait)
        others.append((wait is not None, in_flight if wait is None else wait, index, candidate))
    if not others:
        return ranked, None
    others.sort(key=lambda other: other[:3])
    return within + [candidate for *_, candidate in others], spill
