"""The model backend: an Ollama-API server reached through the official ``ollama`` client.

Every call goes through ``ollama.AsyncClient`` and comes back as the project's own models
(``schemas.ollama``); failures come back as the project's error types: backend down or
model missing -> 503, a prompt over the model's context -> 400.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import anyio
import httpx
import ollama
import pydantic

from schemas import ollama as api
from schemas.health import ModelInfo
from services.common.context import REQUEST_ID_HEADER, current_request_id
from services.common.errors import BadRequest, ServiceUnavailable, SwarmError

# What the ollama client raises: ResponseError for an error answer, ConnectionError when it
# cannot connect, httpx errors for timeouts and broken streams, ValueError (JSON, pydantic)
# for an answer that is not the Ollama API.
BACKEND_ERRORS = (ollama.ResponseError, ConnectionError, httpx.HTTPError, ValueError)
_CLIENT_REQUESTS = {"ChatRequest", "GenerateRequest"}  # the client's models of a request

# Ollama: "input length exceeds the context length"; llama.cpp: "Requested tokens (n)
# exceed context window of m"; the embedded host says the same in its words.
_CONTEXT_OVERFLOW = re.compile(r"exceed.*context|context.*(exceed|too (long|large|small))", re.I)
_MODEL_MISSING = re.compile(r"\bmodel\b.*\bnot found\b", re.I)
RETRY_AFTER_SECONDS = "5"  # when the backend gives none (Ollama never does)
RETRY_AFTER_CAP = 600  # seconds: a longer wait asked by a backend is not worth the caller's
_WHOLE_SECONDS = re.compile(r"[0-9]{1,9}")

T = TypeVar("T")


async def _send_request_id(request: httpx.Request) -> None:
    request_id = current_request_id()
    if request_id:
        request.headers[REQUEST_ID_HEADER] = request_id


@dataclass(frozen=True)
class BackendStatus:
    reachable: bool
    model_available: bool
    reason: str | None = None

    @property
    def healthy(self) -> bool:
        return self.reachable and self.model_available


class _GenerateAnswer(ollama.GenerateResponse):
    prompt_eval_cached_count: int | None = None


class _ChatAnswer(ollama.ChatResponse):
    prompt_eval_cached_count: int | None = None


# ollama-python (0.6.3, the newest) does not know Ollama's prompt_eval_cached_count and drops
# the fields it does not know: the model answers are read into classes that keep it.
_KEEPING_CACHED_COUNT = {ollama.GenerateResponse: _GenerateAnswer, ollama.ChatResponse: _ChatAnswer}


def _keeping_cached_count(request: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``ollama.AsyncClient._request``, reading model answers into the classes above."""

    async def keeping(cls: type, *args: Any, **kwargs: Any) -> Any:
        return await request(_KEEPING_CACHED_COUNT.get(cls, cls), *args, **kwargs)

    keeping.keeps_cached_count = True  # type: ignore[attr-defined]
    return keeping


FinalAnswer = api.GenerateResponse | api.ChatResponse


class Backend:
    def __init__(
        self,
        client: ollama.AsyncClient,
        *,
        url: str,
        model: str,
        on_final: Callable[[FinalAnswer], None] | None = None,
    ) -> None:
        """``on_final`` sees each model call's last answer, the one with the counts."""
        self.client = client
        self.url = url
        self.model = model
        self.on_final = on_final
        self.facts: ModelInfo | None = None
        if not getattr(client._request, "keeps_cached_count", False):
            client._request = _keeping_cached_count(client._request)  # type: ignore[method-assign]
        # The official client takes no per-call headers. The wrapper's own HTTP layer
        # sends the request id being served; on an httpx client an event hook does.
        if isinstance(client._client, httpx.AsyncClient):
            hooks = client._client.event_hooks["request"]
            if _send_request_id not in hooks:
                hooks.append(_send_request_id)

    # --- model calls ---------------------------------------------------------------------

    async def chat(self, request: api.ChatRequest) -> api.ChatResponse:
        answer = await self._call(self.client.chat(**_chat_arguments(request)))
        return self._final(self._convert(api.ChatResponse, answer))

    def chat_stream(self, request: api.ChatRequest) -> AsyncIterator[api.ChatResponse]:
        opening = partial(self.client.chat, **_chat_arguments(request))
        return self._stream(opening, api.ChatResponse)

    async def generate(self, request: api.GenerateRequest) -> api.GenerateResponse:
        answer = await self._call(self.client.generate(**_generate_arguments(request)))
        return self._final(self._convert(api.GenerateResponse, answer))

    def generate_stream(self, request: api.GenerateRequest) -> AsyncIterator[api.GenerateResponse]:
        opening = partial(self.client.generate, **_generate_arguments(request))
        return self._stream(opening, api.GenerateResponse)

    async def _stream(
        self, opening: Callable[[], Awaitable[AsyncIterator[Any]]], model: type[T]
    ) -> AsyncIterator[T]:
        """Chunks as they come; the first ``anext`` sends the request. Closing the iterator
        (client gone) closes the backend connection, which stops the generation."""
        parts = None
        try:
            parts = await opening()
            async for part in parts:
                answer = self._convert(model, part)
                yield self._final(answer) if part.done else answer
        except BACKEND_ERRORS as exc:
            raise self.error(exc) from None
        finally:
            if parts is not None:
                with anyio.CancelScope(shield=True):
                    await parts.aclose()

    def _final(self, answer: T) -> T:
        if self.on_final is not None:
            self.on_final(answer)  # type: ignore[arg-type]
        return answer

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except BACKEND_ERRORS as exc:
            raise self.error(exc) from None

    def _convert(self, model: type[T], answer: Any) -> T:
        # The official client's types dumped, not read by attribute: half the CPU for each
        # chunk of a stream (4.9 against 10.6 us).
        if isinstance(answer, pydantic.BaseModel):
            answer = answer.model_dump(exclude_none=True)
        try:
            return model.model_validate(answer)
        except ValueError as exc:
            raise self.error(exc) from None

    # --- embeddings ----------------------------------------------------------------------

    async def embed(self, request: api.EmbedRequest) -> api.EmbedResponse:
        answer = await self._call(
            self.client.embed(
                model=request.model,
                input=request.input or "",  # nothing (or empty) only loads the model
                truncate=request.truncate,
                dimensions=request.dimensions,
                options=_options(request.options),
                keep_alive=request.keep_alive,
            )
        )
        return self._convert(api.EmbedResponse, {"model": request.model} | _dumped(answer))

    async def embeddings(self, request: api.EmbeddingsRequest) -> api.EmbeddingsResponse:
        answer = await self._call(
            self.client.embeddings(
                model=request.model,
                prompt=request.prompt,
                options=_options(request.options),
                keep_alive=request.keep_alive,
            )
        )
        return self._convert(api.EmbeddingsResponse, answer)

    async def embed_token_ids(self, body: dict[str, Any]) -> Any:
        """An OpenAI embeddings body whose input is token ids, sent to the backend's
        ``/v1/embeddings`` (the Ollama API embeds text only; Ollama and the embedded host
        both serve OpenAI's); its answer's JSON."""
        answer = await self._call(self.client._request_raw("POST", "/v1/embeddings", json=body))
        try:
            return answer.json()
        except ValueError as exc:
            raise self.error(exc) from None

    # --- metadata ------------------------------------------------------------------------

    async def version(self) -> api.VersionResponse:
        # ollama-python has no version(); its raw request keeps its base URL and errors.
        answer = await self._call(self.client._request_raw("GET", "/api/version"))
        return self._convert(api.VersionResponse, answer.json())

    async def tags(self) -> api.ListResponse:
        listing = await self._call(self.client.list())
        models = [
            {"name": item.model, **item.model_dump(mode="json", exclude_none=True)}
            for item in listing.models
        ]
        return self._convert(api.ListResponse, {"models": models})

    async def ps(self) -> api.ProcessResponse:
        running = await self._call(self.client.ps())
        data = running.model_dump(mode="json", exclude_none=True)
        return self._convert(api.ProcessResponse, data)

    async def show(self, model: str) -> api.ShowResponse:
        shown = await self._call(self.client.show(model))
        data = shown.model_dump(mode="json", by_alias=True, exclude_none=True)
        return self._convert(api.ShowResponse, data)

    async def model_facts(self) -> ModelInfo | None:
        """Parameters, quantization, context length and embedding size from ``/api/show``;
        fetched once, None while the backend cannot say."""
        if self.facts is None:
            try:
                self.facts = model_facts(self.model, await self.show(self.model))
            except SwarmError:
                return None
        return self.facts

    async def probe(self) -> BackendStatus:
        """Whether the backend answers and has the model."""
        try:
            listing = await self._call(self.client.list())
        except SwarmError as exc:
            return BackendStatus(reachable=False, model_available=False, reason=exc.message)
        wanted = canonical_model_name(self.model)
        if any(canonical_model_name(item.model or "") == wanted for item in listing.models):
            return BackendStatus(reachable=True, model_available=True)
        reason = f"model {self.model!r} is not available on the model backend at {self.url}"
        return BackendStatus(reachable=True, model_available=False, reason=reason)

    # --- errors --------------------------------------------------------------------------

    def error(self, exc: Exception) -> SwarmError:
        """The client-facing error for a failed backend call."""
        where = f"the model backend at {self.url}"
        if isinstance(exc, ollama.ResponseError):
            message = str(exc.error)
            if _CONTEXT_OVERFLOW.search(message):
                return BadRequest(
                    f"the prompt does not fit the model's context: {message}",
                    code="context_length_exceeded",
                )
            if exc.status_code == 404 or _MODEL_MISSING.search(message):
                return ServiceUnavailable(
                    f"model {self.model!r} is not available on {where}: {message}",
                    code="model_not_found",
                )
            if exc.status_code == 400:
                return BadRequest(f"{where} refused the request: {message}", code="backend_refused")
            if exc.status_code in (429, 503):  # Ollama's queue is full: worth a retry soon
                return ServiceUnavailable(
                    f"{where} is busy: {message}",
                    code="backend_busy",
                    headers={"Retry-After": backend_retry_after(exc)},
                )
            return ServiceUnavailable(f"{where} failed: {message}", code="backend_error")
        if (failed := transport_error(exc, where)) is not None:
            return failed
        if isinstance(exc, pydantic.ValidationError) and exc.title in _CLIENT_REQUESTS:
            # The client checks a request before sending it: what it refuses is the
            # caller's input the API models let through, not the backend's doing.
            return BadRequest(
                f"the request cannot be sent to {where}: {exc}", code="invalid_request"
            )
        return ServiceUnavailable(
            f"{where} sent an answer that is not the Ollama API: {exc}", code="backend_bad_answer"
        )


def transport_error(exc: Exception, where: str) -> SwarmError | None:
    """What a failed connection to the backend (any kind) tells the caller; None when
    ``exc`` is not one."""
    # A connection that cannot be made, or not in time, is a backend that is not there.
    if isinstance(exc, ConnectionError | httpx.ConnectError | httpx.ConnectTimeout):
        return ServiceUnavailable(
            f"{where} is unreachable; is it running?",
            code="backend_unavailable",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )
    if isinstance(exc, httpx.TimeoutException):
        return ServiceUnavailable(
            f"{where} did not answer in time ({type(exc).__name__})", code="backend_timeout"
        )
    if isinstance(exc, httpx.HTTPError):
        return ServiceUnavailable(
            f"the connection to {where} broke: {type(exc).__name__}", code="backend_error"
        )
    return None


def backend_retry_after(exc: ollama.ResponseError) -> str:
    """The busy backend's own ``Retry-After`` (the embedded host computes it from its
    service time), when it is whole seconds; capped; else the wrapper's constant.

    ollama-python drops the answer's headers, but raises its error while handling the
    transport's ``HTTPStatusError``, which keeps the answer: it is the error's context.
    """
    answer = getattr(exc.__context__, "response", None)
    value = getattr(answer, "headers", {}).get("retry-after")
    if value is None or not _WHOLE_SECONDS.fullmatch(value.strip()):
        return RETRY_AFTER_SECONDS
    return str(min(int(value), RETRY_AFTER_CAP))


def canonical_model_name(name: str) -> str:
    """``llama3.2`` and ``llama3.2:latest`` are one model to Ollama."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def model_facts(model: str, shown: api.ShowResponse) -> ModelInfo:
    info = shown.model_info
    architecture = info.get("general.architecture")

    def architecture_int(key: str) -> int | None:
        value = info.get(f"{architecture}.{key}") if architecture else None
        return value if isinstance(value, int) else None

    parameters = shown.details.parameter_size or _human_count(info.get("general.parameter_count"))
    return ModelInfo(
        name=model,
        parameters=parameters or None,
        quantization=shown.details.quantization_level or None,
        context_length=architecture_int("context_length"),
        embedding_dim=architecture_int("embedding_length"),
    )


def _human_count(count: Any) -> str | None:
    if not isinstance(count, int) or count <= 0:
        return None
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}B"
    return f"{count / 1e6:.0f}M"


# --- arguments of the official client's calls ----------------------------------------------


def _images(images: list[str] | None) -> list[bytes] | None:
    """Base64 images as bytes: a string would be read as a local file path if one exists."""
    if not images:
        return None
    try:
        return [binascii.a2b_base64(image, strict_mode=True) for image in images]
    except ValueError:  # binascii.Error, and the ValueError of a non-ASCII character
        raise BadRequest("images must be base64-encoded", param="images") from None


def _message(message: api.Message) -> dict[str, Any]:
    data = message.model_dump(exclude_none=True)
    if message.images:
        data["images"] = _images(message.images)
    return data


def _options(options: api.Options | None) -> dict[str, Any] | None:
    return options.model_dump(exclude_none=True) if options else None


def _dumped(answer: Any) -> dict[str, Any]:
    return (
        answer.model_dump(exclude_none=True) if isinstance(answer, pydantic.BaseModel) else answer
    )


def _common_arguments(request: api.ChatRequest | api.GenerateRequest) -> dict[str, Any]:
    return {
        "model": request.model,
        "stream": request.stream,
        "think": request.think,
        "logprobs": request.logprobs or None,
        "top_logprobs": request.top_logprobs,
        "format": request.format,
        "options": request.options.model_dump(exclude_none=True) if request.options else None,
        "keep_alive": request.keep_alive,
    }


def _chat_arguments(request: api.ChatRequest) -> dict[str, Any]:
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools or ()]
    return _common_arguments(request) | {
        "messages": [_message(message) for message in request.messages],
        "tools": tools or None,
    }


def _generate_arguments(request: api.GenerateRequest) -> dict[str, Any]:
    return _common_arguments(request) | {
        "prompt": request.prompt,
        "suffix": request.suffix,
        "system": request.system,
        "template": request.template,
        "context": request.context,
        "raw": request.raw or None,
        "images": _images(request.images),
    }
