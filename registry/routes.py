"""The registry's HTTP API (DESIGN section 3).

Endpoints are async and reach the store through ``app.state.run`` (see
``services.common.database.db_runner``): inline for SQLite, in a worker thread otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from registry.allowlist import check_endpoint
from registry.metrics import RegistryMetrics
from registry.settings import RegistrySettings
from registry.store import AgentStore
from schemas.agents import (
    DEFAULT_PAGE_SIZE,
    AgentDefinition,
    AgentList,
    AgentRecord,
    CheckStatus,
    DiscoverRequest,
    Heartbeat,
    HeartbeatAck,
    Identifier,
    Locality,
    Tier,
    Token,
)
from schemas.errors import ErrorEnvelope
from schemas.health import RegistryHealth
from services.common.auth import check_bearer
from services.common.database import Runner
from services.common.errors import NotFound, ValidationFailed
from services.common.strict_json import StrictJSONRoute

ERRORS = {status: {"model": ErrorEnvelope} for status in (401, 404, 413, 422)}


@dataclass(frozen=True)
class Registry:
    """What the routes work with; the app's lifespan creates it."""

    settings: RegistrySettings
    store: AgentStore
    run: Runner
    metrics: RegistryMetrics


# Async dependencies: FastAPI would run plain functions in the thread pool.
async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


async def require_writer(request: Request) -> None:
    """Writes need ``Authorization: Bearer <token>`` when a token is configured."""
    check_bearer(request, request.app.state.registry.settings.token)


State = Annotated[Registry, Depends(get_registry)]
AgentId = Annotated[Identifier, Path()]

router = APIRouter(responses=ERRORS, route_class=StrictJSONRoute)
writes = APIRouter(
    dependencies=[Depends(require_writer)], responses=ERRORS, route_class=StrictJSONRoute
)


def _json(model: BaseModel) -> Response:
    # Records are built from stored, already validated rows: serialize them once, without
    # FastAPI validating the response model again on the hot discovery path.
    return Response(model.model_dump_json(), media_type="application/json")


def _check_page(limit: int, settings: RegistrySettings) -> None:
    if limit > settings.max_page_size:
        raise ValidationFailed(
            f"limit: must be at most {settings.max_page_size}",
            param="limit",
            code="limit_too_large",
        )


@writes.post("/register", response_model=AgentRecord, summary="Register or update an agent")
async def register(definition: AgentDefinition, registry: State):
    check_endpoint(definition.endpoint, registry.settings.endpoint_allowlist)
    record = await registry.run(registry.store.register, definition)
    registry.metrics.registrations.inc()
    return _json(record)


@writes.post("/heartbeat/{agent_id}", response_model=HeartbeatAck, summary="Refresh liveness")
async def heartbeat(
    agent_id: AgentId, registry: State, beat: Annotated[Heartbeat | None, Body()] = None
):
    try:
        ack = await registry.run(registry.store.heartbeat, agent_id, beat or Heartbeat())
    except NotFound:
        registry.metrics.heartbeats_unknown.inc()
        raise
    registry.metrics.heartbeats_ok.inc()
    return _json(ack)


@writes.delete("/agents/{agent_id}", status_code=204, summary="Deregister an agent")
async def deregister(agent_id: AgentId, registry: State) -> Response:
    await registry.run(registry.store.deregister, agent_id)
    registry.metrics.deregistrations.inc()
    return Response(status_code=204)


@router.get("/agents", response_model=AgentList, summary="List agents")
async def list_agents(
    registry: State,
    capability: Annotated[str | None, Query(max_length=64)] = None,
    status: CheckStatus | None = None,
    tier: Annotated[Tier | None, Query()] = None,
    locality: Locality | None = None,
    role: Token | None = None,
    limit: Annotated[int, Query(ge=1)] = DEFAULT_PAGE_SIZE,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
):
    _check_page(limit, registry.settings)

    def page():
        return registry.store.list(
            capability=capability.strip().lower() if capability else None,
            status=status,
            tier=tier,
            locality=locality,
            role=role,
            limit=limit,
            offset=offset,
        )

    return _json(AgentList.model_construct(agents=await registry.run(page)))


@router.get("/agents/{agent_id}", response_model=AgentRecord, summary="One agent")
async def get_agent(agent_id: AgentId, registry: State):
    return _json(await registry.run(registry.store.get, agent_id))


@router.post("/discover", response_model=AgentList, summary="Find agents by capability")
async def discover(request: DiscoverRequest, registry: State):
    _check_page(request.limit, registry.settings)
    agents = await registry.run(registry.store.discover, request)
    return _json(AgentList.model_construct(agents=agents))


@router.get("/health", response_model=RegistryHealth, responses={503: {"model": RegistryHealth}})
async def health(request: Request, registry: State):
    uptime = round(time.monotonic() - request.app.state.started, 3)
    base = {"service": "registry", "port": registry.settings.port, "uptime_seconds": uptime}
    try:
        agents = await registry.run(registry.store.count)
    except Exception as exc:
        reason = _database_unavailable(exc)
        body = RegistryHealth(status="unhealthy", database="error", reason=reason, **base)
        return JSONResponse(body.model_dump(), status_code=503)
    return RegistryHealth(status="healthy", database="ok", agents=agents, **base)


async def readiness(request: Request) -> str | None:
    """Ready while the database answers (``GET /readyz``)."""
    registry = await get_registry(request)
    try:
        await registry.run(registry.store.count)
    except Exception as exc:
        return _database_unavailable(exc)
    return None


def _database_unavailable(exc: Exception) -> str:
    return f"database unavailable: {type(exc).__name__}"
