"""The wrapper's core: one model, its limits and prompt style, in front of one backend.

Both APIs come here: a request becomes a ``Job`` (model pinned, limits checked, rendered
for the prompt style), which runs on the backend whole or streamed.

What comes back is checked against what was asked, on every Ollama-API backend: an answer
whose text is all a JSON call of the request's tools becomes ``tool_calls`` (a backend
whose template marks calls otherwise gives the call as content), and an answer asked for
in a JSON ``format`` that ended normally must parse (and validate, for a schema): one that
does not is a 502 ``upstream_invalid_json`` (streamed: the stream's error event), as the
backend ignored the format. An answer cut short ("length") is passed on as it is.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from schemas import ollama as api
from schemas.agents import AgentDefinition, Heartbeat
from services.common.errors import BadGateway, BadRequest, ServiceUnavailable
from services.common.streaming import close
from services.common.tool_calls import CallWatch, ToolSpec, is_valid_json, parse_calls, tool_specs
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
    tools: list[ToolSpec] = field(default_factory=list)  # an answer that calls them is a call

    @property
    def format(self) -> api.Format:
        """The JSON format the answer was asked in, if any."""
        return self.request.format


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
        tools = tool_specs(request.tools)
        request = self._pin(request)
        if self.settings.prompt_style == "completion":
            completion = translate.completion_request(request, self.settings.completion_template)
            return self._checked(Job(completion, completion.prompt or "", True, tools))
        return self._checked(Job(request, translate.prompt_text(request), False, tools))

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
            answer: Answer = await self.backend.chat(job.request)
        else:
            answer = await self.backend.generate(job.request)
            answer = translate.chat_answer(answer) if job.as_chat else answer
        return checked_answer(job, answer)

    def stream(self, job: Job) -> AsyncIterator[Answer]:
        if isinstance(job.request, api.ChatRequest):
            parts = self.backend.chat_stream(job.request)
        else:
            parts = self.backend.generate_stream(job.request)
            parts = _map(parts, translate.chat_answer) if job.as_chat else parts
        return _checked_stream(job, parts) if job.tools or job.format else parts

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


def checked_answer(job: Job, answer: Answer) -> Answer:
    """``answer`` with a call in its text as ``tool_calls``; a 502 for one that ignored
    the JSON format it was asked in."""
    if not isinstance(answer, api.ChatResponse):
        check_format(job.format, answer.done_reason, answer.response)
        return answer
    if answer.message.tool_calls:
        return answer
    calls = parse_calls(answer.message.content, job.tools) if job.tools else None
    if calls:
        return _with_calls(answer, calls)
    check_format(job.format, answer.done_reason, answer.message.content)
    return answer


async def _checked_stream(job: Job, parts: AsyncIterator[Answer]) -> AsyncIterator[Answer]:
    """``checked_answer`` for a stream: text that may be a call is held back to the end
    (then sent as one chunk of calls, as Ollama streams them, or as text); the format is
    checked at the end (an error raised in place of the done chunk)."""
    watch = CallWatch(job.tools) if job.tools else None
    texts: list[str] = []
    called = False
    try:
        async for part in parts:
            text = answer_text(part)
            texts.append(text)
            if isinstance(part, api.ChatResponse):
                called = called or bool(part.message.tool_calls)
                if watch is not None:
                    out = watch.feed(text) if text else ""
                    if part.done:
                        held, calls = watch.finish()
                        if calls:
                            called = True
                            yield _chunk_before(part, _with_calls(part, calls).message)
                        out += held
                    if out != text:
                        part = _with_text(part, out)
                    if not (part.done or out or part.message.tool_calls):
                        continue  # held back (a chunk of logprobs only loses them)
            if part.done and not called:
                check_format(job.format, part.done_reason, "".join(texts))
            yield part
    finally:
        await close(parts)


def _chunk_before(done: api.ChatResponse, message: api.Message) -> api.ChatResponse:
    """A chunk of ``message`` to send before the done chunk (no end, no counts)."""
    return api.ChatResponse(
        model=done.model, created_at=done.created_at, done=False, message=message
    )


def _with_text(answer: api.ChatResponse, text: str) -> api.ChatResponse:
    message = answer.message.model_copy(update={"content": text})
    return answer.model_copy(update={"message": message})


def _with_calls(answer: api.ChatResponse, calls: list[Any]) -> api.ChatResponse:
    message = answer.message.model_copy(
        update={"content": "", "tool_calls": translate.ollama_calls(calls)}
    )
    return answer.model_copy(update={"message": message})


def check_format(format: api.Format, done_reason: str | None, text: str) -> None:
    """502 when an answer asked in a JSON ``format`` ended normally but is not that JSON."""
    if format is None or done_reason == "length":
        return
    schema = format if isinstance(format, dict) else None
    if not is_valid_json(text, schema):
        wanted = "JSON valid against the schema asked" if schema is not None else "JSON"
        raise BadGateway(
            f"the model backend ignored the format: its answer is not {wanted}",
            code="upstream_invalid_json",
        )


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
