"""Prometheus metrics: one CollectorRegistry per app, so apps in one process stay apart."""

from __future__ import annotations

import logging
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

# A model call takes tens of milliseconds (a short classification on a tiny model) to
# minutes (a long answer on a big model on CPU); its first token comes after the prompt is
# read: milliseconds to a minute. Wrappers and the router share these buckets.
LLM_DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# HTTP handling of a daemon: sub-millisecond to seconds.
HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before its answer


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "Time to the end of the response body.",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )


class MetricsMiddleware:
    """Count and time requests by route template (never by raw path: ids would explode it).

    A request the app never answered is a 500, unless its client had gone (the app read
    a disconnect, or Starlette raised ``ClientDisconnect``): that is a 499 and one line at
    INFO, never a server error with a traceback."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    @staticmethod
    def route_of(scope: Scope) -> str:
        """The template of the route matched in ``scope`` (which middleware passes on,
        never a copy), whatever the handler then did: FastAPI's router records its routes
        as ``route``, and so does ``LeanEndpoints`` for the hot paths."""
        route = scope.get("route")
        return "unmatched" if route is None else route.path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None
        client_left = False

        async def receive_noting_disconnect() -> Message:
            nonlocal client_left
            message = await receive()
            client_left = client_left or message["type"] == "http.disconnect"
            return message

        async def send_capturing_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive_noting_disconnect, send_capturing_status)
        except ClientDisconnect:
            client_left = True
            when = "during" if status is not None else "before"
            log.info("client left %s its answer: %s %s", when, scope["method"], scope["path"])
        finally:
            if status is None:
                status = CLIENT_CLOSED_REQUEST if client_left else 500
            route = self.route_of(scope)
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.duration.labels(method, route).observe(time.perf_counter() - started)


def metrics_endpoint(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
