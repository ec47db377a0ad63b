"""Embeddings between OpenAI's and Ollama's shapes, for the wrapper's embedding routes.

Vectors travel as floats. OpenAI's ``base64`` is the little-endian float32 bytes of a
vector; ``dimensions`` keeps a vector's first values, normalised again (as Ollama and the
embedded host do). An OpenAI-compatible server's answer is read whatever way it gives the
vectors: floats, base64, or one vector per token (llama-cpp-python's server for a model
without pooling, such as SmolLM2), which is pooled as Ollama pools such a model: the last
token's vector.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from collections.abc import Sequence
from typing import Any

from schemas import openai
from services.common.errors import ServiceUnavailable
from services.wrapper.translate import estimate_tokens

Vector = list[float]


def texts_of(request: openai.EmbeddingRequest) -> list[str] | None:
    """The texts of an OpenAI request, in order; None when its input is token ids."""
    given = request.input
    if isinstance(given, str):
        return [given]
    return given if isinstance(given[0], str) else None  # type: ignore[return-value]


def inputs_of(request: openai.EmbeddingRequest) -> int:
    """How many vectors the request asks for."""
    given = request.input
    if isinstance(given, str) or isinstance(given[0], int):
        return 1
    return len(given)


def estimated_tokens(request: openai.EmbeddingRequest) -> int:
    """The input's tokens when the backend does not count them: token ids counted, text
    estimated as the chat path estimates a prompt."""
    texts = texts_of(request)
    if texts is not None:
        return sum(estimate_tokens(text) for text in texts)
    given = request.input
    return len(given) if isinstance(given[0], int) else sum(len(ids) for ids in given)  # type: ignore[arg-type,misc]


def normalised(vector: Sequence[float]) -> Vector:
    norm = math.sqrt(math.fsum(value * value for value in vector))
    return [value / norm for value in vector] if norm else list(vector)


def cut(vector: Vector, dimensions: int | None) -> Vector:
    """The first ``dimensions`` values, normalised again; the vector as it is when it is
    no longer (the backend cut it already, or none was asked)."""
    if dimensions is None or len(vector) <= dimensions:
        return vector
    return normalised(vector[:dimensions])


def encoded(vector: Vector, encoding_format: str | None) -> Vector | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def decoded(value: str) -> Vector:
    raw = base64.b64decode(value, validate=True)
    if len(raw) % 4:
        raise ValueError("base64 of float32 values is a multiple of 4 bytes")
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def vectors_of(answer: Any, *, pooled_unit: bool = True) -> tuple[list[Vector], int | None]:
    """The vectors of an OpenAI embeddings answer, in ``index`` order, and its prompt
    tokens (None when it gives none). A vector given per token is pooled (the last
    token's), normalised when ``pooled_unit`` (an API whose vectors are unit length)."""
    try:
        data = sorted(answer["data"], key=lambda item: item.get("index", 0))
        vectors = [_vector(item["embedding"], pooled_unit) for item in data]
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
        raise bad_answer(f"{type(exc).__name__}: {exc}"[:200]) from None
    usage = answer.get("usage") if isinstance(answer, dict) else None
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return vectors, tokens if isinstance(tokens, int) and tokens >= 0 else None


def _vector(value: Any, pooled_unit: bool) -> Vector:
    if isinstance(value, str):
        return decoded(value)
    if not isinstance(value, list) or not value:
        raise ValueError("an embedding that is neither floats nor base64")
    if all(isinstance(row, list) for row in value):  # one vector per token
        last = _floats(value[-1])
        return normalised(last) if pooled_unit else last
    return _floats(value)


def _floats(values: list[Any]) -> Vector:
    if not values or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        raise ValueError("an embedding holds something other than finite numbers")
    return [float(value) for value in values]


def openai_answer(
    vectors: list[Vector], request: openai.EmbeddingRequest, *, model: str, tokens: int
) -> openai.CreateEmbeddingResponse:
    """The answer to ``request``: one vector per input, cut and encoded as it asks."""
    if len(vectors) != inputs_of(request):
        raise bad_answer(f"{len(vectors)} vectors for {inputs_of(request)} inputs")
    data = [
        openai.Embedding(
            embedding=encoded(cut(vector, request.dimensions), request.encoding_format),
            index=index,
        )
        for index, vector in enumerate(vectors)
    ]
    usage = openai.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return openai.CreateEmbeddingResponse(data=data, model=model, usage=usage)


def bad_answer(what: str) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"the model backend sent embeddings that are not the API's: {what}",
        code="backend_bad_answer",
    )
