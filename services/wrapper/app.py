"""The wrapper's app factory."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random as random_module
import time
from collections.abc import AsyncIterator, Callable

import httpx
import ollama
from fastapi import FastAPI

from schemas.agents import AgentDefinition, Heartbeat
from services.common.http import (
    Failover,
    install_plumbing,
    peer_failover,
    serve_lean,
)
from services.wrapper import embed_routes, ollama_routes, openai_routes, status_routes, tmd_routes
from services.wrapper.aiohttp_client import AiohttpClient, ollama_client
from services.wrapper.backend import Backend, FinalAnswer
from services.wrapper.openai_backend import OpenAIBackend
from services.wrapper.registration import EmbeddingProbe, Registrar, Sleep, with_embedding
from services.wrapper.service import Wrapper, wall_clock
from services.wrapper.settings import WrapperSettings
from services.wrapper.stats import Stats
from services.wrapper.tmd import DomainClassifier
from services.wrapper.usage import UsageReporter

# The model calls: the wrapper's hot path, served by lean routes.
MODEL_CALL_PATHS = (
    "/v1/chat/completions",
    "/chat/completions",
    "/api/chat",
    "/api/generate",
    "/generate",
    *embed_routes.PATHS,
)


def create_app(
    settings: WrapperSettings,
    *,
    backend: ollama.AsyncClient | AiohttpClient | None = None,
    registry_client: httpx.AsyncClient | Failover | None = None,
    usage_client: httpx.AsyncClient | Failover | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Sleep = asyncio.sleep,
    random: Callable[[], float] = random_module.random,
) -> FastAPI:
    """The wrapper for one profile entry.

    ``backend`` (the official ollama client, or an ``AiohttpClient`` on an openai
    backend's /v1), ``registry_client`` and ``usage_client`` (to the routers, where usage is
    reported when ``settings.usage_url`` is set; a client or a ``Failover`` over several)
    are used as given (and left open) when passed; otherwise the lifespan creates and
    closes them. ``clock`` times calls and uptime; ``sleep`` and ``random`` drive the
    registration and reporting backoff.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as owned:
            http = peer_failover(registry_client, settings.registries, owned)
            reporter = None
            if settings.routers:
                to_router = peer_failover(usage_client, settings.routers, owned)
                reporter = UsageReporter(
                    to_router, token=settings.registry_token, sleep=sleep, random=random
                )
                owned.push_async_callback(reporter.flush)  # the last records, at shutdown
            stats = Stats(
                app.state.metrics_registry,
                model=settings.model,
                cost_per_1k_tokens=settings.cost_per_1k_tokens,
                clock=clock,
                backend=settings.backend_url,
                agent_id=settings.agent_id,
                provider=settings.locality,
                report=reporter.add if reporter else None,
                parallel=settings.parallel,
            )
            wrapper = Wrapper(
                settings,
                make_backend(settings, backend, owned, on_final=stats.prompt_cache.observe),
                stats,
                clock=clock,
                started=clock(),
                created=wall_clock(),
            )
            embeds = EmbeddingProbe(wrapper.backend, enabled=settings.probe_embedding)

            async def definition() -> AgentDefinition:
                return with_embedding(await wrapper.agent_definition(), bool(embeds.embeds))

            async def check() -> Heartbeat:
                beat = await wrapper.heartbeat()
                if beat.status == "passing":
                    await embeds.ask()  # once it has an answer, nothing
                return beat

            registrar = Registrar(
                http,
                definition=definition,
                check=check,
                interval=settings.heartbeat_interval_seconds,
                token=settings.registry_token,
                sleep=sleep,
                random=random,
            )
            app.state.wrapper = wrapper
            app.state.registrar = registrar
            if settings.tmd_taxonomy is not None:
                app.state.classifier = DomainClassifier(wrapper, settings.tmd_taxonomy)
            app.state.usage = reporter
            # The wrapper serves at once; registration retries in the background.
            tasks = [asyncio.create_task(registrar.run(), name="wrapper-registration")]
            if reporter is not None:
                tasks.append(asyncio.create_task(reporter.run(), name="wrapper-usage"))
            # Start-up objects live as long as the process: keep them out of the
            # collector's scans, which otherwise pause requests.
            gc.freeze()
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await registrar.deregister()

    app = FastAPI(
        title=f"local-llm-swarm wrapper: {settings.name}",
        summary="One local model behind the OpenAI and Ollama APIs.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_plumbing(app, max_body_bytes=settings.max_body_bytes, readiness=status_routes.readiness)
    routers = [
        openai_routes.router,
        ollama_routes.router,
        embed_routes.router,
        status_routes.router,
    ]
    if settings.taxonomy is not None:
        routers.append(tmd_routes.router)
    for router in routers:
        app.include_router(router)
    paths = {route.path for router in routers for route in router.routes if hasattr(route, "path")}
    app.state.endpoints = sorted(paths | {"/metrics"})
    serve_lean(app, routers, MODEL_CALL_PATHS)
    return app


def make_backend(
    settings: WrapperSettings,
    client: ollama.AsyncClient | AiohttpClient | None,
    owned: contextlib.AsyncExitStack,
    *,
    on_final: Callable[[FinalAnswer], None],
) -> Backend | OpenAIBackend:
    """The backend of ``settings.backend_kind``: the one place the kind is chosen. A client
    made here is closed with ``owned``; a given one is used as it is."""
    timeouts = {
        "connect_timeout": settings.connect_timeout_seconds,
        "read_timeout": settings.read_timeout_seconds,
    }
    if settings.backend_kind == "openai":
        if client is None:
            headers = {"content-type": "application/json", "user-agent": "local-llm-swarm"}
            if settings.backend_api_key is not None:
                key = settings.backend_api_key.get_secret_value()
                headers["authorization"] = f"Bearer {key}"
            client = AiohttpClient(settings.backend_url, headers=headers, **timeouts)
            owned.push_async_callback(client.aclose)
        assert isinstance(client, AiohttpClient)
        return OpenAIBackend(client, url=settings.backend_url, model=settings.model)
    if client is None:
        client = ollama_client(settings.backend_url, **timeouts)
        owned.push_async_callback(client.close)
    assert isinstance(client, ollama.AsyncClient)
    return Backend(client, url=settings.backend_url, model=settings.model, on_final=on_final)
