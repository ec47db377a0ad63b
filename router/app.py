"""The router's app factory: state made in the lifespan, shared plumbing, lean hot path."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import aiohttp
import httpx
from fastapi import FastAPI

from router import routes
from router.breaker import Breaker, Breakers
from router.directory import Directory
from router.metrics import RouterMetrics
from router.service import Router
from router.settings import RouterSettings
from services.common.http import install_plumbing, serve_lean

REGISTRY_TIMEOUT = httpx.Timeout(5.0)
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")


def create_app(
    settings: RouterSettings,
    *,
    registry_client: httpx.AsyncClient | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> FastAPI:
    """The router for a profile; tests pass the registry client, clock and sleep."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as owned:
            http = registry_client
            if http is None:
                http = httpx.AsyncClient(base_url=settings.registry_url, timeout=REGISTRY_TIMEOUT)
                owned.push_async_callback(http.aclose)
            timeout = aiohttp.ClientTimeout(
                total=None,
                sock_connect=settings.connect_timeout_seconds,
                sock_read=settings.read_timeout_seconds,
            )
            session = aiohttp.ClientSession(timeout=timeout)
            owned.push_async_callback(session.close)
            directory = Directory(
                http, interval=settings.discovery_refresh_seconds, clock=clock, sleep=sleep
            )
            make_breaker = partial(
                Breaker,
                failures=settings.breaker_failures,
                failure_rate=settings.breaker_failure_rate,
                window=settings.breaker_window,
                cooldown=settings.breaker_cooldown_seconds,
                clock=clock,
            )
            breakers = Breakers(make_breaker)
            metrics = RouterMetrics(app.state.metrics_registry, breakers)
            app.state.router = Router(settings, directory, breakers, session, clock, metrics)
            await directory.refresh()  # route from the start when the registry answers
            refreshing = asyncio.create_task(directory.run(), name="router-discovery")
            try:
                yield
            finally:
                refreshing.cancel()
                await asyncio.gather(refreshing, return_exceptions=True)

    app = FastAPI(
        title="local-llm-swarm router",
        summary="Routes OpenAI calls by capability to local agents first, with fallback.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.started = time.monotonic()
    app.state.started_wall = time.time()
    install_plumbing(app, max_body_bytes=settings.max_body_bytes)
    app.include_router(routes.router)
    serve_lean(app, [routes.router], CHAT_PATHS)
    return app
