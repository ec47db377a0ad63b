"""OpenAI chat calls forwarded as they are to a ``kind: openai`` backend.

The caller's own body goes on (vendor fields included), with the wrapper's model and token
limit; the server's answer and chunks come back as they are. The wrapper still checks the
prompt against the context, counts the call and reports its usage: from the server's
``usage`` when it gives one (it is asked for it in streams), else estimated. An answer
asked in a JSON ``response_format`` that ended with "stop" must be that JSON, as on every
backend kind (``service.check_format``): else a 502, in a stream the error event in place
of the finishing chunk.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response

from schemas import openai
from services.common.errors import ServiceUnavailable
from services.common.streaming import SSE_DONE, close, sse, sse_error, sse_response
from services.wrapper import translate
from services.wrapper.openai_backend import OpenAIBackend
from services.wrapper.service import Job, Wrapper, check_format, first_chunk
from services.wrapper.stats import Call, counting_failures, stream_failure


async def forward(
    wrapper: Wrapper, backend: OpenAIBackend, body: openai.ChatCompletionRequest, raw: bytes
) -> Response:
    """``POST /v1/chat/completions`` on an OpenAI backend; ``raw`` is the caller's body."""
    call = wrapper.stats.begin("openai", body.stream)
    with counting_failures(call):
        limit = wrapper.settings.max_tokens_limit
        job = wrapper.chat_job(translate.ollama_chat_request(body, wrapper.settings.model, limit))
        sent = _pinned(json.loads(raw), job, body.stream)
        wanted = translate.ollama_format(body.response_format)
        if not body.stream:
            answer = await backend.forward(sent)
            choice = answer["choices"][0]
            text = openai.content_text((choice.get("message") or {}).get("content"))
            _check_finished(wanted, choice.get("finish_reason"), text)
            prompt, completion = _counts(answer.get("usage"), job, text=text)
            call.done(prompt, completion)
            return Response(json.dumps(answer).encode(), media_type="application/json")
        chunks = backend.forward_stream(sent)
        first = await first_chunk(chunks)
    call.first_token()
    return sse_response(_events(first, chunks, call, job, body.include_usage, wanted))


def _pinned(sent: dict[str, Any], job: Job, stream: bool) -> dict[str, Any]:
    """The caller's body with the wrapper's model and limit (``chat_job`` pinned both)."""
    sent.pop("max_completion_tokens", None)  # not every server knows it; max_tokens all do
    options = job.request.options
    sent |= {"model": job.request.model, "max_tokens": options and options.num_predict}
    if stream:  # the counts, where the server gives them; the caller gets them if asked
        sent["stream_options"] = {"include_usage": True}
    return sent


def _check_finished(format: Any, finish_reason: Any, text: str) -> None:
    # Only a text answer that says it is whole: a call is no answer text, "length" is cut.
    if finish_reason == "stop":
        check_format(format, finish_reason, text)


def _counts(usage: Any, job: Job, *, text: str = "", chunks: int = 0) -> tuple[int, int]:
    given = usage if isinstance(usage, dict) else {}
    prompt = given.get("prompt_tokens")
    completion = given.get("completion_tokens")
    if not isinstance(prompt, int):
        prompt = translate.estimate_tokens(job.prompt)
    if not isinstance(completion, int) or not completion:
        completion = chunks or translate.estimate_tokens(text)
    return prompt, completion


async def _events(
    first: dict[str, Any],
    chunks: AsyncIterator[dict[str, Any]],
    call: Call,
    job: Job,
    include_usage: bool,
    format: Any,
) -> AsyncIterator[bytes]:
    pieces = 0
    usage = None
    finished = False
    texts: list[str] = []
    try:
        chunk: dict[str, Any] | None = first
        while chunk is not None:
            usage = chunk.get("usage") or usage
            choices = chunk.get("choices") or []
            for choice in choices:
                if content := (choice.get("delta") or {}).get("content"):
                    pieces += 1
                    if format is not None:
                        texts.append(content)
                if reason := choice.get("finish_reason"):
                    _check_finished(format, reason, "".join(texts))
                    finished = True
            if choices or include_usage:  # a usage-only chunk only when the caller asked
                yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            chunk = await anext(chunks, None)
        if not finished:
            raise ServiceUnavailable(
                "the model backend ended the stream before the answer was complete",
                code="backend_error",
            )
        prompt, completion = _counts(usage, job, chunks=pieces)
        call.done(prompt, completion)
        tail = SSE_DONE
        if include_usage and usage is None:  # the server gave none: the wrapper's count
            counted = openai.Usage.of(prompt, completion)
            model = str(first.get("model") or job.request.model)
            created = first.get("created") if isinstance(first.get("created"), int) else 0
            ending = translate.usage_chunk(str(first.get("id")), created, model, counted)
            tail = sse(ending) + tail
        yield tail
    except Exception as exc:
        yield sse_error(stream_failure(call, exc)) + SSE_DONE
    finally:
        call.cancelled(translate.estimate_tokens(job.prompt), pieces)  # no-op once ended
        await close(chunks)
