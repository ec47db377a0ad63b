"""Wire formats of answers: JSON bodies, SSE events (OpenAI), NDJSON lines (Ollama)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pydantic_core
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from schemas.errors import ErrorDetail, ErrorEnvelope, OllamaError
from services.common.context import current_request_id
from services.common.errors import SwarmError

SSE_DONE = b"data: [DONE]\n\n"
# Proxies (nginx) must not buffer the stream; clients must not cache it.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def close(stream: AsyncIterator[Any]) -> None:
    """Close a stream even while the task is being cancelled (the client went away)."""
    with anyio.CancelScope(shield=True):
        await stream.aclose()  # type: ignore[attr-defined]


def to_json(model: BaseModel, *, exclude_none: bool = True) -> bytes:
    """API answers leave out what is unset (as OpenAI and Ollama do)."""
    return pydantic_core.to_json(model, exclude_none=exclude_none)


def json_response(model: BaseModel, *, exclude_none: bool = True, status: int = 200) -> Response:
    # The answer models are built from validated data: serialise once, no second validation.
    body = to_json(model, exclude_none=exclude_none)
    return Response(body, status_code=status, media_type="application/json")


def sse(model: BaseModel) -> bytes:
    return b"data: " + to_json(model) + b"\n\n"


def sse_error(error: SwarmError) -> bytes:
    """A failure after the stream started: one error event (the caller then sends [DONE])."""
    detail = ErrorDetail(
        message=error.message, type=error.type, code=error.code, request_id=current_request_id()
    )
    return sse(ErrorEnvelope(error=detail))


def ndjson(model: BaseModel) -> bytes:
    return to_json(model) + b"\n"


def ndjson_error(error: SwarmError) -> bytes:
    """A failure after the stream started, as Ollama writes it."""
    return ndjson(OllamaError(error=error.message))


class EventStream(StreamingResponse):
    """A streamed answer that always closes its iterator, and so the backend's stream,
    however the response ends (finished, failed, or the client went away)."""

    body_iterator: AsyncIterator[bytes]

    def __init__(self, content: AsyncIterator[bytes], media_type: str) -> None:
        super().__init__(content, media_type=media_type, headers=STREAM_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # uvicorn speaks ASGI 2.3 over HTTP/1.1: a send to a client that left does not
        # fail, so a disconnect must be watched for, or a model would go on generating for
        # nobody. Starlette watches in an anyio task group, whose cancel scopes cost more
        # CPU per stream than the relay itself; one asyncio task cancelling this one is
        # the same contract.
        streaming = asyncio.current_task()
        assert streaming is not None
        left = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            left = True
            streaming.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            # The client left (our cancel): the stream just ends. Any other cancel goes on.
            if not left or streaming.uncancel() > 0:
                raise
        except OSError:  # an ASGI 2.4 server: the send failed
            raise ClientDisconnect() from None
        finally:
            watcher.cancel()
            await close(self.body_iterator)


def sse_response(events: AsyncIterator[bytes]) -> EventStream:
    return EventStream(events, "text/event-stream")


def ndjson_response(lines: AsyncIterator[bytes]) -> EventStream:
    return EventStream(lines, "application/x-ndjson")
