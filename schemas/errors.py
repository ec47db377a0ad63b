"""Error bodies as clients see them."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    request_id: str | None = None


class ErrorEnvelope(BaseModel):
    """OpenAI-style endpoints: ``{"error": {"message", "type", "code", "request_id"}}``."""

    error: ErrorDetail


class OllamaError(BaseModel):
    """Ollama-style endpoints (``/api/*``, ``/generate``): ``{"error": "message"}``."""

    error: str


def describe_validation_errors(errors: list[dict]) -> str:
    """One line out of pydantic's error list: ``key.path: problem (got value)``."""
    parts = []
    for error in errors:
        key = ".".join(str(p) for p in error.get("loc", ()))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        got = error.get("input")
        shown = ""
        if isinstance(got, str | int | float | bool) and not _is_secret(key):
            text = repr(got)
            shown = f" (got {text[:80]}{'…' if len(text) > 80 else ''})"
        parts.append(f"{key}: {message}{shown}" if key else message)
    return "; ".join(parts)


def _is_secret(key: str) -> bool:
    # URLs may carry credentials (user:password@host), so they are never echoed either.
    words = ("token", "key", "secret", "password", "url", "endpoint")
    return any(word in key.lower() for word in words)
