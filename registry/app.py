"""The registry's app factory."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI

from registry import routes
from registry.clock import registry_clock
from registry.metrics import RegistryMetrics
from registry.settings import RegistrySettings
from registry.store import AgentStore, Clock, reap_periodically
from services.common.database import create_db_engine, db_runner
from services.common.http import install_plumbing


def create_app(settings: RegistrySettings, clock: Clock | None = None) -> FastAPI:
    """The registry; ``clock`` decides TTLs (default: the database's, registry.clock)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_db_engine(settings.database_url)
        store = AgentStore(
            engine,
            clock or registry_clock(engine),
            default_ttl=settings.ttl_seconds,
            reap_after=settings.reap_after_seconds,
        )
        run = db_runner(engine)
        await run(store.create_tables)
        metrics = RegistryMetrics(app.state.metrics_registry, store)
        app.state.registry = routes.Registry(settings, store, run, metrics)
        reaper = asyncio.create_task(
            reap_periodically(
                store, settings.reap_interval_seconds, run=run, on_reaped=metrics.reaped.inc
            ),
            name="registry-reaper",
        )
        # Start-up objects (modules, models, compiled queries) live as long as the process:
        # keep them out of the collector's scans, which otherwise pause requests for tens
        # of milliseconds.
        gc.freeze()
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            engine.dispose()

    app = FastAPI(
        title="local-llm-swarm registry",
        summary="Agents register, heartbeat and are discovered by capability.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.started = time.monotonic()
    install_plumbing(app, max_body_bytes=settings.max_body_bytes, readiness=routes.readiness)
    app.include_router(routes.writes)
    app.include_router(routes.router)
    return app
