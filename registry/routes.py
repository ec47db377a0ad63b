"""The registry's HTTP API (DESIGN section 3)."""

from __future__ import annotations

import hmac
import time
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from registry.allowlist import check_endpoint
from registry.metrics import RegistryMetrics
from registry.settings import RegistrySettings
from registry.store import AgentStore
from schemas.agents import (
    AgentDefinition,
    AgentList,
    AgentRecord,
    CheckStatus,
    DiscoverRequest,
    Heartbeat,
    HeartbeatAck,
    Identifier,
    Token,
)
from schemas.errors import ErrorEnvelope
from schemas.health import RegistryHealth
from services.common.errors import NotFound, Unauthorized, ValidationFailed

ERRORS = {status: {"model": ErrorEnvelope} for status in (401, 404, 413, 422)}


def get_store(request: Request) -> AgentStore:
    return request.app.state.store


def get_settings(request: Request) -> RegistrySettings:
    return request.app.state.settings


def get_metrics(request: Request) -> RegistryMetrics:
    return request.app.state.registry_metrics


def require_writer(request: Request) -> None:
    """Writes need ``Authorization: Bearer <token>`` when a token is configured."""
    token = request.app.state.settings.token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise Unauthorized()


Store = Annotated[AgentStore, Depends(get_store)]
Settings = Annotated[RegistrySettings, Depends(get_settings)]
Metrics = Annotated[RegistryMetrics, Depends(get_metrics)]
AgentId = Annotated[Identifier, Path()]

router = APIRouter(responses=ERRORS)
writes = APIRouter(dependencies=[Depends(require_writer)], responses=ERRORS)


def _json(model: BaseModel, status_code: int = 200) -> Response:
    # Records are built from stored, already validated rows: serialize them once, without
    # FastAPI validating the response model again on the hot discovery path.
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


def _check_page(limit: int, settings: RegistrySettings) -> None:
    if limit > settings.max_page_size:
        raise ValidationFailed(
            f"limit: must be at most {settings.max_page_size}",
            param="limit",
            code="limit_too_large",
        )


@writes.post("/register", response_model=AgentRecord, summary="Register or update an agent")
def register(definition: AgentDefinition, store: Store, settings: Settings, metrics: Metrics):
    check_endpoint(definition.endpoint, settings.endpoint_allowlist)
    record = store.register(definition)
    metrics.registrations.inc()
    return _json(record)


@writes.post("/heartbeat/{agent_id}", response_model=HeartbeatAck, summary="Refresh liveness")
def heartbeat(
    agent_id: AgentId,
    store: Store,
    metrics: Metrics,
    beat: Annotated[Heartbeat | None, Body()] = None,
):
    try:
        ack = store.heartbeat(agent_id, beat or Heartbeat())
    except NotFound:
        metrics.heartbeats.labels("unknown_agent").inc()
        raise
    metrics.heartbeats.labels("ok").inc()
    return _json(ack)


@writes.delete("/agents/{agent_id}", status_code=204, summary="Deregister an agent")
def deregister(agent_id: AgentId, store: Store, metrics: Metrics) -> Response:
    store.deregister(agent_id)
    metrics.deregistrations.inc()
    return Response(status_code=204)


@router.get("/agents", response_model=AgentList, summary="List agents")
def list_agents(
    store: Store,
    settings: Settings,
    capability: Annotated[str | None, Query(max_length=64)] = None,
    status: CheckStatus | None = None,
    tier: Token | None = None,
    role: Token | None = None,
    limit: Annotated[int, Query(ge=1)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
):
    _check_page(limit, settings)
    agents = store.list(
        capability=capability.strip().lower() if capability else None,
        status=status,
        tier=tier,
        role=role,
        limit=limit,
        offset=offset,
    )
    return _json(AgentList.model_construct(agents=agents))


@router.get("/agents/{agent_id}", response_model=AgentRecord, summary="One agent")
def get_agent(agent_id: AgentId, store: Store):
    return _json(store.get(agent_id))


@router.post("/discover", response_model=AgentList, summary="Find agents by capability")
def discover(request: DiscoverRequest, store: Store, settings: Settings):
    _check_page(request.limit, settings)
    return _json(AgentList.model_construct(agents=store.discover(request)))


@router.get("/health", response_model=RegistryHealth, responses={503: {"model": RegistryHealth}})
def health(request: Request, store: Store, settings: Settings):
    uptime = round(time.monotonic() - request.app.state.started, 3)
    base = {"service": "registry", "port": settings.port, "uptime_seconds": uptime}
    try:
        counts = store.count_by_status()
    except Exception as exc:
        reason = f"database unavailable: {type(exc).__name__}"
        body = RegistryHealth(status="unhealthy", database="error", reason=reason, **base)
        return JSONResponse(body.model_dump(), status_code=503)
    return RegistryHealth(status="healthy", database="ok", agents=sum(counts.values()), **base)
