"""Routing decisions of the router."""

from __future__ import annotations

from pydantic import BaseModel, Field

from schemas.agents import Capability, Strict


class RouteRequest(Strict):
    capability: Capability
    prefer_local: bool = True


class RouteCandidate(BaseModel):
    provider: str = Field(description='"local" for a registry agent, else the provider name.')
    model: str
    endpoint: str
    agent_id: str | None = None
    cost_per_1k_tokens: float


class RouteDecision(RouteCandidate):
    """Where a call for a capability would go, and what it would fall back to."""

    fallbacks: list[RouteCandidate]
    reason: str
