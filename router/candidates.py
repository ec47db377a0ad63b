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
    capability: str  # the capability it serves the call with
    fallback: bool  # served through a capability fallback of the profile
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


def agent_candidate(agent: AgentRecord, capability: str, fallback: bool) -> Candidate:
    return Candidate(
        provider=agent.locality,  # LOCAL, or "cloud" for an agent in front of a cloud
        model=str(agent.metadata.get("model") or agent.agent_id),
        endpoint=agent.endpoint,
        agent_id=agent.agent_id,
        cost_per_1k_tokens=agent.cost_per_1k_tokens,
        capability=capability,
        fallback=fallback,
        reported_load=agent.load,
        reported_at=agent.load_reported_at.timestamp() if agent.load_reported_at else None,
    )


def provider_candidate(
    name: str, provider: ProviderConfig, capability: str, fallback: bool
) -> Candidate:
    return Candidate(
        provider=name,
        model=provider.models[capability],
        endpoint=provider.base_url.rstrip("/"),
        agent_id=None,
        cost_per_1k_tokens=(provider.price_per_1k_input + provider.price_per_1k_output) / 2,
        capability=capability,
        fallback=fallback,
    )


def by_capability(agents: Iterable[AgentRecord]) -> dict[str, list[AgentRecord]]:
    """Agents indexed by capability: built once per registry read, so that ranking reads
    only the agents with the capability asked for, however many the registry has."""
    index: dict[str, list[AgentRecord]] = {}
    for agent in agents:
        for capability in agent.capabilities:
            index.setdefault(capability, []).append(agent)
    return index


def rank(
    capability: str,
    agents: Mapping[str, Sequence[AgentRecord]],
    *,
    fallbacks: Mapping[str, list[str]],
    providers: Mapping[str, ProviderConfig],
    prefer_local: bool,
    usable: Callable[[str], bool],
    expected_wait_ms: Callable[[Candidate], float | None],
) -> list[Candidate]:
    """Every candidate for ``capability``, best first.

    ``agents`` is :func:`by_capability`'s index. Candidates: passing agents with the
    capability, then agents with one of its fallback
    capabilities, then keyed cloud providers with either. Order: local first when
    ``prefer_local``, the capability itself before a fallback, then cost, then the
    lowest expected wait (router.load.expected_wait_ms; unknown after known), then the
    name. Endpoints whose circuit is open (``usable`` says no) are left out.
    """
    found: dict[str, Candidate] = {}  # by endpoint: one agent, once, at its best
    for index, wanted in enumerate([capability, *fallbacks.get(capability, [])]):
        fallback = index > 0
        for agent in agents.get(wanted, ()):
            if agent.status == "passing":
                found.setdefault(agent.endpoint, agent_candidate(agent, wanted, fallback))
        for name, provider in providers.items():
            if wanted in provider.models:
                candidate = provider_candidate(name, provider, wanted, fallback)
                found.setdefault(f"{name}:{candidate.model}", candidate)

    def order(candidate: Candidate) -> tuple:
        wait = expected_wait_ms(candidate)
        return (
            prefer_local and not candidate.local,
            candidate.fallback,
            candidate.cost_per_1k_tokens,
            wait is None,
            wait or 0.0,
            candidate.name,
        )

    return sorted((c for c in found.values() if usable(c.endpoint)), key=order)


def within_budget(
    ranked: list[Candidate],
    expected_wait_ms: Callable[[Candidate], float | None],
    budget_ms: float | None,
) -> tuple[list[Candidate], float | None]:
    """The order a call with a wait budget tries ``ranked`` in: first the candidates whose
    expected wait is within ``budget_ms`` (unknown counts as within), in rank order, then
    the others by expected wait; a budget never leaves a candidate out. Also the expected
    wait of the first-ranked candidate when it is over the budget (a call served by
    another candidate then *spilled*), else None. No budget: ``ranked`` as it is."""
    if budget_ms is None or not ranked:
        return ranked, None
    within: list[Candidate] = []
    over: list[tuple[float, int, Candidate]] = []
    for index, candidate in enumerate(ranked):
        wait = expected_wait_ms(candidate)
        if wait is None or wait <= budget_ms:
            within.append(candidate)
        else:
            over.append((wait, index, candidate))
    if not over:
        return ranked, None
    first_wait = over[0][0] if over[0][1] == 0 else None
    over.sort(key=lambda waiting: waiting[:2])
    return within + [candidate for *_, candidate in over], first_wait
