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

from router import dashboard, routes
from router.breaker import Breaker, Breakers
from router.cloud import CloudClient
from router.directory import Directory
from router.metrics import RouterMetrics
from router.ratelimit import RateLimiter, RateLimitMiddleware
from router.service import Router
from router.settings import RouterSettings
from router.upstream import EMBEDDINGS_PATH, LocalAgents, Upstreams
from router.usage import UsageLog, UsageStore
from services.common.database import create_db_engine, db_runner
from services.common.http import Failover, install_plumbing, peer_failover, serve_lean

CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
MODEL_CALL_PATHS = (*CHAT_PATHS, EMBEDDINGS_PATH)


def create_app(
    settings: RouterSettings,
    *,
    registry_client: httpx.AsyncClient | Failover | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> FastAPI:
    """The router for a profile; tests pass the registry client, clocks and sleep."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as owned:
            http = peer_failover(registry_client, settings.registries, owned)
            timeout = aiohttp.ClientTimeout(
                total=None,
                sock_connect=settings.connect_timeout_seconds,
                sock_read=settings.read_timeout_seconds,
            )
            session = aiohttp.ClientSession(timeout=timeout)
            owned.push_async_callback(session.close)
            cloud = None  # no key, no cloud candidate: no client (nor its TLS context)
            if settings.keyed_providers:
                cloud_http = httpx.AsyncClient(
                    timeout=httpx.Timeout(
                        settings.read_timeout_seconds, connect=settings.connect_timeout_seconds
                    )
                )
                owned.push_async_callback(cloud_http.aclose)
                cloud = CloudClient(cloud_http, settings.providers)
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
            engine = create_db_engine(settings.database_url)
            owned.callback(engine.dispose)
            store = UsageStore(
                engine,
                clock=wall_clock,
                reference_price_per_1k=settings.reference_price_per_1k_tokens,
                reference_embedding_price_per_1k=settings.reference_embedding_price_per_1k_tokens,
            )
            retention = settings.usage_retention_days * 86_400
            usage = UsageLog(store, db_runner(engine), retention=retention)
            owned.push_async_callback(usage.flush)  # at shutdown, after the last request
            router = Router(
                settings=settings,
                directory=directory,
                breakers=breakers,
                upstream=Upstreams(LocalAgents(session), cloud),
                clock=clock,
                metrics=metrics,
                usage=usage,
                wall_clock=wall_clock,
            )
            metrics.active.set_function(router.loads.in_flight)
            app.state.router = router
            await directory.refresh()  # route from the start when the registry answers
            tasks = [
                asyncio.create_task(directory.run(), name="router-discovery"),
                asyncio.create_task(usage.run_forever(sleep), name="router-usage"),
            ]
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    app = FastAPI(
        title="local-llm-swarm router",
        summary="Routes OpenAI calls by capability to local agents first, with fallback.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.started = time.monotonic()
    app.state.started_wall = time.time()
    if settings.rate_limit_per_second > 0:
        limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst, clock)
        # Inside the shared plumbing: a 429 carries the request id and is counted.
        paths = (*MODEL_CALL_PATHS, "/route")
        app.add_middleware(RateLimitMiddleware, limiter=limiter, paths=paths)
    install_plumbing(app, max_body_bytes=settings.max_body_bytes, readiness=routes.readiness)
    app.include_router(routes.router)
    app.include_router(dashboard.router)
    serve_lean(app, [routes.router], MODEL_CALL_PATHS)
    return app
