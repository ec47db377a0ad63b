"""Embeddings over the host's model: Ollama's ``/api/embed`` and legacy ``/api/embeddings``,
OpenAI's ``/v1/embeddings`` (how they are computed: ``embedder``).

As Ollama:
- ``/api/embed`` and ``/v1/embeddings`` give unit-length vectors, ``/api/embeddings`` the
  model's own; ``dimensions`` keeps the first values and normalises them again (meaningful
  for models trained for it; 400 beyond the model's ``n_embd``);
- ``/api/embed`` cuts an input longer than the context unless ``truncate`` is false (then
  400), and so does the legacy endpoint; ``/v1/embeddings`` refuses it (400), as OpenAI;
- an empty ``input`` (``/api/embed``) or ``prompt`` (``/api/embeddings``) only loads the
  model: 200 with no vectors. ``/v1/embeddings`` refuses empty input (422, OpenAI's rule);
- ``options`` and ``keep_alive`` are ignored (the model stays as loaded).

A request holds the model once for all its inputs, in the host's queue like a generation
(a full queue is a 503 with ``Retry-After``); its inputs are bounded in number
(``MAX_EMBED_INPUTS``) and in tokens all told (``max_embed_tokens``).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from functools import partial

import anyio
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from schemas.ollama import EmbeddingsRequest, EmbeddingsResponse, EmbedRequest, EmbedResponse
from schemas.openai import (
    CreateEmbeddingResponse,
    Embedding,
    EmbeddingRequest,
    EmbeddingUsage,
)
from services.common.errors import BadRequest
from services.common.metrics import CLIENT_CLOSED_REQUEST
from services.common.openapi import errors
from services.common.strict_json import StrictJSONRoute
from services.modelhost.embedder import Embedded, normalised
from services.modelhost.engine import Engine
from services.modelhost.routes import _cancel_on_disconnect, _check_model, _engine, _json

router = APIRouter(route_class=StrictJSONRoute)


def _tokens(engine: Engine, texts: Sequence[str], *, truncate: bool) -> list[list[int]]:
    """Each text's tokens, cut to the context when ``truncate``, else refused beyond it."""
    inputs = []
    for i, text in enumerate(texts):
        tokens = engine.tokenize(text)
        if not tokens:
            raise BadRequest(f"input {i} is empty: there is nothing to embed")
        inputs.append(_fit(engine, tokens, truncate=truncate))
    return inputs


def _fit(engine: Engine, tokens: list[int], *, truncate: bool) -> list[int]:
    if len(tokens) <= engine.n_ctx:
        return tokens
    if truncate:
        return tokens[: engine.n_ctx]
    raise BadRequest(
        f"the input length ({len(tokens)} tokens) exceeds the context length "
        f"({engine.n_ctx} tokens)"
    )


def _check_dimensions(engine: Engine, dimensions: int | None) -> None:
    if dimensions is not None and dimensions > engine.embedder.n_embd:
        raise BadRequest(
            f"dimensions {dimensions} is more than the model's {engine.embedder.n_embd}",
            param="dimensions",
        )


async def _embed(request: Request, engine: Engine, inputs: list[list[int]]) -> Embedded | None:
    """The vectors of ``inputs``, in a turn of the host's queue; None when the client went
    away first (its turn, queued or running, is given up)."""
    total = sum(len(tokens) for tokens in inputs)
    limit = request.app.state.settings.max_embed_tokens
    if total > limit:
        raise BadRequest(f"the inputs hold {total} tokens, more than {limit} in one request")
    ticket = engine.queue.enter()
    embedded = None
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(_cancel_on_disconnect, request, group.cancel_scope)
            embedded = await engine.embed(inputs, ticket)
            group.cancel_scope.cancel()
    finally:
        ticket.leave()  # nothing once the turn has handed the model on
    return embedded


def _short_floats(vector: np.ndarray) -> list[float]:
    # The shortest text that reads back as the same float32, as Ollama writes them (a
    # float64 repr of a float32 has twice the digits).
    return [float(str(value)) for value in vector.astype(np.float32)]


def _cut(vector: np.ndarray, dimensions: int | None) -> np.ndarray:
    return normalised(vector[:dimensions] if dimensions else vector)


@router.post(
    "/api/embed",
    response_model=EmbedResponse,
    response_model_exclude_none=True,
    responses=errors(404, 503),
)
async def embed(body: EmbedRequest, request: Request) -> Response:
    arrived = time.perf_counter_ns()
    engine = _engine(request)
    _check_model(engine, body.model)
    _check_dimensions(engine, body.dimensions)
    texts = [body.input] if isinstance(body.input, str) else body.input or []
    if not any(texts):  # Ollama drops an empty string input, then only loads the model
        return _json(EmbedResponse(model=body.model, embeddings=[]))
    truncate = body.truncate is not False
    inputs = await anyio.to_thread.run_sync(partial(_tokens, engine, texts, truncate=truncate))
    embedded = await _embed(request, engine, inputs)
    if embedded is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    answer = EmbedResponse(
        model=body.model,
        embeddings=[_short_floats(_cut(v, body.dimensions)) for v in embedded.vectors],
        total_duration=time.perf_counter_ns() - arrived,
        load_duration=embedded.ready_at - arrived,
        prompt_eval_count=embedded.tokens,
    )
    return _json(answer)


@router.post(
    "/api/embeddings",
    response_model=EmbeddingsResponse,
    responses=errors(404, 503),
)
async def embeddings(body: EmbeddingsRequest, request: Request) -> Response:
    engine = _engine(request)
    _check_model(engine, body.model)
    if not body.prompt:
        return _json(EmbeddingsResponse(embedding=[]))
    inputs = await anyio.to_thread.run_sync(partial(_tokens, engine, [body.prompt], truncate=True))
    embedded = await _embed(request, engine, inputs)
    if embedded is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    # Not normalised, and float64 as Ollama's legacy answer.
    return _json(EmbeddingsResponse(embedding=embedded.vectors[0].astype(np.float64).tolist()))


def _openai_tokens(engine: Engine, body: EmbeddingRequest) -> list[list[int]]:
    given = body.input
    if isinstance(given, str):
        return _tokens(engine, [given], truncate=False)
    if isinstance(given[0], str):
        return _tokens(engine, given, truncate=False)  # type: ignore[arg-type]
    token_lists = [given] if isinstance(given[0], int) else given
    inputs = []
    for tokens in token_lists:
        engine.check_tokens(tokens)  # type: ignore[arg-type]
        inputs.append(_fit(engine, list(tokens), truncate=False))  # type: ignore[arg-type]
    return inputs


@router.post(
    "/v1/embeddings",
    response_model=CreateEmbeddingResponse,
    response_model_exclude_none=True,
    responses=errors(404, 503),
)
async def openai_embeddings(body: EmbeddingRequest, request: Request) -> Response:
    engine = _engine(request)
    _check_model(engine, body.model)
    _check_dimensions(engine, body.dimensions)
    inputs = await anyio.to_thread.run_sync(partial(_openai_tokens, engine, body))
    embedded = await _embed(request, engine, inputs)
    if embedded is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    data = []
    for index, vector in enumerate(embedded.vectors):
        unit = _cut(vector, body.dimensions)
        if body.encoding_format == "base64":
            # OpenAI's base64: the float32 values' little-endian bytes.
            value: list[float] | str = base64.b64encode(unit.astype("<f4").tobytes()).decode()
        else:
            value = _short_floats(unit)
        data.append(Embedding(embedding=value, index=index))
    usage = EmbeddingUsage(prompt_tokens=embedded.tokens, total_tokens=embedded.tokens)
    return _json(CreateEmbeddingResponse(data=data, model=body.model, usage=usage))
