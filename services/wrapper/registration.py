"""Being discoverable: register with the registry, heartbeat, deregister.

Registration retries with exponential backoff and full jitter until a registry answers
(the wrapper serves meanwhile; with several registry replicas, each request tries them in
turn, see services.common.http.Failover); heartbeats carry the wrapper's own check and its load; a
404 (the registry forgot the agent), a changed definition (model facts learnt late) or a
heartbeat acknowledging another definition than the one registered (someone replaced the
record: the ack carries its fingerprint, so noticing costs no request) registers again; a
graceful shutdown deregisters.

A wrapper registers ``embedding`` when its backend embeds: the profile may list it, and
otherwise the wrapper asks the backend with a real one-input embed at the first heartbeat
that finds the backend healthy (``EmbeddingProbe``). ``/api/show`` cannot tell: it lists
only "completion" for SmolLM2, which embeds. A backend that is down or busy is asked again
at the next beat; any other failure (a server without an embeddings endpoint, a model that
cannot embed) is a no, for the process's life. The yes changes the definition: the same
beat registers it again, before its heartbeat. ``probe_embedding: false`` in the profile
keeps a chat model out of ``capability:embedding`` (its vectors do not compare with a
dedicated embedder's); its endpoints still embed when called by name.
"""

from __future__ import annotations

import asyncio
import logging
import random as random_module
from collections.abc import Awaitable, Callable

import httpx
from pydantic import SecretStr

from schemas.agents import AgentDefinition, AgentRecord, Heartbeat, definition_fingerprint
from schemas.health import ModelInfo
from schemas.ollama import EmbedRequest
from services.common.backoff import backoff_delay
from services.common.errors import SwarmError
from services.common.http import Failover
from services.wrapper.backend import Backend
from services.wrapper.openai_backend import OpenAIBackend
from services.wrapper.settings import WrapperSettings

log = logging.getLogger(__name__)

DEREGISTER_TIMEOUT_SECONDS = 2.0
RECOVERY_SECONDS = 1.0  # the heartbeat interval while the backend is not passing

Sleep = Callable[[float], Awaitable[None]]

EMBEDDING = "embedding"  # the capability of a wrapper whose backend embeds
# Failures that say nothing of whether the backend embeds: it is asked again later.
_NOT_AN_ANSWER = frozenset({"backend_unavailable", "backend_timeout", "backend_busy"})


def agent_definition(
    settings: WrapperSettings, facts: ModelInfo | None, context_length: int | None
) -> AgentDefinition:
    """What the wrapper registers: its labels, its own URL, and the model's measured facts.

    ``context_length`` is what a caller may send (the smaller of the configured and the
    measured length); ``model_context_length`` is what the model was trained for.
    """
    metadata = {
        "model": settings.model,
        "parameters": facts and facts.parameters,
        "quantization": facts and facts.quantization,
        "context_length": context_length,
        "model_context_length": facts and facts.context_length,
        "embedding_dim": facts and facts.embedding_dim,
        "prompt_style": settings.prompt_style,
        "backend": settings.backend_url,
    }
    return AgentDefinition(
        agent_id=settings.agent_id,
        name=settings.name,
        tier=settings.tier,
        locality=settings.locality,
        role=settings.role,
        capabilities=settings.capabilities,
        endpoint=settings.endpoint,
        cost_per_1k_tokens=settings.cost_per_1k_tokens,
        metadata={key: value for key, value in metadata.items() if value is not None},
    )


class EmbeddingProbe:
    """Whether the backend embeds (``embeds``; None: not known yet), asked with a real
    one-input embed (``ask``, once the backend is healthy) until it has said yes or no."""

    def __init__(self, backend: Backend | OpenAIBackend, *, enabled: bool = True) -> None:
        self.backend = backend
        # A profile that turned the probe off has said no.
        self.embeds: bool | None = None if enabled else False

    async def ask(self) -> None:
        if self.embeds is None:
            probe = EmbedRequest(model=self.backend.model, input="embedding probe")
            try:
                self.embeds = bool((await self.backend.embed(probe)).embeddings)
            except SwarmError as exc:
                if exc.code not in _NOT_AN_ANSWER:
                    self.embeds = False
                    log.info("the backend does not embed (%s): no embedding", exc.message)
            except Exception:
                self.embeds = False
                log.exception("the embedding probe failed: no embedding")


def with_embedding(definition: AgentDefinition, embeds: bool) -> AgentDefinition:
    """``definition`` with the ``embedding`` capability when the backend embeds."""
    if not embeds or EMBEDDING in definition.capabilities:
        return definition
    capabilities = [*definition.capabilities, EMBEDDING]
    return definition.model_copy(update={"capabilities": capabilities})


class Registrar:
    """Registers and heartbeats with the registries of ``http``: whichever replica answers
    (services.common.http.Failover); the registration is the shared database's, so it
    carries over to the next replica, and one that does not know the agent answers 404."""

    def __init__(
        self,
        http: Failover | httpx.AsyncClient,
        *,
        definition: Callable[[], Awaitable[AgentDefinition]],
        check: Callable[[], Awaitable[Heartbeat]],
        interval: float,
        token: SecretStr | None = None,
        sleep: Sleep = asyncio.sleep,
        random: Callable[[], float] = random_module.random,
    ) -> None:
        self.http = http
        self.definition = definition
        self.check = check
        self.interval = interval
        self.headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        self.sleep = sleep
        self.random = random
        self.registered: AgentDefinition | None = None
        # Of the record the registration was answered with; None: unknown, never compared.
        self.fingerprint: str | None = None
        self.passing = False  # what the last heartbeat said

    async def run(self) -> None:
        """Register, then heartbeat every interval until cancelled. The first heartbeat
        follows the registration at once: it tells the registry the backend's state.
        While that state is not passing, the heartbeat comes every second instead, so a
        backend that comes up (a model host still loading) is routable within a second."""
        await self.register()
        while True:
            try:
                await self.beat()
            except httpx.HTTPError as exc:
                log.warning("heartbeat failed, registry unreachable: %s", _describe(exc))
            except Exception:
                log.exception("heartbeat failed")
            interval = self.interval if self.passing else min(self.interval, RECOVERY_SECONDS)
            await self.sleep(interval)

    async def register(self) -> None:
        """Register, retrying with backoff until the registry accepts."""
        attempt = 0
        while True:
            try:
                definition = await self.definition()
                response = await self.http.post(
                    "/register", json=definition.model_dump(mode="json"), headers=self.headers
                )
            except httpx.HTTPError as exc:
                problem = f"registry unreachable: {_describe(exc)}"
            except Exception as exc:
                log.exception("registration failed")
                problem = _describe(exc)
            else:
                if response.status_code == 200:
                    self.registered = definition
                    self.fingerprint = _fingerprint_of(response)
                    log.info(
                        "registered %s at %s with the registry at %s",
                        definition.agent_id,
                        definition.endpoint,
                        self.http.base_url,
                    )
                    return
                problem = f"registry answered {response.status_code}: {response.text[:200]}"
            delay = backoff_delay(attempt, self.random)
            log.warning("registration failed (%s); retrying in %.2f s", problem, delay)
            attempt += 1
            await self.sleep(delay)

    async def beat(self) -> None:
        if await self.definition() != self.registered:
            await self.register()
            return
        beat = await self.check()
        if await self.definition() != self.registered:  # the check learnt something new
            await self.register()
        assert self.registered is not None
        self.passing = beat.status == "passing"
        response = await self.http.post(
            f"/heartbeat/{self.registered.agent_id}",
            json=beat.model_dump(exclude_none=True),
            headers=self.headers,
        )
        agent_id = self.registered.agent_id
        if response.status_code == 404:
            log.info("the registry does not know %s: registering again", agent_id)
            await self.register()
        elif response.status_code != 200:
            log.warning("heartbeat refused: %s %s", response.status_code, response.text[:200])
        elif self._replaced(response):
            log.warning(
                "the registry holds another definition of %s than the one registered "
                "(another registration replaced it): registering ours again",
                agent_id,
            )
            await self.register()

    def _replaced(self, ack: httpx.Response) -> bool:
        try:
            held = ack.json().get("fingerprint")
        except (ValueError, AttributeError):
            return False
        return None not in (held, self.fingerprint) and held != self.fingerprint

    async def deregister(self) -> None:
        if self.registered is None:
            return
        agent_id = self.registered.agent_id
        try:
            response = await self.http.delete(
                f"/agents/{agent_id}", headers=self.headers, timeout=DEREGISTER_TIMEOUT_SECONDS
            )
        except httpx.HTTPError as exc:
            log.warning("could not deregister %s: %s", agent_id, _describe(exc))
            return
        if response.status_code in (204, 404):
            log.info("deregistered %s", agent_id)
            self.registered = None
        else:
            log.warning("deregistration refused: %s %s", response.status_code, response.text[:200])


def _fingerprint_of(registered: httpx.Response) -> str | None:
    """The fingerprint of the record a registration was answered with (what the registry
    computed and stored), or None when the answer is not a record."""
    try:
        return definition_fingerprint(AgentRecord.model_validate_json(registered.content))
    except ValueError:
        return None


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
