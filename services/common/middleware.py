"""Pure ASGI middleware shared by the daemons: request ids, body limits, Ollama bodies.

Pure ASGI rather than BaseHTTPMiddleware: these sit on every request, and streamed
responses must pass through them unbuffered.
"""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.context import REQUEST_ID_HEADER, reset_request_id, set_request_id
from services.common.errors import PayloadTooLarge, error_response, is_ollama_path

_HEADER = REQUEST_ID_HEADER.lower().encode()
_VALID_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Take ``X-Request-ID`` from the request (when sane) or make one; echo it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == _HEADER), None)
        request_id = given.decode() if given and _VALID_ID.match(given) else new_request_id()
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


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(scope["path"], too_large)(scope, receive, send)
            return

        received = 0
        rejected = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not response_started:
                    # Answer 413 here: raising would reach the app's body parser, which
                    # turns any read error into a generic 400. The app sees a disconnect.
                    rejected = True
                    await error_response(scope["path"], too_large)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if rejected:
                return
            response_started = True
            await send(message)

        await self.app(scope, counting_receive, guarded_send)


class OllamaJsonBodyMiddleware:
    """Read bodies of Ollama-style paths as JSON whatever their Content-Type.

    Ollama ignores the header, so its documented ``curl ... -d '{...}'`` (sent as a form)
    works; FastAPI would refuse such a body. Other paths keep the strict behaviour.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and is_ollama_path(scope["path"]):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = scope | {"headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
