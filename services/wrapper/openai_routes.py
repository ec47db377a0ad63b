"""The OpenAI side: ``/v1/chat/completions`` (and ``/chat/completions``), ``/v1/models``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import Response

from schemas import ollama as api
from schemas import openai
from schemas.errors import ErrorEnvelope
from services.common.errors import ServiceUnavailable
from services.common.openapi import SSE, errors, streaming
from services.common.streaming import SSE_DONE, json_response, sse, sse_error, sse_response
from services.common.strict_json import StrictJSONRoute
from services.wrapper import forwarded, translate
from services.wrapper.openai_backend import OpenAIBackend
from services.wrapper.service import (
    Job,
    close,
    first_chunk,
    new_completion_id,
    wall_clock,
    wrapper_of,
)
from services.wrapper.stats import Call, counting_failures, stream_failure

router = APIRouter(tags=["OpenAI"], responses=errors(503), route_class=StrictJSONRoute)
_STREAMED = "JSON, or SSE events of chunks ending `data: [DONE]` when `stream` is true; a "
_STREAMED += "failure after the first event is an event of the error envelope."


@router.post(
    "/v1/chat/completions",
    response_model=openai.ChatCompletion,
    responses=streaming(SSE, openai.ChatCompletionChunk, ErrorEnvelope, description=_STREAMED)
    | errors(502),
    summary="Chat completion",
)
@router.post("/chat/completions", response_model=openai.ChatCompletion, include_in_schema=False)
async def chat_completions(body: openai.ChatCompletionRequest, request: Request) -> Response:
    wrapper = wrapper_of(request)
    settings = wrapper.settings
    if isinstance(wrapper.backend, OpenAIBackend) and settings.prompt_style == "chat":
        # An OpenAI server takes the call as it is (tools and tool_choice too): nothing to
        # translate; the tools are checked on the way (translate.ollama_chat_request).
        return await forwarded.forward(wrapper, wrapper.backend, body, await request.body())
    call = wrapper.stats.begin("openai", body.stream)
    with counting_failures(call):
        limit = settings.max_tokens_limit
        job = wrapper.chat_job(translate.ollama_chat_request(body, settings.model, limit))
        completion_id = new_completion_id()
        created = wall_clock()
        if not body.stream:
            answer = await wrapper.run(job)
            assert isinstance(answer, api.ChatResponse)
            usage = translate.usage(answer, prompt=job.prompt, completion=answer.message.content)
            call.done(usage.prompt_tokens, usage.completion_tokens)
            completion = translate.chat_completion(
                answer, completion_id=completion_id, created=created, usage=usage
            )
            return json_response(completion)
        stream = wrapper.stream(job)
        first = await first_chunk(stream)
    call.first_token()
    events = _events(first, stream, call, job, completion_id, created, body.include_usage)
    return sse_response(events)


async def _events(
    first: api.ChatResponse,
    stream: AsyncIterator[api.ChatResponse],
    call: Call,
    job: Job,
    completion_id: str,
    created: int,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    model = first.model

    def event(
        delta: openai.ChunkDelta | None = None,
        finish: openai.FinishReason | None = None,
        logprobs: openai.ChoiceLogprobs | None = None,
    ) -> bytes:
        return sse(
            translate.chunk(
                completion_id, created, model, delta=delta, finish=finish, logprobs=logprobs
            )
        )

    chunks = 0
    tool_calls = False
    final = None
    # OpenAI's first chunk names the role; it goes out with the first content, one write.
    head = event(openai.ChunkDelta(role="assistant", content=""))
    try:
        piece = first
        while True:
            message = piece.message
            calls = translate.chunk_tool_calls(message.tool_calls, completion_id)
            if message.content or calls or piece.logprobs:
                chunks += 1 if message.content else 0
                tool_calls = tool_calls or bool(calls)
                delta = openai.ChunkDelta(content=message.content or None, tool_calls=calls)
                yield head + event(delta, logprobs=translate.openai_logprobs(piece.logprobs))
                head = b""
            if piece.done:
                final = piece
                break
            piece = await anext(stream, None)
            if piece is None:
                break
        if final is None:
            raise ServiceUnavailable(
                "the model backend ended the stream before the answer was complete",
                code="backend_error",
            )
        usage = translate.usage(final, prompt=job.prompt, chunks=chunks)
        call.done(usage.prompt_tokens, usage.completion_tokens)
        tail = head + event(finish=translate.finish_reason(final.done_reason, tool_calls))
        if include_usage:
            tail += sse(translate.usage_chunk(completion_id, created, model, usage))
        yield tail + SSE_DONE  # the end in one write
    except Exception as exc:
        yield head + sse_error(stream_failure(call, exc)) + SSE_DONE
    finally:
        # Ollama counts the prompt only in its last chunk: a stream left early estimates it.
        call.cancelled(translate.estimate_tokens(job.prompt), chunks)  # no-op once ended
        await close(stream)


@router.get("/v1/models", response_model=openai.ModelList, summary="The model served")
async def models(request: Request) -> Response:
    wrapper = wrapper_of(request)
    model = openai.Model(
        id=wrapper.settings.model, created=wrapper.created, owned_by="local-llm-swarm"
    )
    return json_response(openai.ModelList(data=[model]))
