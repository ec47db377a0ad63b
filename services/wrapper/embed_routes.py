"""Embeddings on the wrapper: OpenAI's ``/v1/embeddings``, Ollama's ``/api/embed`` and
legacy ``/api/embeddings``, for either backend kind.

- An Ollama-API backend embeds through the official client's ``embed``/``embeddings``;
  an OpenAI request is translated (its texts, ``dimensions``, ``truncate`` false as OpenAI
  refuses an input over the context; the answer cut and encoded as asked, ``usage`` from
  ``prompt_eval_count``, estimated when absent). Token-id input goes to the backend's own
  ``/v1/embeddings``: the Ollama API embeds text only.
- A ``kind: openai`` backend gets an OpenAI request as it came (with the wrapper's model);
  its answer is read whatever way it gives the vectors (``embeddings``) and answered as
  the caller asked. The Ollama API is served on top by translating.

The model is the wrapper's whatever the caller named. Bounds are the wrapper's: the body
size (plumbing), at most 2,048 inputs, no empty input on ``/v1`` (the schemas); errors in
each API's envelope. Every call is counted like a model call: its input tokens, no output.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from starlette.responses import Response

from schemas import ollama as api
from schemas import openai
from services.common.openapi import errors
from services.common.streaming import json_response
from services.common.strict_json import StrictJSONRoute
from services.wrapper import embeddings
from services.wrapper.openai_backend import OpenAIBackend
from services.wrapper.service import Wrapper, wrapper_of
from services.wrapper.stats import counting_failures
from services.wrapper.translate import estimate_tokens

router = APIRouter(tags=["Embeddings"], responses=errors(503), route_class=StrictJSONRoute)
PATHS = ("/v1/embeddings", "/api/embed", "/api/embeddings")


@router.post(
    "/v1/embeddings",
    response_model=openai.CreateEmbeddingResponse,
    summary="Embeddings (OpenAI)",
)
async def openai_embeddings(body: openai.EmbeddingRequest, request: Request) -> Response:
    wrapper = wrapper_of(request)
    call = wrapper.stats.begin("openai_embeddings", False, "embeddings")
    with counting_failures(call):
        answer = await _openai_embeddings(wrapper, body, request)
        call.done(answer.usage.prompt_tokens, 0)
    return json_response(answer)


async def _openai_embeddings(
    wrapper: Wrapper, body: openai.EmbeddingRequest, request: Request
) -> openai.CreateEmbeddingResponse:
    model = wrapper.settings.model
    backend = wrapper.backend
    texts = embeddings.texts_of(body)
    if isinstance(backend, OpenAIBackend) or texts is None:
        sent = json.loads(await request.body()) | {"model": model}
        if isinstance(backend, OpenAIBackend):
            answer = await backend.forward_embeddings(sent)
        else:
            answer = await backend.embed_token_ids(sent)
        vectors, tokens = embeddings.vectors_of(answer)
    else:
        asked = api.EmbedRequest(
            model=model, input=texts, truncate=False, dimensions=body.dimensions
        )
        embedded = await backend.embed(asked)
        vectors, tokens = embedded.embeddings, embedded.prompt_eval_count
    if tokens is None:
        tokens = embeddings.estimated_tokens(body)
    return embeddings.openai_answer(vectors, body, model=model, tokens=tokens)


@router.post(
    "/api/embed",
    response_model=api.EmbedResponse,
    response_model_exclude_none=True,
    summary="Embed (Ollama)",
)
async def embed(body: api.EmbedRequest, request: Request) -> Response:
    wrapper = wrapper_of(request)
    call = wrapper.stats.begin("ollama_embed", False, "embeddings")
    with counting_failures(call):
        answer = await wrapper.backend.embed(body.model_copy(update=_model(wrapper)))
        tokens = answer.prompt_eval_count
        if tokens is None:
            texts = [body.input] if isinstance(body.input, str) else body.input or []
            tokens = sum(estimate_tokens(text) for text in texts) if answer.embeddings else 0
        call.done(tokens, 0)
    return json_response(answer)


@router.post(
    "/api/embeddings",
    response_model=api.EmbeddingsResponse,
    summary="Embedding, legacy (Ollama)",
)
async def legacy_embeddings(body: api.EmbeddingsRequest, request: Request) -> Response:
    wrapper = wrapper_of(request)
    call = wrapper.stats.begin("ollama_embeddings", False, "embeddings")
    with counting_failures(call):
        answer = await wrapper.backend.embeddings(body.model_copy(update=_model(wrapper)))
        # Ollama's legacy answer counts nothing: estimated.
        call.done(estimate_tokens(body.prompt or "") if answer.embedding else 0, 0)
    return json_response(answer)


def _model(wrapper: Wrapper) -> dict[str, str]:
    return {"model": wrapper.settings.model}
