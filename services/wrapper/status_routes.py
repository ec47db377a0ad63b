"""``GET /health`` and ``GET /info``."""

from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter, Request
from starlette.responses import Response

from schemas.health import ClassifierInfo, ModelInfo, ServiceInfo, WrapperHealth
from services.common.streaming import json_response
from services.wrapper.service import wrapper_of

router = APIRouter(tags=["Service"])


@router.get("/health", response_model=WrapperHealth, responses={503: {"model": WrapperHealth}})
async def health(request: Request) -> Response:
    """Healthy when the backend answers and has the model; 503 with the reason otherwise."""
    wrapper = wrapper_of(request)
    status = await wrapper.backend.probe()
    # A classifier still validates domain names without its backend: degraded, not down.
    down = "degraded" if wrapper.settings.taxonomy is not None else "unhealthy"
    body = WrapperHealth(
        status="healthy" if status.healthy else down,
        service=wrapper.settings.service,
        port=wrapper.settings.port,
        uptime_seconds=wrapper.uptime(),
        reason=status.reason,
        ollama_backend=wrapper.settings.backend_url,
        model=wrapper.settings.model,
        model_loaded=status.model_available,
    )
    # Every documented key, even when null.
    return json_response(body, exclude_none=False, status=200 if status.healthy else 503)


@router.get("/info", response_model=ServiceInfo | ClassifierInfo)
async def info(request: Request) -> Response:
    """The model's facts (from the backend's ``/api/show``) and live performance figures."""
    wrapper = wrapper_of(request)
    settings = wrapper.settings
    facts = await wrapper.backend.model_facts() or ModelInfo(name=settings.model)
    model = facts.model_copy(
        update={"context_length": facts.context_length or settings.context_length}
    )
    body = ServiceInfo(
        service_name=settings.name,
        version=_version(request),
        model=model,
        capabilities=settings.capabilities,
        performance=wrapper.stats.performance(),
        endpoints=request.app.state.endpoints,
        prompt_cache=wrapper.stats.prompt_cache.summary(),
    )
    if (taxonomy := settings.tmd_taxonomy) is not None:
        body = ClassifierInfo(
            **dict(body),
            domain_taxonomy_version=taxonomy.version,
            prompt_version=taxonomy.prompt.version,
        )
    return json_response(body, exclude_none=False)


async def readiness(request: Request) -> str | None:
    """Ready while the backend answers and serves the model (``GET /readyz``)."""
    return (await wrapper_of(request).backend.probe()).reason


def _version(request: Request) -> str:
    try:
        return metadata.version("local-llm-swarm")
    except metadata.PackageNotFoundError:
        return request.app.version
