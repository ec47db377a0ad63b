"""The model backend for ``kind: openai``: an OpenAI-compatible server (llama.cpp's
llama-server, vLLM, LM Studio, llama-cpp-python's server) behind the wrapper's Ollama API.

The same interface as ``backend.Backend`` (the wrapper picks one in ``make_backend``):
Ollama requests go out as OpenAI ones (``translate``), answers come back as Ollama answers;
``forward`` sends the wrapper's OpenAI calls on as they are. Calls go over the wrapper's
aiohttp pool (``AiohttpClient``), whose failures are httpx's errors.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pydantic

from schemas import ollama as api
from schemas.health import ModelInfo
from services.common.errors import BadRequest, ServiceUnavailable, SwarmError
from services.common.streaming import close
from services.wrapper import translate
from services.wrapper.aiohttp_client import AiohttpClient, Response
from services.wrapper.backend import (
    _CONTEXT_OVERFLOW,
    RETRY_AFTER_CAP,
    RETRY_AFTER_SECONDS,
    BackendStatus,
    transport_error,
)
from services.wrapper.embeddings import bad_answer, cut, normalised, vectors_of

# Where servers tell a model's context in ``/v1/models``: vLLM's max_model_len, LM Studio's
# and others' context_length, llama-server's meta.n_ctx_train (the model's, not the slot's).
_CONTEXT_KEYS = ("max_model_len", "context_length", "max_context_length", "n_ctx")
_OLLAMA_VERSION = "0.0.0"  # an OpenAI server has no Ollama version; clients only show it
_EPOCH = "1970-01-01T00:00:00Z"


class OpenAIBackend:
    """An OpenAI-compatible server serving ``model``, reached at ``url`` (its ``/v1``)."""

    def __init__(
        self,
        http: AiohttpClient,
        *,
        url: str,
        model: str,
        on_final: Any = None,
    ) -> None:
        self.http = http
        self.url = url
        self.model = model
        self.on_final = on_final  # unused: OpenAI servers report no prompt-cache counts
        self.facts: ModelInfo | None = None
        self.decoded = False  # a real generation succeeded: the server can serve the model
        self._decoding = asyncio.Lock()  # probes at once (health, heartbeat) decode once

    # --- model calls ---------------------------------------------------------------------

    async def chat(self, request: api.ChatRequest) -> api.ChatResponse:
        answer = await self._post("/chat/completions", translate.openai_chat_body(request))
        return _chat_answer(answer, request.model)

    def chat_stream(self, request: api.ChatRequest) -> AsyncIterator[api.ChatResponse]:
        return self._chat_stream("/chat/completions", translate.openai_chat_body(request))

    async def generate(self, request: api.GenerateRequest) -> api.GenerateResponse:
        if not request.raw:
            answer = await self.chat(translate.generate_as_chat(request))
            return _generate_answer(answer)
        answer = await self._post("/completions", translate.openai_completion_body(request))
        return _generate_answer(_chat_answer(answer, request.model))

    def generate_stream(self, request: api.GenerateRequest) -> AsyncIterator[api.GenerateResponse]:
        if not request.raw:
            chat = translate.generate_as_chat(request)
            parts = self._chat_stream("/chat/completions", translate.openai_chat_body(chat))
        else:
            parts = self._chat_stream("/completions", translate.openai_completion_body(request))
        return _generates(parts)

    async def forward(self, body: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI chat body sent as it is; the server's answer as it is."""
        return await self._post("/chat/completions", body)

    def forward_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """An OpenAI chat body sent as it is; the server's chunks as they come."""
        return self._chunks("/chat/completions", body)

    # --- embeddings ----------------------------------------------------------------------

    async def forward_embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI embeddings body sent as it is; the server's answer as it is."""
        data = await self._request("/embeddings", body)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise self._bad_answer("embeddings without data")
        return data

    async def embed(self, request: api.EmbedRequest) -> api.EmbedResponse:
        """Ollama's ``/api/embed`` as an OpenAI call: unit-length vectors, one per input.
        ``truncate`` cannot be passed on: a server refuses an input over its context."""
        texts = [request.input] if isinstance(request.input, str) else request.input or []
        if not any(texts):  # as Ollama: nothing to embed only loads the model
            return api.EmbedResponse(model=request.model, embeddings=[])
        body: dict[str, Any] = {"model": self.model, "input": texts}
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        vectors, tokens = vectors_of(await self.forward_embeddings(body))
        if len(vectors) != len(texts):
            raise bad_answer(f"{len(vectors)} vectors for {len(texts)} inputs")
        units = [cut(normalised(v), request.dimensions) for v in vectors]
        return api.EmbedResponse(model=request.model, embeddings=units, prompt_eval_count=tokens)

    async def embeddings(self, request: api.EmbeddingsRequest) -> api.EmbeddingsResponse:
        """Ollama's legacy ``/api/embeddings``: the server's vector (its last token's when
        it gives one per token), not normalised."""
        if not request.prompt:
            return api.EmbeddingsResponse(embedding=[])
        body = {"model": self.model, "input": [request.prompt]}
        answer = await self.forward_embeddings(body)
        vectors, _ = vectors_of(answer, pooled_unit=False)
        if len(vectors) != 1:
            raise bad_answer(f"{len(vectors)} vectors for one input")
        return api.EmbeddingsResponse(embedding=vectors[0])

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = await self._request(path, body)
        if not isinstance(data, dict) or not data.get("choices"):
            raise self._bad_answer("no choices")
        self.decoded = True
        return data

    async def _request(self, path: str, body: dict[str, Any]) -> Any:
        """The JSON of the server's answer to a POST; its refusal as the wrapper's error."""
        try:
            answer = await self.http.request("POST", path, json=body)
            self._check(answer)
            return answer.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise self.error(exc) from None

    async def _chunks(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The ``data:`` events of a streamed answer, parsed, up to ``[DONE]``. Leaving
        early closes the connection, which stops the generation."""
        try:
            async with self.http.stream("POST", path, json=body) as answer:
                if answer.status_code >= 400:
                    await answer.aread()
                    self._check(answer)
                async for line in answer.aiter_lines():
                    data = line.removeprefix("data:").strip()
                    if not line.startswith("data:") or not data:
                        continue  # SSE comments, event names, keep-alives
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if not isinstance(chunk, dict):
                        raise self._bad_answer("a chunk that is not an object")
                    if "error" in chunk:
                        raise self._refused(500, chunk["error"])
                    self.decoded = True
                    yield chunk
        except (httpx.HTTPError, ValueError) as exc:
            raise self.error(exc) from None

    async def _chat_stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[Any]:
        """Ollama chat chunks; tool calls, streamed in pieces, come whole in the last one."""
        calls: dict[int, dict[str, Any]] = {}
        finish: str | None = None
        usage: dict[str, Any] | None = None
        model = body["model"]
        chunks = self._chunks(path, body)
        try:
            async for chunk in chunks:
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    text = delta.get("content") or choice.get("text") or ""
                    for call in delta.get("tool_calls") or ():
                        _add_tool_call_delta(calls, call)
                    finish = choice.get("finish_reason") or finish
                    if text:
                        message = api.Message(role="assistant", content=text)
                        yield api.ChatResponse(
                            model=model, created_at=api.timestamp_now(), done=False, message=message
                        )
        finally:
            await close(chunks)
        tool_calls = translate.ollama_tool_calls(list(calls.values()))
        message = api.Message(role="assistant", content="", tool_calls=tool_calls)
        yield api.ChatResponse(
            model=model,
            created_at=api.timestamp_now(),
            done=True,
            done_reason=translate.done_reason(finish),
            message=message,
            **_counts(usage),
        )

    def _check(self, answer: Response) -> None:
        if answer.status_code < 400:
            return
        try:
            error = answer.json().get("error")
        except (ValueError, AttributeError):
            error = None
        raise self._refused(answer.status_code, error or answer.text, answer.headers)

    def _refused(
        self, status: int, error: Any, headers: Any = None
    ) -> SwarmError:  # raised as is: a SwarmError passes through ``error``
        message = str(error.get("message") if isinstance(error, dict) else error)[:500]
        where = f"the model backend at {self.url}"
        if _CONTEXT_OVERFLOW.search(message):
            return BadRequest(
                f"the prompt does not fit the model's context: {message}",
                code="context_length_exceeded",
            )
        if status == 404:
            return ServiceUnavailable(
                f"model {self.model!r} is not available on {where}: {message}",
                code="model_not_found",
            )
        if status in (400, 422):
            return BadRequest(f"{where} refused the request: {message}", code="backend_refused")
        if status in (429, 503):
            return ServiceUnavailable(
                f"{where} is busy: {message}",
                code="backend_busy",
                headers={"Retry-After": _retry_after(headers)},
            )
        if status in (401, 403):  # the key itself is never in the message
            return ServiceUnavailable(
                f"{where} refused the wrapper's API key ({status})", code="backend_error"
            )
        return ServiceUnavailable(f"{where} failed ({status}): {message}", code="backend_error")

    def _bad_answer(self, what: str) -> SwarmError:
        return ServiceUnavailable(
            f"the model backend at {self.url} sent {what}, not the OpenAI API",
            code="backend_bad_answer",
        )

    def error(self, exc: Exception) -> SwarmError:
        """The client-facing error for a failed backend call."""
        if isinstance(exc, SwarmError):
            return exc
        if (failed := transport_error(exc, f"the model backend at {self.url}")) is not None:
            return failed
        return self._bad_answer(f"an answer that does not parse ({type(exc).__name__})")

    # --- metadata ------------------------------------------------------------------------

    async def listed(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: the server's models."""
        try:
            answer = await self.http.request("GET", "/models")
            self._check(answer)
            data = answer.json().get("data")
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise self.error(exc) from None
        if not isinstance(data, list):
            raise self._bad_answer("a model list without data")
        return [item for item in data if isinstance(item, dict) and "id" in item]

    async def _entry(self) -> dict[str, Any] | None:
        return next((item for item in await self.listed() if item["id"] == self.model), None)

    async def version(self) -> api.VersionResponse:
        return api.VersionResponse(version=_OLLAMA_VERSION)

    async def tags(self) -> api.ListResponse:
        models = [
            api.ListedModel(name=name, model=name, modified_at=_EPOCH, size=0, digest="")
            for name in (item["id"] for item in await self.listed())
        ]
        return api.ListResponse(models=models)

    async def ps(self) -> api.ProcessResponse:
        return api.ProcessResponse(models=[])  # OpenAI servers do not say what is loaded

    async def show(self, model: str) -> api.ShowResponse:
        entry = await self._entry()
        if entry is None:
            raise ServiceUnavailable(
                f"model {self.model!r} is not available on the model backend at {self.url}",
                code="model_not_found",
            )
        context = _context_length(entry)
        info = {"general.architecture": "openai", "openai.context_length": context}
        return api.ShowResponse(model_info={k: v for k, v in info.items() if v is not None})

    async def model_facts(self) -> ModelInfo | None:
        """The context length the server tells in ``/v1/models``, when it does; None while
        the server cannot say (the profile's context_length stands)."""
        if self.facts is None:
            try:
                entry = await self._entry()
            except SwarmError:
                return None
            self.facts = ModelInfo(name=self.model, context_length=_context_length(entry or {}))
        return self.facts

    async def probe(self) -> BackendStatus:
        """Whether the server lists the model and has generated with it: listing alone
        says nothing of a model that cannot load, so until a call has decoded, the probe
        decodes one token itself."""
        try:
            if await self._entry() is None:
                reason = f"model {self.model!r} is not available on the model backend at {self.url}"
                return BackendStatus(reachable=True, model_available=False, reason=reason)
            async with self._decoding:
                if not self.decoded:
                    await self._post("/chat/completions", _decode_probe(self.model))
        except SwarmError as exc:
            return BackendStatus(reachable=False, model_available=False, reason=exc.message)
        return BackendStatus(reachable=True, model_available=True)


def _decode_probe(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def _context_length(entry: dict[str, Any]) -> int | None:
    for place in (entry, entry.get("meta") or {}):
        for key in _CONTEXT_KEYS:
            if isinstance(place.get(key), int) and place[key] > 0:
                return place[key]
    meta = entry.get("meta") or {}
    trained = meta.get("n_ctx_train")
    return trained if isinstance(trained, int) and trained > 0 else None


def _counts(usage: dict[str, Any] | None) -> dict[str, int]:
    if not isinstance(usage, dict):
        return {}
    counts = {
        "prompt_eval_count": usage.get("prompt_tokens"),
        "eval_count": usage.get("completion_tokens"),
    }
    return {key: value for key, value in counts.items() if isinstance(value, int) and value >= 0}


def _retry_after(headers: Any) -> str:
    value = (headers or {}).get("retry-after")
    if value is None or not value.strip().isdigit():
        return RETRY_AFTER_SECONDS
    return str(min(int(value), RETRY_AFTER_CAP))


def _chat_answer(answer: dict[str, Any], model: str) -> api.ChatResponse:
    """A whole OpenAI answer (chat or completion) as an Ollama chat answer."""
    choice = answer["choices"][0]
    message = choice.get("message") or {}
    content = message.get("content") if message else choice.get("text")
    try:
        return api.ChatResponse(
            model=model,
            created_at=api.timestamp_now(),
            done=True,
            done_reason=translate.done_reason(choice.get("finish_reason")),
            message=api.Message(
                role="assistant",
                content=content or "",
                tool_calls=translate.ollama_tool_calls(message.get("tool_calls")),
            ),
            **_counts(answer.get("usage")),
        )
    except pydantic.ValidationError as exc:
        raise ServiceUnavailable(
            f"the model backend sent an answer that is not the OpenAI API: {exc}",
            code="backend_bad_answer",
        ) from None


def _generate_answer(answer: api.ChatResponse) -> api.GenerateResponse:
    fields = answer.model_dump(exclude={"message"}, exclude_none=True)
    return api.GenerateResponse(response=answer.message.content, **fields)


async def _generates(parts: AsyncIterator[api.ChatResponse]) -> AsyncIterator[Any]:
    try:
        async for part in parts:
            yield _generate_answer(part)
    finally:
        await close(parts)


def _add_tool_call_delta(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    """One streamed piece of a tool call: the first names it, the rest add arguments."""
    call = calls.setdefault(delta.get("index", len(calls)), {"function": {"arguments": ""}})
    if delta.get("id"):
        call["id"] = delta["id"]
    function = delta.get("function") or {}
    if function.get("name"):
        call["function"]["name"] = function["name"]
    call["function"]["arguments"] += function.get("arguments") or ""
