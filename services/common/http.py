"""What every daemon's app gets: error envelopes, request ids, body limits, metrics; and
lean routes for the few endpoints on a hot path."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Collection, Iterable
from typing import get_type_hints

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.routing import Route

from services.common.errors import install_error_handlers
from services.common.metrics import HttpMetrics, MetricsMiddleware, metrics_endpoint
from services.common.middleware import (
    BodyLimitMiddleware,
    OllamaJsonBodyMiddleware,
    RequestIdMiddleware,
)
from services.common.openapi import install_openapi
from services.common.probes import Readiness, install_probes
from services.common.strict_json import check_json

# Another daemon of the swarm (the registry, the router): it answers in milliseconds.
PEER_TIMEOUT = httpx.Timeout(5.0)


def peer_client(
    given: httpx.AsyncClient | None, base_url: str, owned: contextlib.AsyncExitStack
) -> httpx.AsyncClient:
    """``given`` (a test passes one), else a client for ``base_url`` closed with ``owned``."""
    if given is not None:
        return given
    client = httpx.AsyncClient(base_url=base_url, timeout=PEER_TIMEOUT)
    owned.push_async_callback(client.aclose)
    return client


def install_plumbing(
    app: FastAPI, *, max_body_bytes: int, readiness: Readiness
) -> CollectorRegistry:
    """Wire the shared middleware, ``GET /metrics``, the probes (``/healthz``, ``/readyz``
    answered by ``readiness``) and the error envelopes, in the handlers and in the published
    schema; return the app's metrics registry."""
    registry = CollectorRegistry(auto_describe=True)
    app.state.metrics_registry = registry
    install_error_handlers(app)
    install_openapi(app)
    # Added innermost first: the request id wraps everything, so even a 413 carries it.
    app.add_middleware(OllamaJsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=HttpMetrics(registry))
    app.add_middleware(RequestIdMiddleware)
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    install_probes(app, readiness)
    return registry


def serve_lean(app: FastAPI, routers: Iterable[APIRouter], paths: Collection[str]) -> None:
    """Serve the routes of ``routers`` at ``paths`` through :func:`lean_route`.

    The lean twin goes in front and answers; the declared route, included in the app,
    stays behind it, where it still describes the endpoint in the OpenAPI schema.
    """
    declared = [
        route
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute) and route.path in paths
    ]
    app.router.routes[:0] = [lean_route(route) for route in declared]


def lean_route(route: APIRoute) -> Route:
    """``route`` without FastAPI's per-request dependency solving, which costs more CPU
    than the rest of a wrapper's hop (DESIGN 7: 1 ms). For endpoints shaped
    ``(body: Model, request: Request)``: the body is validated once, from its JSON bytes,
    and a bad one raises ``RequestValidationError`` as FastAPI does, so the envelope is the
    same."""
    endpoint = route.endpoint
    model: type[BaseModel] = get_type_hints(endpoint)["body"]

    async def serve(request: Request) -> Response:
        raw = await request.body()
        try:
            check_json(raw)
            body = model.model_validate_json(raw)
        except json.JSONDecodeError as exc:  # as FastAPI reports a body that does not parse
            error = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error"}
            error |= {"input": {}, "ctx": {"error": exc.msg}}
            raise RequestValidationError([error]) from None
        except ValidationError as exc:
            errors = [error | {"loc": ("body", *error["loc"])} for error in exc.errors()]
            raise RequestValidationError(errors) from None
        return await endpoint(body, request)

    return Route(route.path, serve, methods=list(route.methods), name=route.name)
