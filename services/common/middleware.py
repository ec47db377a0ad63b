"""Pure ASGI middleware shared by the daemons: request ids, body limits and read timeouts,
Ollama bodies.

Pure ASGI rather than BaseHTTPMiddleware: these sit on every request, and streamed
responses must pass through them unbuffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.context import REQUEST_ID_HEADER, new_id, reset_request_id, set_request_id
from services.common.errors import PayloadTooLarge, error_response, is_ollama_path

_HEADER = REQUEST_ID_HEADER.lower().encode()
_VALID_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdMiddleware:
    """Take ``X-Request-ID`` from the request (when sane) or make one; echo it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == _HEADER), None)
        request_id = given.decode() if given and _VALID_ID.match(given) else new_id()
        scope.setdefault("state", {})["request_id"] = request_id
        encoded = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                if not any(k.lower() == _HEADER for k, _ in headers):
                    headers.append((_HEADER, encoded))
            await send(message)

        token = set_request_id(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            reset_request_id(token)


class AnsweredEarly(Exception):
    """Raised into the app by a ``receive`` whose middleware has answered for it (a 413,
    a 429): the app stops reading, and what it sends after is dropped. Not a disconnect,
    which the app would log as a client that left."""


class EarlyAnswer:
    """What a middleware that may answer in the middle of the app's body read needs: the
    answer, the app's ``send`` that drops the app's messages after it, and whether the
    app has begun its own answer (then it is too late to answer for it)."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope, self.receive, self.send = scope, receive, send
        self.given = False
        self.app_started = False

    async def give(self, response: Response) -> None:
        """Send ``response`` for the app, then raise :class:`AnsweredEarly` into it."""
        self.given = True
        await response(self.scope, self.receive, self.send)
        raise AnsweredEarly

    async def app_send(self, message: Message) -> None:
        if self.given:
            return
        self.app_started = True
        await self.send(message)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(scope["path"], self.too_large())(scope, receive, send)
            return

        received = 0
        answer = EarlyAnswer(scope, receive, send)

        async def counting_receive() -> Message:
            nonlocal received
            if answer.given:
                raise AnsweredEarly
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not answer.app_started:
                    # Answer 413 here: an error raised would reach the app's body parser,
                    # which turns any read error into a generic 400.
                    await answer.give(error_response(scope["path"], self.too_large()))
            return message

        with contextlib.suppress(AnsweredEarly):
            await self.app(scope, counting_receive, answer.app_send)

    def too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")


class BodyTimeoutMiddleware:
    """Refuse a request whose body stalls: no part of it for ``seconds`` is a 408 with
    ``Connection: close``. The app's read raises it, so the app answers in its envelope
    and counts it; once the app has begun its answer, it is told the client is gone."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_read = False
        answering = False

        async def timed_receive() -> Message:
            nonlocal body_read
            if body_read:  # later reads wait for a disconnect: for as long as the answer
                return await receive()
            try:
                async with asyncio.timeout(self.seconds):
                    message = await receive()
            except TimeoutError:
                if answering:
                    return {"type": "http.disconnect"}
                raise HTTPException(
                    408,
                    f"no part of the request body arrived for {self.seconds:g} s",
                    headers={"Connection": "close"},
                ) from None
            body_read = message["type"] != "http.request" or not message.get("more_body")
            return message

        async def noting_send(message: Message) -> None:
            nonlocal answering
            answering = True
            await send(message)

        await self.app(scope, timed_receive, noting_send)


class OllamaJsonBodyMiddleware:
    """Read bodies of Ollama-style paths as JSON whatever their Content-Type.

    Ollama ignores the header, so its documented ``curl ... -d '{...}'`` (sent as a form)
    works; FastAPI would refuse such a body. Other paths keep the strict behaviour.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and is_ollama_path(scope["path"]):
            # In place, not a copy: the router records the matched route in this scope,
            # where the metrics read it.
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"] = [*headers, (b"content-type", b"application/json")]
        await self.app(scope, receive, send)
