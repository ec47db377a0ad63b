"""Usage records, the unit of cost accounting, and the usage API's answers (DESIGN 5).

Two kinds of record share one table and join on the request id:

- a **call** is one model call, reported by whoever made it: a wrapper for its local model
  (batched to ``POST /usage``), the router for a cloud provider. Tokens, cost and
  local-versus-cloud come from calls.
- a **route** is the router's outcome for one request: which candidate served, after
  which fallbacks (or whether it spilled over a wait budget), with the caller's end-to-end
  latency and time to first token.

Either kind says which endpoint the call was (``endpoint``): a chat or generate call, or
an embedding (input tokens only), priced apart at the reference embedding price.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator

from schemas.agents import Strict

MAX_BATCH = 1_000
# "cancelled": the caller left mid-stream. Its tokens count; it is no error of the model.
Status = Literal["ok", "error", "cancelled"]
# What was called: a chat or generate call (either API), or embeddings (either API).
Endpoint = Literal["chat", "embeddings"]
# Upper bounds (ms) of the per-agent latency histogram's buckets, as Prometheus' ``le``; one
# more bucket counts the calls slower than the last. Fixed, so that the histograms of
# different agents and windows compare bar by bar.
LATENCY_BUCKETS_MS = (50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0)


# Bounds no real call reaches. Within them, a record can neither overflow the usage API's
# sums (64-bit integers in SQLite) nor make them non-finite (issue 13).
MAX_TOKENS_PER_CALL = 1_000_000_000
MAX_COST_PER_CALL = 1_000_000.0
MAX_LATENCY_MS = 86_400_000.0  # a day
# How far ahead of the router's clock a record's time may be: the reporter's clock skew.
MAX_CLOCK_SKEW_SECONDS = 300.0

TokenCount = Annotated[int, Field(ge=0, le=MAX_TOKENS_PER_CALL)]


class UsageRecord(Strict):
    record_id: str = Field(
        min_length=1, max_length=64, description="Unique per record: a resent batch is ignored."
    )
    kind: Literal["call", "route"] = "call"
    request_id: str = Field(min_length=1, max_length=128)
    # Lax: a strict datetime refuses the ISO string that JSON carries it as.
    time: datetime = Field(strict=False)
    agent_id: str | None = Field(default=None, max_length=128)
    provider: str = Field(max_length=64, description='"local" or a cloud provider name.')
    model: str = Field(max_length=200)
    capability: str | None = Field(default=None, max_length=64)
    prompt_tokens: TokenCount = 0
    completion_tokens: TokenCount = 0
    latency_ms: float = Field(ge=0, le=MAX_LATENCY_MS, allow_inf_nan=False)
    time_to_first_token_ms: float | None = Field(
        default=None, ge=0, le=MAX_LATENCY_MS, allow_inf_nan=False
    )
    stream: bool = False
    status: Status = "ok"
    fallback_from: str | None = Field(default=None, max_length=128)
    reason: Literal["spill"] | None = Field(
        default=None,
        description='A route\'s: "spill" when another candidate served because the first-'
        "ranked one's expected wait was over the call's wait budget; else null.",
    )
    spill_wait_ms: float | None = Field(
        default=None,
        ge=0,
        le=MAX_LATENCY_MS,
        allow_inf_nan=False,
        description="Of a spill: the first-ranked candidate's expected wait that caused it; "
        "null when that wait was not known (its slots full of the router's calls).",
    )
    cost: float = Field(default=0.0, ge=0, le=MAX_COST_PER_CALL, allow_inf_nan=False)
    endpoint: Endpoint = Field(
        default="chat",
        description='"embeddings" for an embedding call (its tokens are all input), else '
        '"chat" (chat and generate).',
    )


# How many of a batch's refusals a daemon logs: a batch may hold a thousand bad records.
REFUSALS_LOGGED = 3


class Refusal(BaseModel):
    """Why one record of a batch was not stored; the rest of the batch is."""

    index: int = Field(description="The record's position in the batch.")
    record_id: str | None = Field(description="Its record_id, when it had a readable one.")
    reason: str


def _refused_one_by_one(value: object, handler: ValidatorFunctionWrapHandler) -> object:
    # A bad record must not cost the batch its good ones: it becomes a Refusal that
    # the router answers with, and a reporter never resends (issue 13).
    try:
        return handler(value)
    except ValidationError as exc:
        reason = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'record'}: {error['msg']}"
            for error in exc.errors(include_url=False)
        )
        record_id = value.get("record_id") if isinstance(value, dict) else None
        record_id = record_id[:64] if isinstance(record_id, str) else None
        return Refusal(index=-1, record_id=record_id, reason=reason[:500])


class UsageBatch(Strict):
    """What a wrapper posts to ``POST /usage``. Each record is validated on its own: the
    published schema is ``UsageRecord``'s, and one that fails it is refused alone."""

    records: list[Annotated[UsageRecord, WrapValidator(_refused_one_by_one)]] = Field(
        min_length=1, max_length=MAX_BATCH
    )

    def split(
        self, check: Callable[[UsageRecord], str | None]
    ) -> tuple[list[UsageRecord], list[Refusal]]:
        """The records to store, and a refusal for each of the others: those that failed
        validation and those ``check`` gives a reason against."""
        valid: list[UsageRecord] = []
        refused: list[Refusal] = []
        for index, record in enumerate(self.records):
            if isinstance(record, UsageRecord) and (reason := check(record)):
                record = Refusal(index=index, record_id=record.record_id, reason=reason)
            if isinstance(record, Refusal):
                refused.append(record.model_copy(update={"index": index}))
            else:
                valid.append(record)
        return valid, refused


class UsageAccepted(BaseModel):
    accepted: int = Field(description="Records stored now; resent ones are not counted.")
    refused: list[Refusal] = Field(
        description="Records not stored, each with the reason; resending them cannot help."
    )


class RequestUsage(BaseModel):
    request_id: str
    records: list[UsageRecord]


class UsageSummary(BaseModel):
    window_seconds: float
    calls: int
    local_calls: int
    cloud_calls: int
    local_share: float | None
    prompt_tokens: int
    completion_tokens: int
    local_tokens: int
    cloud_tokens: int
    cost: float
    would_have_cost: float = Field(
        description="All tokens at the reference cloud prices: chat tokens at the chat "
        "price, embedding tokens at the embedding price."
    )
    saved: float
    errors: int
    error_rate: float | None
    routed: int = Field(description="Requests the router forwarded.")
    fallbacks: int
    fallback_rate: float | None
    spills: int = Field(
        description="Routed requests that spilled: served by another candidate because the "
        "first-ranked one's expected wait was over the call's wait budget."
    )
    embedding_calls: int = Field(default=0, description="Of ``calls``, embedding calls.")
    embedding_tokens: int = Field(default=0, description="Their (input) tokens.")
    embedding_would_have_cost: float = Field(
        default=0.0, description="Of ``would_have_cost``: the embedding tokens' share."
    )


class UsageBucket(BaseModel):
    start: datetime
    calls: int
    local_tokens: int
    cloud_tokens: int
    cost: float
    errors: int
    fallbacks: int


class UsageTimeseries(BaseModel):
    window_seconds: float
    bucket_seconds: float
    buckets: list[UsageBucket]


class AgentUsage(BaseModel):
    agent_id: str
    provider: str
    calls: int
    prompt_tokens: int
    completion_tokens: int
    tokens_per_second: float | None = Field(
        description="Completion tokens a second of its chat calls (embeddings make none)."
    )
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    latency_histogram: list[int] = Field(
        description="Calls that succeeded (those of the percentiles) per latency bucket: "
        "at most each bound of ``latency_buckets_ms``, then slower than the last."
    )
    errors: int
    embedding_calls: int = Field(default=0, description="Of ``calls``, embedding calls.")
    embedding_tokens: int = Field(default=0, description="Their (input) tokens.")


class UsageByAgent(BaseModel):
    window_seconds: float
    latency_buckets_ms: list[float] = Field(
        default=list(LATENCY_BUCKETS_MS),
        description="Upper bounds of the latency histograms' buckets (all but the last).",
    )
    agents: list[AgentUsage]
