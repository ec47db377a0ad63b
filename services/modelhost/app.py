"""The model host's app factory."""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI

from services.common.http import install_plumbing
from services.modelhost import embed_routes, routes
from services.modelhost.engine import Engine, load_engine
from services.modelhost.settings import ModelHostSettings


def create_app(settings: ModelHostSettings, engine: Engine | None = None) -> FastAPI:
    """The app; it loads ``settings.model`` at start-up unless given a loaded ``engine``.

    An injected engine stays the caller's: the app does not close it (tests share one).
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = engine is None
        app.state.engine = engine or await anyio.to_thread.run_sync(load_engine, settings)
        loaded = app.state.engine
        for collector in [
            *loaded.queue.metrics.collectors(),
            *loaded.embedder.metrics.collectors(),
        ]:
            registry.register(collector)
        # The model and start-up objects live as long as the process: keep them out of the
        # collector's scans, which would otherwise pause streams.
        gc.freeze()
        try:
            yield
        finally:
            if owned:
                app.state.engine.close()

    app = FastAPI(
        title="local-llm-swarm model host",
        summary="The Ollama API subset over llama-cpp-python, for GGUF models from PyPI.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.started = time.monotonic()
    registry = install_plumbing(
        app, max_body_bytes=settings.max_body_bytes, readiness=routes.readiness
    )
    app.include_router(routes.router)
    app.include_router(embed_routes.router)
    return app
