"""Cloud providers behind the router: any OpenAI-compatible API, and Anthropic's Messages
API translated both ways (streaming included). Only called with a configured key.

Cloud calls go through httpx: a cloud round trip takes hundreds of milliseconds, so the
client's own cost does not matter there (the local hot path is aiohttp's), and the
providers' documented shapes can be replayed with respx in the tests.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx

from router.candidates import Candidate
from router.errors import UpstreamFailed, failed_answer
from router.upstream import Answer, describe
from schemas import openai
from schemas.config import ProviderConfig
from services.common.streaming import SSE_DONE, sse, to_json

ANTHROPIC_VERSION = "2023-06-01"
ANTHROPIC_DEFAULT_MAX_TOKENS = 1_024  # Anthropic requires one; OpenAI callers may omit it
FINISH_REASONS: dict[str, openai.FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}


class CloudClient:
    """Keyed cloud providers as an upstream (``router.upstream``): the body is read, sent in
    the provider's shape, and the answer comes back in OpenAI's, with its token usage."""

    def __init__(self, http: httpx.AsyncClient, providers: dict[str, ProviderConfig]) -> None:
        self.http = http
        self.providers = providers

    async def send(self, candidate: Candidate, body: bytes, stream: bool) -> Answer:
        provider = self.providers[candidate.provider]
        key = os.environ.get(provider.api_key_env)
        if not key:  # the key went away since the candidates were ranked
            raise UpstreamFailed(f"{provider.api_key_env} is not set", kind="no_key")
        request = json.loads(body) | {"model": candidate.model}
        if provider.kind == "anthropic":
            url = provider.base_url.rstrip("/") + "/v1/messages"
            headers = {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}
            payload = anthropic_request(request)
        else:
            url = provider.base_url.rstrip("/") + "/chat/completions"
            headers = {"Authorization": f"Bearer {key}"}
            payload = request
            if stream:  # the usage of a stream comes in its last chunk, when asked for
                payload = request | {"stream_options": {"include_usage": True}}
        try:
            sent = self.http.build_request("POST", url, json=payload, headers=headers)
            response = await self.http.send(sent, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamFailed(f"{type(exc).__name__}", kind="timeout") from None
        except httpx.HTTPError as exc:
            raise UpstreamFailed(f"{type(exc).__name__}: {exc}", kind="connect") from None
        failure = failed_answer(response.status_code, response.headers.get("retry-after"))
        if failure is not None:
            await response.aclose()
            raise failure
        if response.status_code >= 400 or not stream:
            try:
                return await _whole(response, provider)
            except httpx.HTTPError as exc:
                raise UpstreamFailed(describe(exc), kind="broken") from None
        usage = [0, 0]  # prompt, completion: filled as the stream goes
        lines = response.aiter_lines()
        if provider.kind == "anthropic":
            chunks = openai_chunks_from_anthropic(lines, candidate.model, usage)
        else:
            chunks = openai_chunks(lines, usage)
        chunks = _failing_as_upstream(chunks)
        try:
            first = await anext(chunks, b"")
        except BaseException:  # broken before its first chunk: no relay will close it
            await response.aclose()
            raise
        return Answer(
            response.status_code,
            "text/event-stream",
            first,
            chunks,
            release=response.aclose,
            usage=usage,
        )


async def _whole(response: httpx.Response, provider: ProviderConfig) -> Answer:
    """A whole answer (or an error, passed back as it is), in OpenAI's shape."""
    try:
        body = await response.aread()
    finally:
        await response.aclose()
    usage = [0, 0]
    if response.status_code < 400:
        data = json.loads(body)
        if provider.kind == "anthropic":
            completion = openai_completion(data)
            body, data = to_json(completion), completion.model_dump()
        usage = _tokens(data)
    return Answer(response.status_code, "application/json", body, usage=usage)


async def _failing_as_upstream(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A stream whose provider fails mid-way raises UpstreamFailed, as every upstream's."""
    try:
        async for chunk in chunks:
            yield chunk
    except httpx.HTTPError as exc:
        raise UpstreamFailed(describe(exc), kind="broken") from None


# --- OpenAI-compatible streams: passed through, usage read on the way ----------------------


async def openai_chunks(lines: AsyncIterator[str], usage: list[int]) -> AsyncIterator[bytes]:
    async for line in lines:
        if line.startswith("data: ") and '"usage"' in line and line != "data: [DONE]":
            usage[:] = _tokens(json.loads(line[6:]))
        yield (line + "\n").encode()


# --- Anthropic Messages <-> OpenAI chat ----------------------------------------------------


def anthropic_request(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat request as an Anthropic Messages request."""
    system = [_text(m.get("content")) for m in body["messages"] if m.get("role") == "system"]
    messages = [
        {"role": m["role"], "content": _text(m.get("content"))}
        for m in body["messages"]
        if m.get("role") in ("user", "assistant")
    ]
    request: dict[str, Any] = {
        "model": body["model"],
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens")
        or body.get("max_tokens")
        or ANTHROPIC_DEFAULT_MAX_TOKENS,
    }
    if system:
        request["system"] = "\n\n".join(system)
    for name in ("temperature", "top_p", "stream"):
        if body.get(name) is not None:
            request[name] = body[name]
    stop = body.get("stop")
    if stop:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    return request


def openai_completion(message: dict[str, Any]) -> openai.ChatCompletion:
    """An Anthropic Messages answer as an OpenAI chat completion."""
    text = "".join(b.get("text", "") for b in message.get("content", []) if b.get("type") == "text")
    usage = message.get("usage") or {}
    choice = openai.Choice(
        message=openai.AssistantMessage(content=text),
        finish_reason=FINISH_REASONS.get(message.get("stop_reason") or "", "stop"),
    )
    return openai.ChatCompletion(
        id="chatcmpl-" + str(message.get("id", uuid.uuid4().hex)),
        created=int(time.time()),
        model=message.get("model", ""),
        choices=[choice],
        usage=openai.Usage.of(usage.get("input_tokens", 0), usage.get("output_tokens", 0)),
    )


async def openai_chunks_from_anthropic(
    lines: AsyncIterator[str], model: str, usage: list[int]
) -> AsyncIterator[bytes]:
    """Anthropic's stream events as OpenAI chunks: the text deltas, then the finish reason
    and the usage, then ``[DONE]``."""
    head = {"id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time()), "model": model}

    def chunk(delta: openai.ChunkDelta, finish: openai.FinishReason | None = None) -> bytes:
        choice = openai.ChunkChoice(delta=delta, finish_reason=finish)
        return sse(openai.ChatCompletionChunk(**head, choices=[choice]))

    finish: openai.FinishReason = "stop"
    async for line in lines:
        if not line.startswith("data: "):
            continue  # "event: ..." names the type that the data repeats
        event = json.loads(line[6:])
        kind = event.get("type")
        if kind == "message_start":
            usage[0] = event["message"].get("usage", {}).get("input_tokens", 0)
            yield chunk(openai.ChunkDelta(role="assistant", content=""))
        elif kind == "content_block_delta" and event["delta"].get("type") == "text_delta":
            yield chunk(openai.ChunkDelta(content=event["delta"]["text"]))
        elif kind == "message_delta":
            usage[1] = event.get("usage", {}).get("output_tokens", usage[1])
            finish = FINISH_REASONS.get(event["delta"].get("stop_reason") or "", "stop")
        elif kind == "error":
            message = event.get("error", {}).get("message", "the provider failed")
            raise httpx.RemoteProtocolError(message)
    # OpenAI's usage chunk (include_usage) has no choices.
    total = openai.ChatCompletionChunk(**head, choices=[], usage=openai.Usage.of(*usage))
    yield chunk(openai.ChunkDelta(), finish) + sse(total) + SSE_DONE


def _tokens(completion: dict[str, Any]) -> list[int]:
    """The [prompt, completion] tokens of an OpenAI completion or chunk (0 when absent)."""
    usage = completion.get("usage") or {}
    return [usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)]


def _text(content: Any) -> str:
    """OpenAI content, a string or a list of parts, as plain text."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""
