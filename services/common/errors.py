"""One error type per kind, mapped to the documented envelopes in one place."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from schemas.errors import ErrorDetail, ErrorEnvelope, OllamaError, describe_validation_errors
from services.common.context import REQUEST_ID_HEADER, current_request_id

log = logging.getLogger(__name__)


class SwarmError(Exception):
    status_code = 500
    type = "server_error"
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})


class BadRequest(SwarmError):
    status_code = 400
    type = "invalid_request_error"
    code = "bad_request"


class Unauthorized(SwarmError):
    status_code = 401
    type = "authentication_error"
    code = "unauthorized"

    def __init__(self, message: str = "missing or invalid bearer token", **kwargs) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kwargs)


class NotFound(SwarmError):
    status_code = 404
    type = "not_found_error"
    code = "not_found"


class RequestTimeout(SwarmError):
    status_code = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(SwarmError):
    status_code = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class HeadersTooLarge(SwarmError):
    status_code = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class ValidationFailed(SwarmError):
    status_code = 422
    type = "invalid_request_error"
    code = "validation_error"


class RateLimited(SwarmError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limited"


class BadGateway(SwarmError):
    """The upstream answered, but not as asked (a backend that ignored a JSON format)."""

    status_code = 502
    type = "upstream_error"
    code = "bad_gateway"


class ServiceUnavailable(SwarmError):
    status_code = 503
    type = "service_unavailable"
    code = "unavailable"


def is_ollama_path(path: str) -> bool:
    """Ollama-style paths answer errors as Ollama does: ``{"error": "message"}``. The
    router's ``/api/usage/...`` and ``/api/agents`` are the project's own API, in the
    envelope."""
    own = path.startswith(("/api/usage", "/api/agents"))
    return (path.startswith("/api/") and not own) or path == "/generate"


def error_response(path: str, error: SwarmError) -> JSONResponse:
    request_id = current_request_id()
    if is_ollama_path(path):
        body = OllamaError(error=error.message).model_dump()
    else:
        detail = ErrorDetail(
            message=error.message,
            type=error.type,
            code=error.code,
            param=error.param,
            request_id=request_id,
        )
        body = ErrorEnvelope(error=detail).model_dump(exclude_none=True)
    headers = dict(error.headers)
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    return JSONResponse(body, status_code=error.status_code, headers=headers)


_HTTP_STATUS_ERRORS: dict[int, type[SwarmError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    408: RequestTimeout,
    413: PayloadTooLarge,
    422: ValidationFailed,
    429: RateLimited,
    503: ServiceUnavailable,
}


def unparsed_body(errors: list[dict]) -> str | None:
    """Why a body is not JSON at all, or None when it is JSON that fails validation.

    One status per kind, on every path (issue 13): a body that does not parse (or is
    missing) is a 400, as OpenAI and Ollama answer it; JSON of the wrong shape is a 422.
    """
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = error.get("ctx", {}).get("error") or error.get("msg", "")
            return f"the body is not valid JSON: {detail}"
        if error.get("type") == "missing" and tuple(error.get("loc", ())) == ("body",):
            return "the request has no body; it must be a JSON object"
    return None


def install_error_handlers(app: FastAPI) -> None:
    async def on_swarm_error(request: Request, exc: SwarmError) -> JSONResponse:
        return error_response(request.url.path, exc)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if (reason := unparsed_body(errors)) is not None:
            return error_response(request.url.path, BadRequest(reason, code="invalid_json"))
        param = ".".join(str(p) for p in errors[0]["loc"][1:]) if errors else None
        error = ValidationFailed(describe_validation_errors(errors), param=param or None)
        return error_response(request.url.path, error)

    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, ClientDisconnect):
            # FastAPI reports a body it could not read as a 400, a client that left too:
            # nobody is there to answer; it is counted and logged as what it is (metrics).
            raise exc.__cause__
        kind = _HTTP_STATUS_ERRORS.get(exc.status_code, SwarmError)
        error = kind(str(exc.detail), headers=exc.headers)
        error.status_code = exc.status_code
        if kind is SwarmError:
            error.type, error.code = "invalid_request_error", f"http_{exc.status_code}"
        return error_response(request.url.path, error)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request.url.path, SwarmError("internal error"))

    app.add_exception_handler(SwarmError, on_swarm_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
