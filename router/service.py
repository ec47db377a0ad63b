"""The router as its routes see it: which capabilities it serves, where a call would go,
and the chat and embeddings calls forwarded.

Its parts: the candidates ranked (router.candidates), the upstream call to a local agent
or a cloud provider (router.upstream, router.cloud), the walk over the candidates with
its retries and fallbacks (router.forward), and what a call leaves behind
(router.accounting).
"""

from __future__ import annotations

import asyncio
import random as random_module
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.responses import Response

from router.accounting import Accounting
from router.breaker import Breakers
from router.candidates import Candidate, rank, within_budget
from router.directory import Directory
from router.forward import Forwarder, no_candidate
from router.load import Loads, expected_wait_ms
from router.metrics import RouterMetrics
from router.settings import RouterSettings
from router.upstream import Upstream
from router.usage import UsageLog
from schemas.routing import RouteDecision
from services.common.errors import NotFound

CAPABILITY_PREFIX = "capability:"


@dataclass
class Router:
    settings: RouterSettings
    directory: Directory
    breakers: Breakers
    upstream: Upstream
    clock: Callable[[], float]
    metrics: RouterMetrics
    usage: UsageLog
    wall_clock: Callable[[], float]
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    random: Callable[[], float] = random_module.random
    loads: Loads = field(default_factory=Loads)
    forwarder: Forwarder = field(init=False)

    def __post_init__(self) -> None:
        accounting = Accounting(
            self.metrics, self.usage, self.settings.providers, self.clock, self.wall_clock
        )
        self.forwarder = Forwarder(
            candidates=self.candidates,
            waiting=self.waiting,
            breakers=self.breakers,
            loads=self.loads,
            upstream=self.upstream,
            accounting=accounting,
            clock=self.clock,
            max_attempts=self.settings.max_attempts,
            retry_wait_max_seconds=self.settings.retry_wait_max_seconds,
            sleep=self.sleep,
            random=self.random,
        )

    # --- decisions -----------------------------------------------------------------------

    def capabilities(self) -> set[str]:
        """Every capability some agent or keyed provider serves, itself or through one of
        the profile's capability fallbacks."""
        served = set(self.directory.by_capability)
        for provider in self.settings.keyed_providers.values():
            served |= set(provider.models)
        fallbacks = self.settings.capability_fallbacks
        return served | {c for c, others in fallbacks.items() if served.intersection(others)}

    def candidates(
        self, capability: str, prefer_local: bool = True, *, open_circuits: bool = False
    ) -> list[Candidate]:
        """Who may serve ``capability`` now, best first (``open_circuits``: also those
        whose circuit is open). None at all: a 404 when nothing serves the capability (the
        caller asked for the wrong thing), else an empty list (every circuit is open)."""
        ranked = rank(
            capability,
            self.directory.by_capability,
            fallbacks=self.settings.capability_fallbacks,
            providers=self.settings.keyed_providers,
            prefer_local=prefer_local,
            usable=lambda endpoint: open_circuits or self.breakers[endpoint].allows(),
            waiting=self.waiting,
        )
        if not ranked and capability not in (served := self.capabilities()):
            raise NotFound(
                f"no agent or provider serves the capability {capability!r}; "
                f"capabilities served now: {', '.join(sorted(served)) or 'none yet'}",
                code="unknown_capability",
                param="capability",
            )
        return ranked

    def waiting(self, candidate: Candidate) -> tuple[float | None, int]:
        """How long a new call to ``candidate`` would wait (router.load.expected_wait_ms;
        None: unknown), and the router's calls open to it."""
        load = self.loads[candidate.endpoint]
        return expected_wait_ms(candidate, load, self.wall_clock()), load.in_flight

    def wait_budget_ms(self, capability: str, asked_ms: int | None) -> int | None:
        """A call's wait budget: the caller's ``X-Max-Wait-Ms``, else the profile's
        ``max_local_wait_ms`` of the capability; None: no budget (nothing spills)."""
        if asked_ms is not None:
            return asked_ms
        return self.settings.max_local_wait_ms.get(capability)

    def decide(
        self, capability: str, prefer_local: bool = True, asked_wait_ms: int | None = None
    ) -> RouteDecision:
        ranked = self.candidates(capability, prefer_local)
        if not ranked:
            raise no_candidate(capability, [], self.breakers, self.candidates)
        budget = self.wait_budget_ms(capability, asked_wait_ms)
        order, spill = within_budget(ranked, self.waiting, budget)
        best, rest = order[0], order[1:]
        where = "local agent" if best.local else "cloud provider"
        reason = (
            f"{where} {best.name} serves {best.capability}"
            f"{' (a fallback capability)' if best.capability != capability else ''} at "
            f"{best.cost_per_1k_tokens:g}/1k tokens; best of {len(ranked)} candidates"
            f"{' with local first' if prefer_local else ''}"
        )
        if spill is not None and best != spill[0]:
            first, wait = spill
            expects = "a wait not known yet" if wait is None else f"a wait of {wait:g} ms"
            reason += (
                f"; spilled: {first.name} expects {expects}, not within the wait budget "
                f"of {budget} ms"
            )
        fallbacks = [candidate.public() for candidate in rest]
        return RouteDecision(**best.public().model_dump(), fallbacks=fallbacks, reason=reason)

    def capability_of(self, model: str, header: str | None, wanted: str | None = None) -> str:
        """The capability a call asks for: ``capability:<name>``, ``X-Capability``, or the
        capability of the agent serving a concrete model: ``wanted`` when it has it (an
        embeddings call's ``embedding``), else its first."""
        if model.startswith(CAPABILITY_PREFIX):
            return model.removeprefix(CAPABILITY_PREFIX).strip().lower()
        if header:
            return header.strip().lower()
        agent = self.directory.by_model.get(model)
        if agent is not None and agent.capabilities:
            return wanted if wanted in agent.capabilities else agent.capabilities[0]
        raise NotFound(
            f"no agent serves the model {model!r}; ask for a capability with "
            f'"model": "capability:<name>" or the X-Capability header',
            code="model_not_found",
            param="model",
        )

    async def chat(
        self, body: bytes, capability: str, stream: bool, asked_wait_ms: int | None = None
    ) -> Response:
        """Forward an OpenAI chat call to the first candidate that serves it, within the
        call's wait budget when it has one (router.forward)."""
        budget = self.wait_budget_ms(capability, asked_wait_ms)
        return await self.forwarder.forward(body, capability, stream, budget)

    async def embeddings(
        self,
        body: bytes,
        capability: str,
        asked_wait_ms: int | None = None,
        model: str | None = None,
    ) -> Response:
        """Forward an OpenAI embeddings call as a chat call is (its candidates, fallbacks,
        circuits, wait budget and record), to registry agents only; ``model``: to those
        serving it only, as vectors of different models do not compare."""
        budget = self.wait_budget_ms(capability, asked_wait_ms)
        return await self.forwarder.forward(
            body, capability, False, budget, "embeddings", model=model
        )
