"""Cloud providers behind the router: any OpenAI-compatible API, passed through (tools,
tool_choice and response_format included), and Anthropic's Messages API, translated both
ways (``router.anthropic``: tools and JSON output, streams included). Only called with a
configured key. An answer the router cannot read is the provider's failure (kind
"malformed"), never the router's 500: the next candidate may serve.

Cloud calls go through httpx: a cloud round trip takes hundreds of milliseconds, so the
client's own cost does not matter there (the local hot path is aiohttp's), and the
providers' documented shapes can be replayed with respx in the tests.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx

from router import anthropic
from router.candidates import Candidate
from router.errors import UpstreamFailed, failed_answer
from router.upstream import Answer, describe
from schemas.config import ProviderConfig
from services.common.streaming import to_json

ANTHROPIC_VERSION = "2023-06-01"


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
        json_answer = False  # an Anthropic request's JSON output comes as a tool's input
        if provider.kind == "anthropic":
            url = provider.base_url.rstrip("/") + "/v1/messages"
            headers = {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}
            payload = anthropic.anthropic_request(request)
            json_answer = anthropic.answers_in_json(payload)
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
                return await _whole(response, provider, json_answer)
            except httpx.HTTPError as exc:
                raise UpstreamFailed(describe(exc), kind="broken") from None
        usage = [0, 0]  # prompt, completion: filled as the stream goes
        lines = response.aiter_lines()
        if provider.kind == "anthropic":
            chunks = anthropic.openai_chunks_from_anthropic(
                lines, candidate.model, usage, json_answer
            )
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


async def _whole(response: httpx.Response, provider: ProviderConfig, json_answer: bool) -> Answer:
    """A whole answer, or a refusal (a 4xx but 429, the caller's to read), in OpenAI's
    shape."""
    try:
        body = await response.aread()
    finally:
        await response.aclose()
    usage = [0, 0]
    if response.status_code < 400:
        try:
            data = json.loads(body)
            if provider.kind == "anthropic":
                completion = anthropic.openai_completion(data, json_answer)
                body, data = to_json(completion), completion.model_dump()
            usage = _tokens(data)
        except ValueError as exc:  # anthropic.Malformed and JSONDecodeError are ValueErrors
            raise UpstreamFailed(_malformed(exc), kind="malformed") from None
    elif provider.kind == "anthropic":  # a refusal, in the router's error envelope
        body = to_json(anthropic.openai_error(response.status_code, body))
    return Answer(response.status_code, "application/json", body, usage=usage)


async def _failing_as_upstream(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A stream whose provider fails mid-way raises UpstreamFailed, as every upstream's."""
    try:
        async for chunk in chunks:
            yield chunk
    except httpx.HTTPError as exc:
        raise UpstreamFailed(describe(exc), kind="broken") from None
    except anthropic.StreamFailed as exc:
        raise UpstreamFailed(f"the provider failed: {exc}", kind="broken") from None
    except ValueError as exc:
        raise UpstreamFailed(_malformed(exc), kind="malformed") from None


def _malformed(exc: ValueError) -> str:
    if isinstance(exc, anthropic.Malformed):
        return str(exc)
    return f"an answer out of shape: {type(exc).__name__}: {exc}"


# --- OpenAI-compatible streams: passed through, usage read on the way ----------------------


async def openai_chunks(lines: AsyncIterator[str], usage: list[int]) -> AsyncIterator[bytes]:
    async for line in lines:
        if line.startswith("data: ") and '"usage"' in line and line != "data: [DONE]":
            usage[:] = _tokens(json.loads(line[6:]))
        yield (line + "\n").encode()


def _tokens(completion: Any) -> list[int]:
    """The [prompt, completion] tokens of an OpenAI completion or chunk (0 when absent);
    ValueError when it or its usage is no JSON object."""
    if not isinstance(completion, dict):
        raise ValueError(f"a {type(completion).__name__}, not a JSON object")
    usage = completion.get("usage") or {}
    if not isinstance(usage, dict):
        raise ValueError(f"a usage that is a {type(usage).__name__}, not a JSON object")
    return [usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)]
