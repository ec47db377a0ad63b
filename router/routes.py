"""The router's endpoints (DESIGN 3): decisions, the OpenAI-compatible proxy, status."""

from __future__ import annotations

import logging
import re
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from router.service import CAPABILITY_PREFIX, Router
from schemas import openai
from schemas.errors import ErrorEnvelope
from schemas.health import ServiceHealth
from schemas.routing import RouteDecision, RouteRequest
from schemas.usage import (
    MAX_CLOCK_SKEW_SECONDS,
    REFUSALS_LOGGED,
    RequestUsage,
    UsageAccepted,
    UsageBatch,
    UsageByAgent,
    UsageRecord,
    UsageSummary,
    UsageTimeseries,
)
from services.common.auth import check_bearer
from services.common.errors import NotFound, ValidationFailed
from services.common.openapi import SSE, errors, streaming
from services.common.streaming import json_response
from services.common.strict_json import StrictJSONRoute

log = logging.getLogger(__name__)

router = APIRouter(route_class=StrictJSONRoute)
# The calls the rate limit applies to (router.app); 404 names the capabilities that exist.
ROUTED = errors(404, 429, 503)
EMBEDDING = "embedding"  # the capability of an agent that embeds
_STREAMED = "JSON, or the candidate's SSE events passed through when `stream` is true; a "
_STREAMED += "failure after the first event is an event of the error envelope."


MAX_WAIT_HEADER = "X-Max-Wait-Ms"
_MAX_WAIT_PATTERN = re.compile(r"[0-9]{1,8}")  # at most a day: 86,400,000 ms
MAX_WAIT_MS = 86_400_000
# Read by hand (the chat route is served lean, without FastAPI's parameters); declared here.
WAIT_BUDGET = {
    "parameters": [
        {
            "name": MAX_WAIT_HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_WAIT_MS},
            "description": "A wait budget (ms): candidates expected to wait longer come "
            "after the others (the call may spill past local-first); else the profile's "
            "router.max_local_wait_ms of the capability.",
        }
    ]
}


def router_of(request: Request) -> Router:
    return request.app.state.router


@router.post(
    "/route",
    response_model=RouteDecision,
    responses=ROUTED,
    summary="Where a call would go",
    openapi_extra=WAIT_BUDGET,
)
async def route(body: RouteRequest, request: Request) -> Response:
    asked_wait_ms = max_wait_ms(request)
    decision = router_of(request).decide(body.capability, body.prefer_local, asked_wait_ms)
    return json_response(decision)


@router.post(
    "/v1/chat/completions",
    response_model=openai.ChatCompletion,
    responses=ROUTED
    | streaming(SSE, openai.ChatCompletionChunk, ErrorEnvelope, description=_STREAMED),
    summary="OpenAI chat, routed by capability with fallback",
    openapi_extra=WAIT_BUDGET,
)
@router.post("/chat/completions", response_model=openai.ChatCompletion, include_in_schema=False)
async def chat_completions(body: openai.ChatCompletionRequest, request: Request) -> Response:
    routing = router_of(request)
    capability = routing.capability_of(body.model, request.headers.get("X-Capability"))
    asked_wait_ms = max_wait_ms(request)
    return await routing.chat(await request.body(), capability, body.stream, asked_wait_ms)


@router.post(
    "/v1/embeddings",
    response_model=openai.CreateEmbeddingResponse,
    responses=ROUTED,
    summary="OpenAI embeddings, routed by capability (embedding) with fallback",
    openapi_extra=WAIT_BUDGET,
)
async def embeddings(body: openai.EmbeddingRequest, request: Request) -> Response:
    """As chat completions are routed: ``model`` ``capability:embedding`` (or another
    capability, or ``X-Capability``), or a model an agent serves, then by agents serving
    that model only (another model's vectors do not compare); registry agents only."""
    routing = router_of(request)
    header = request.headers.get("X-Capability")
    capability = routing.capability_of(body.model, header, wanted=EMBEDDING)
    named = None if body.model.startswith(CAPABILITY_PREFIX) or header else body.model
    body_bytes = await request.body()
    return await routing.embeddings(body_bytes, capability, max_wait_ms(request), model=named)


def max_wait_ms(request: Request) -> int | None:
    """The caller's wait budget (``X-Max-Wait-Ms``: a positive integer of milliseconds, at
    most a day); None when it sent none."""
    value = request.headers.get(MAX_WAIT_HEADER)
    if value is None:
        return None
    value = value.strip()
    if _MAX_WAIT_PATTERN.fullmatch(value) and 0 < int(value) <= MAX_WAIT_MS:
        return int(value)
    raise ValidationFailed(
        f"{MAX_WAIT_HEADER} must be a positive integer of milliseconds, at most "
        f"{MAX_WAIT_MS:,}; got {value[:40]!r}",
        param=MAX_WAIT_HEADER,
    )


@router.get("/v1/models", response_model=openai.ModelList, summary="What can be routed")
async def models(request: Request) -> Response:
    routing = router_of(request)
    names = [f"{CAPABILITY_PREFIX}{c}" for c in sorted(routing.capabilities())]
    names += sorted(routing.directory.by_model)
    created = int(request.app.state.started_wall)
    listed = [openai.Model(id=name, created=created, owned_by="local-llm-swarm") for name in names]
    return json_response(openai.ModelList(data=listed))


@router.get("/health", response_model=ServiceHealth, responses={503: {"model": ServiceHealth}})
async def health(request: Request) -> Response:
    """Healthy once the registry has been read; degraded while it cannot be (the router
    still routes from its last snapshot)."""
    routing = router_of(request)
    directory = routing.directory
    if (reason := await readiness(request)) is not None:
        status = "unhealthy"
    elif directory.error:
        status, reason = "degraded", f"{directory.error} (snapshot {directory.age()} s old)"
    else:
        status, reason = "healthy", None
    body = ServiceHealth(
        status=status,
        service="router",
        port=routing.settings.port,
        uptime_seconds=round(time.monotonic() - request.app.state.started, 3),
        reason=reason,
    )
    return json_response(body, exclude_none=False, status=200 if status == "healthy" else 503)


async def readiness(request: Request) -> str | None:
    """Ready once it has agents to route to: the registry was read once (``GET /readyz``);
    a registry that is down later leaves it routing from that snapshot."""
    directory = router_of(request).directory
    if directory.read_at is None:
        return directory.error or "the registry has not been read yet"
    return None


# --- usage (DESIGN 5) ------------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400}
WINDOW_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$"
# The pattern is published; the bound (the retention, a setting) is checked below.
Window = Annotated[
    str,
    Query(max_length=16, pattern=WINDOW_PATTERN, description='"15m", "24h", "7d" or seconds'),
]


def window_seconds(request: Request, window: Window = "24h") -> float:
    """The ``window`` query parameter in seconds, at most the retention."""
    retention_days = router_of(request).settings.usage_retention_days
    match = re.fullmatch(WINDOW_PATTERN, window)
    seconds = float(match[1]) * _UNITS[match[2] or "s"] if match else 0.0
    if not 0 < seconds <= retention_days * 86_400:
        raise ValidationFailed(
            f"window must be like 15m, 24h or 7d, at most the retention of {retention_days:g} days",
            param="window",
        )
    return seconds


WindowSeconds = Annotated[float, Depends(window_seconds)]


async def require_reporter(request: Request) -> None:
    """Usage reports carry the registry's token when one is configured: they are writes."""
    check_bearer(request, router_of(request).settings.registry_token)


@router.post(
    "/usage",
    response_model=UsageAccepted,
    responses=errors(401),
    summary="Report model calls (batched)",
    dependencies=[Depends(require_reporter)],
)
async def report_usage(body: UsageBatch, request: Request) -> Response:
    routing = router_of(request)
    now, retention = routing.wall_clock(), routing.usage.retention
    valid, refused = body.split(lambda record: time_out_of_range(record, now, retention))
    for refusal in refused[:REFUSALS_LOGGED]:
        log.warning("usage record %d refused: %s", refusal.index, refusal.reason)
    accepted = await routing.usage.run(routing.usage.store.add, valid) if valid else 0
    return json_response(UsageAccepted(accepted=accepted, refused=refused), exclude_none=False)


def time_out_of_range(record: UsageRecord, now: float, retention: float) -> str | None:
    """Why a record's time cannot be kept: ahead of this clock by more than a reporter's
    skew (it would count in every window), or older than the retention (in none)."""
    at = record.time.timestamp()
    if now - retention <= at <= now + MAX_CLOCK_SKEW_SECONDS:
        return None
    return (
        f"time: {record.time.isoformat()} is more than {MAX_CLOCK_SKEW_SECONDS:g} s ahead of "
        f"the router's clock or older than the usage retention ({retention / 86_400:g} days)"
    )


@router.get("/api/usage/summary", response_model=UsageSummary, summary="Totals of a window")
async def usage_summary(request: Request, seconds: WindowSeconds) -> Response:
    routing = router_of(request)
    summary = await routing.usage.run(routing.usage.store.summary, seconds)
    # The rates of an empty window are null, and present: the schema requires them.
    return json_response(summary, exclude_none=False)


@router.get("/api/usage/timeseries", response_model=UsageTimeseries, summary="Over time")
async def usage_timeseries(
    request: Request,
    seconds: WindowSeconds,
    buckets: Annotated[int, Query(ge=1, le=500)] = 48,
) -> Response:
    routing = router_of(request)
    store = routing.usage.store
    return json_response(await routing.usage.run(store.timeseries, seconds, buckets))


@router.get("/api/usage/by-agent", response_model=UsageByAgent, summary="Per agent")
async def usage_by_agent(request: Request, seconds: WindowSeconds) -> Response:
    routing = router_of(request)
    by_agent = await routing.usage.run(routing.usage.store.by_agent, seconds)
    # An agent with only errors has no latencies: null, and present as the schema requires.
    return json_response(by_agent, exclude_none=False)


@router.get(
    "/api/usage/requests/{request_id}",
    response_model=RequestUsage,
    responses=errors(404),
    summary="What one request (by its X-Request-ID) did and cost",
)
async def usage_of_request(request_id: str, request: Request) -> Response:
    routing = router_of(request)
    records = await routing.usage.run(routing.usage.store.for_request, request_id[:128])
    if not records:
        raise NotFound(f"no usage recorded for request {request_id!r}", param="request_id")
    return json_response(RequestUsage(request_id=request_id, records=records))
