"""The Ollama side: ``/api/chat``, ``/api/generate`` (and ``/generate``), and the metadata
routes the official ``ollama`` client and Ollama tools use."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from schemas import ollama as api
from schemas.errors import OllamaError
from services.common.errors import ServiceUnavailable
from services.common.openapi import NDJSON, OLLAMA_STREAMED, errors, streaming
from services.common.streaming import json_response, ndjson, ndjson_error, ndjson_response
from services.common.strict_json import StrictJSONRoute
from services.wrapper import translate
from services.wrapper.backend import canonical_model_name
from services.wrapper.service import (
    Answer,
    Job,
    Wrapper,
    answer_text,
    close,
    first_chunk,
    wrapper_of,
)
from services.wrapper.stats import Call, counting_failures, stream_failure

# Every route may need the backend; the 400s, 413s and 422s are documented for all routes.
router = APIRouter(tags=["Ollama"], responses=errors(503), route_class=StrictJSONRoute)


@router.post(
    "/api/chat",
    response_model=api.ChatResponse,
    responses=streaming(NDJSON, api.ChatResponse, OllamaError, description=OLLAMA_STREAMED)
    | errors(502),
    summary="Chat",
)
async def chat(body: api.ChatRequest, request: Request) -> Response:
    wrapper = wrapper_of(request)
    return await _model_call(wrapper, "ollama_chat", body, wrapper.chat_job)


@router.post(
    "/api/generate",
    response_model=api.GenerateResponse,
    responses=streaming(NDJSON, api.GenerateResponse, OllamaError, description=OLLAMA_STREAMED)
    | errors(502),
    summary="Generate",
)
@router.post("/generate", response_model=api.GenerateResponse, include_in_schema=False)
async def generate(body: api.GenerateRequest, request: Request) -> Response:
    wrapper = wrapper_of(request)
    return await _model_call(wrapper, "ollama_generate", body, wrapper.generate_job)


async def _model_call(
    wrapper: Wrapper, api_name: str, body: Any, make_job: Callable[[Any], Job]
) -> Response:
    """Run a chat or generate request: whole, or NDJSON once the first chunk is in."""
    call = wrapper.stats.begin(api_name, body.stream)
    with counting_failures(call):
        job = make_job(body)
        if not body.stream:
            answer = await wrapper.run(job)
            usage = translate.usage(answer, prompt=job.prompt, completion=answer_text(answer))
            call.done(usage.prompt_tokens, usage.completion_tokens)
            return json_response(answer)
        parts = wrapper.stream(job)
        first = await first_chunk(parts)
    call.first_token()
    return ndjson_response(_lines(first, parts, call, job))


async def _lines(
    first: Answer, parts: AsyncIterator[Answer], call: Call, job: Job
) -> AsyncIterator[bytes]:
    chunks = 0
    try:
        piece: Answer | None = first
        while piece is not None:
            chunks += 1 if answer_text(piece) else 0
            if piece.done:
                usage = translate.usage(piece, prompt=job.prompt, chunks=chunks)
                call.done(usage.prompt_tokens, usage.completion_tokens)
                yield ndjson(piece)
                return
            yield ndjson(piece)
            piece = await anext(parts, None)
        raise ServiceUnavailable(
            "the model backend ended the stream before the answer was complete",
            code="backend_error",
        )
    except Exception as exc:
        yield ndjson_error(stream_failure(call, exc))
    finally:
        # Ollama counts the prompt only in its last chunk: a stream left early estimates it.
        call.cancelled(translate.estimate_tokens(job.prompt), chunks)  # no-op once ended
        await close(parts)


# --- metadata ------------------------------------------------------------------------------


@router.get("/api/tags", response_model=api.ListResponse, summary="The model served")
async def tags(request: Request) -> Response:
    """The backend's entry for the wrapper's model (empty when the backend lacks it)."""
    wrapper = wrapper_of(request)
    listing = await wrapper.backend.tags()
    wanted = canonical_model_name(wrapper.settings.model)
    served = [item for item in listing.models if canonical_model_name(item.model) == wanted]
    return json_response(api.ListResponse(models=served))


@router.get("/api/version", response_model=api.VersionResponse, summary="The backend's version")
async def version(request: Request) -> Response:
    return json_response(await wrapper_of(request).backend.version())


@router.post("/api/show", response_model=api.ShowResponse, summary="About the model served")
async def show(body: api.ShowRequest, request: Request) -> Response:
    wrapper = wrapper_of(request)
    return json_response(await wrapper.backend.show(wrapper.settings.model))


@router.get("/api/ps", response_model=api.ProcessResponse, summary="Models loaded (backend)")
async def ps(request: Request) -> Response:
    return json_response(await wrapper_of(request).backend.ps())
