"""What every daemon's app gets: error envelopes, request ids, body limits, metrics; and
lean routes for the few endpoints on a hot path."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Collection, Iterable, Sequence
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

log = logging.getLogger(__name__)

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


class Failover:
    """Peers answering the same API (registry replicas on one database), used as one client.

    A request goes to the peer that answered last; on a connection failure, a timeout or a
    5xx it goes on to the next, each peer tried once per request, so one that is down costs
    a refused connection, not a missed heartbeat. When none answers, the last 5xx is
    returned, else the last failure raised: the caller's own retry (its backoff) decides
    what comes next, and starts from the peer after the one that failed first.
    """

    def __init__(self, clients: Sequence[httpx.AsyncClient]) -> None:
        if not clients:
            raise ValueError("a failover needs at least one client")
        self.clients = list(clients)
        self.current = 0

    @property
    def base_url(self) -> httpx.URL:
        """The peer requests go to first."""
        return self.clients[self.current].base_url

    @property
    def peers(self) -> str:
        """Every peer's URL, in the order tried, for messages."""
        return ", ".join(str(client.base_url) for client in self.clients)

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        first, count = self.current, len(self.clients)
        failure: httpx.TransportError | None = None
        answered: httpx.Response | None = None
        for step in range(count):
            client = self.clients[(first + step) % count]
            try:
                response = await client.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                failure, problem = exc, f"is unreachable ({str(exc) or type(exc).__name__})"
            else:
                if response.status_code < 500:
                    self.current = (first + step) % count
                    return response
                answered, problem = response, f"answered {response.status_code}"
            if step < count - 1:
                following = self.clients[(first + step + 1) % count].base_url
                log.warning("%s %s: trying %s", client.base_url, problem, following)
        self.current = (first + 1) % count
        if answered is not None:
            return answered
        assert failure is not None
        raise failure

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", url, **kwargs)

    async def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("DELETE", url, **kwargs)


def peer_failover(
    given: httpx.AsyncClient | Failover | None,
    base_urls: Sequence[str],
    owned: contextlib.AsyncExitStack,
) -> Failover:
    """``given`` (a test passes one, or a client it wraps), else a client per URL in
    ``base_urls``, tried in that order, closed with ``owned``."""
    if isinstance(given, Failover):
        return given
    if given is not None:
        return Failover([given])
    return Failover([peer_client(None, url, owned) for url in base_urls])


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
