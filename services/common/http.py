"""What every daemon's app gets: error envelopes, request ids, body limits, metrics; and
lean routes for the few endpoints on a hot path."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Collection, Iterable
from typing import Any, get_type_hints

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ValidationError
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

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
    """Answer the routes of ``routers`` at ``paths`` in :class:`LeanEndpoints`, the
    innermost middleware: under the app's own (request ids, metrics, limits), past
    FastAPI's routing and its per-request layers.

    The declared routes, included in the app, stay behind it, where they still describe
    the endpoints in the OpenAPI schema (and answer 405 to other methods).
    """
    declared = [
        route
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute) and route.path in paths
    ]
    # Appended, not added: add_middleware puts a middleware outermost.
    app.user_middleware.append(Middleware(LeanEndpoints, routes=declared))


class LeanEndpoints:
    """Call the endpoints of ``routes`` straight from the middleware stack.

    On a hot path, FastAPI's per-request work (routing past every route, dependency
    solving, its exception and exit-stack layers, a Request made twice) cost the router
    more CPU than its own work (DESIGN 7). For endpoints shaped
    ``(body: Model, request: Request)``: the body is validated once, from its JSON bytes,
    and a bad one raises ``RequestValidationError`` as FastAPI does; every error is
    answered by the app's own exception handlers, so the envelope is the same.
    """

    def __init__(self, app: ASGIApp, routes: Iterable[APIRoute]) -> None:
        self.app = app
        self.routes = {
            (method, route.path): (route, get_type_hints(route.endpoint)["body"])
            for route in routes
            for method in route.methods
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = (
            self.routes.get((scope["method"], scope["path"])) if scope["type"] == "http" else None
        )
        if found is None:
            await self.app(scope, receive, send)
            return
        route, model = found
        scope["route"] = route  # the template the metrics count it under
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(await validated_body(request, model), request)
        except Exception as exc:
            handler = handler_for(request.app, exc)
            if handler is None or isinstance(exc, ClientDisconnect):
                raise  # a client that left is the metrics' to count
            response = await handler(request, exc)
        await response(scope, receive, send)


async def validated_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The body as ``model``; a bad one raises ``RequestValidationError`` as FastAPI does."""
    raw = await request.body()
    try:
        check_json(raw)
        return model.model_validate_json(raw)
    except json.JSONDecodeError as exc:  # as FastAPI reports a body that does not parse
        error = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error"}
        error |= {"input": {}, "ctx": {"error": exc.msg}}
        raise RequestValidationError([error]) from None
    except ValidationError as exc:
        errors = [error | {"loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from None


def handler_for(app: FastAPI, exc: Exception) -> Callable[..., Any] | None:
    """The app's exception handler for ``exc``, by its class's MRO (as Starlette finds it)."""
    handlers = app.exception_handlers
    return next((handlers[kind] for kind in type(exc).__mro__ if kind in handlers), None)
