"""Request bodies parsed as RFC 8259 JSON and nothing more.

Python's parser also takes ``NaN`` and ``Infinity``, reads ``1e400`` as infinity and
``1`` followed by 400 zeros as an integer no float holds, and keeps lone surrogates
(``"\\ud800"``), which no UTF-8 store or answer can carry. Each of them once became a 500
further down: in a database write, in an answer's serialisation, in the ollama client's
request (issue 13). Refused here, they are what they are: a body that is not valid JSON,
which FastAPI reports like any other (``json_invalid``).

Every ``APIRouter`` that takes a JSON body uses ``route_class=StrictJSONRoute``; the lean
routes of the hot path (``services.common.http``) call ``check_json`` before pydantic's
own parser, which refuses lone surrogates but takes the rest.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

# A \uD800-\uDFFF escape: only a body holding one can hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# What pydantic's parser takes that a double cannot hold: only a body with one of these
# (or text that looks like one) needs the strict parse.
_NOT_A_DOUBLE = re.compile(rb"NaN|Infinity|[eE][+-]?\d{3}|\d{309}")


def parse_json(body: bytes) -> Any:
    """``body`` as JSON; ``json.JSONDecodeError`` for anything RFC 8259 does not allow or
    a double cannot hold."""
    try:
        document = json.loads(
            body, parse_constant=_refuse, parse_float=_finite, parse_int=_double_sized
        )
        if _SURROGATE_ESCAPE.search(body):
            json.dumps(document, ensure_ascii=False).encode()
    except json.JSONDecodeError:
        raise
    except UnicodeEncodeError:
        raise _invalid("a string holds a lone surrogate, which UTF-8 cannot encode", body) from None
    except ValueError as exc:  # a hook's refusal
        raise _invalid(str(exc), body) from None
    return document


def check_json(body: bytes) -> None:
    """Raise ``json.JSONDecodeError`` for a body pydantic's JSON parser would take with a
    number no double holds (``NaN``, ``Infinity``, ``1e400``, 309 digits)."""
    if _NOT_A_DOUBLE.search(body):
        parse_json(body)


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"the number {text[:40]} is past a double's range")
    return number


def _double_sized(text: str) -> int:
    # 308 digits stay below a double's largest value (1.8e308), which every JSON reader
    # can hold; the length is checked before any parsing of a long run of digits.
    if len(text.lstrip("-")) > 308:
        raise ValueError(f"the number {text[:40]}... is past a double's range")
    return int(text)


def _invalid(message: str, body: bytes) -> json.JSONDecodeError:
    return json.JSONDecodeError(message, body.decode("utf-8", "replace"), 0)


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A FastAPI route whose JSON body is parsed by ``parse_json``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive, request._send))

        return strict
