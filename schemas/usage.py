"""Usage records: one per model call, the unit of cost accounting."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from schemas.agents import Strict


class UsageRecord(Strict):
    request_id: str = Field(min_length=1, max_length=128)
    time: datetime
    agent_id: str | None = Field(default=None, max_length=128)
    provider: str = Field(max_length=64, description='"local" or a cloud provider name.')
    model: str = Field(max_length=200)
    capability: str | None = Field(default=None, max_length=64)
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    latency_ms: float = Field(ge=0)
    time_to_first_token_ms: float | None = Field(default=None, ge=0)
    stream: bool = False
    status: Literal["ok", "error"] = "ok"
    fallback_from: str | None = Field(default=None, max_length=128)
    cost: float = Field(default=0.0, ge=0)


class UsageBatch(Strict):
    """What a wrapper posts to ``POST /usage``."""

    records: list[UsageRecord] = Field(min_length=1, max_length=1_000)
