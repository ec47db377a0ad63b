"""The wrapper's core: one model, its limits and prompt style, in front of one backend.

Both APIs come here: a request becomes a ``Job`` (model pinned, limits checked, rendered
for the prompt style), which runs on the backend whole or streamed.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from schemas import ollama as api
from schemas.agents import AgentDefinition, Heartbeat
from services.common.errors import BadRequest, ServiceUnavailable
from services.common.streaming import close
from services.wrapper import translate
from services.wrapper.backend import Backend
from services.wrapper.openai_backend import OpenAIBackend
from services.wrapper.registration import agent_definition
from services.wrapper.settings import WrapperSettings
from services.wrapper.stats import Stats

Answer = api.ChatResponse | api.GenerateResponse


@dataclass(slots=True)
class Job:
    """A model call as the backend will see it."""

    request: api.ChatRequest | api.GenerateRequest
    prompt: str  # the text sent to the model, for estimates
    as_chat: bool  # a chat request sent as a completion: answers come back in chat shape


@dataclass
class Wrapper:
    settings: WrapperSettings
    backend: Backend | OpenAIBackend  # by the profile's backend kind
    stats: Stats
    clock: Callable[[], float]
    started: float
    created: int  # wall-clock seconds, for OpenAI's ``created``

    # --- jobs ----------------------------------------------------------------------------

    def chat_job(self, request: api.ChatRequest) -> Job:
        request = self._pin(request)
        if self.settings.prompt_style == "completion":
            completion = translate.completion_request(request, self.settings.completion_template)
            return self._checked(Job(completion, completion.prompt or "", as_chat=True))
        return self._checked(Job(request, translate.prompt_text(request), as_chat=False))

    def generate_job(self, request: api.GenerateRequest) -> Job:
        request = self._pin(request)
        return self._checked(Job(request, translate.prompt_text(request), as_chat=False))

    def _pin(self, request: Any) -> Any:
        """The wrapper serves its model, whatever name the client used, within its limit.

        A request for more tokens than ``max_tokens_limit`` is served up to the limit (its
        answer then finishes with "length"), not refused: the spec's own clients ask every
        wrapper for 500 tokens, the TLC's limit of 16 included, as Ollama's clients ask for
        more than a context holds and are answered up to it.
        """
        options = request.options
        requested = options.num_predict if options is not None else None
        limit = self.settings.max_tokens_limit
        update: dict[str, Any] = {}
        if request.model != self.settings.model:
            update["model"] = self.settings.model
        # Unset, -1 (no limit), -2 (fill the context) or over the limit: the limit.
        if requested is None or not 0 <= requested <= limit:
            update["options"] = (options or api.Options()).model_copy(update={"num_predict": limit})
        return request.model_copy(update=update) if update else request

    def _checked(self, job: Job) -> Job:
        limit = self.context_limit()
        if limit is not None:
            estimate = translate.estimate_tokens(job.prompt)
            if estimate > limit:
                raise BadRequest(
                    f"the prompt is about {estimate} tokens, more than the model's context "
                    f"length of {limit} tokens",
                    code="context_length_exceeded",
                    param="messages",
                )
        return job

    def context_limit(self) -> int | None:
        """The smaller of the configured and the measured context length."""
        facts = self.backend.facts
        known = [self.settings.context_length, facts and facts.context_length]
        return min((value for value in known if value), default=None)

    # --- running -------------------------------------------------------------------------

    async def run(self, job: Job) -> Answer:
        if isinstance(job.request, api.ChatRequest):
            return await self.backend.chat(job.request)
        answer = await self.backend.generate(job.request)
        return translate.chat_answer(answer) if job.as_chat else answer

    def stream(self, job: Job) -> AsyncIterator[Answer]:
        if isinstance(job.request, api.ChatRequest):
            return self.backend.chat_stream(job.request)
        parts = self.backend.generate_stream(job.request)
        return _map(parts, translate.chat_answer) if job.as_chat else parts

    # --- health and registration ---------------------------------------------------------

    def uptime(self) -> float:
        return round(self.clock() - self.started, 3)

    async def agent_definition(self) -> AgentDefinition:
        facts = await self.backend.model_facts()
        return agent_definition(self.settings, facts, self.context_limit())

    async def heartbeat(self) -> Heartbeat:
        status = await self.backend.probe()
        return Heartbeat(
            status="passing" if status.healthy else "critical",
            output=(status.reason or "")[:1024],
            load=self.stats.load(),
        )


def answer_text(answer: Answer) -> str:
    return answer.message.content if isinstance(answer, api.ChatResponse) else answer.response


async def first_chunk(stream: AsyncIterator[Answer]) -> Answer:
    """The first chunk, before the response starts: failures until then keep their status."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise ServiceUnavailable(
            "the model backend ended the stream without an answer", code="backend_error"
        ) from None


async def _map(stream: AsyncIterator[Any], convert: Callable[[Any], Any]) -> AsyncIterator[Any]:
    try:
        async for item in stream:
            yield convert(item)
    finally:
        await close(stream)


def wrapper_of(request: Request) -> Wrapper:
    """The app's wrapper. Routes take the ``Request`` rather than a ``Depends``: FastAPI's
    dependency resolution costs about 0.1 ms of CPU per call, a tenth of the hop budget."""
    return request.app.state.wrapper


def wall_clock() -> int:
    return int(time.time())


_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count(1)


def new_completion_id() -> str:
    """A unique OpenAI completion id: random per process, then counted (no syscall)."""
    return f"chatcmpl-{_ID_PREFIX}{next(_ID_COUNTER):010x}"
