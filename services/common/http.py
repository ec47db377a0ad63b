"""What every daemon's app gets: error envelopes, request ids, body limits, metrics."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from services.common.errors import install_error_handlers
from services.common.metrics import HttpMetrics, MetricsMiddleware, metrics_endpoint
from services.common.middleware import (
    BodyLimitMiddleware,
    OllamaJsonBodyMiddleware,
    RequestIdMiddleware,
)


def install_plumbing(app: FastAPI, *, max_body_bytes: int) -> CollectorRegistry:
    """Wire the shared middleware and ``GET /metrics``; return the app's metrics registry."""
    registry = CollectorRegistry(auto_describe=True)
    app.state.metrics_registry = registry
    install_error_handlers(app)
    # Added innermost first: the request id wraps everything, so even a 413 carries it.
    app.add_middleware(OllamaJsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=HttpMetrics(registry))
    app.add_middleware(RequestIdMiddleware)
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    return registry
