"""Every daemon's published OpenAPI schema, made to say what it serves (issue 13).

FastAPI documents a route's JSON answer and a 422 of its own shape. The daemons also answer
errors in their envelope (``services.common.errors``) from shared plumbing that no route
declares, and some routes stream. :func:`install_openapi` completes the generated schema in
one place: each operation gets the envelope of its path for the errors any route with its
inputs can answer (400 for a body that is not JSON, 413 for one over the limit, 422 for one
that fails validation); routes add what only they can answer (401, 404, 429, 503) and, with
:func:`streaming`, the media type of their stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas.errors import ErrorEnvelope, OllamaError
from services.common.errors import is_ollama_path

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
OLLAMA_STREAMED = (
    "JSON, or NDJSON lines when `stream` is true (the default); a failure after the first "
    'line is a last line `{"error": "..."}`.'
)
COMPONENTS = "#/components/schemas/"

_DESCRIPTIONS = {
    400: "The body is not JSON.",
    401: "A bearer token is needed and was missing or wrong.",
    404: "Not found.",
    413: "The body is over the size limit.",
    422: "The request is JSON but fails validation; the message names the field.",
    429: "Over the client's rate limit; `Retry-After` says when to try again.",
    502: "The backend answered, but not as asked (it ignored the JSON format asked).",
    503: "Cannot serve now (backend down, nothing to route to); `Retry-After` when known.",
}
# Models that streams refer to: put in the schema's components when a route names them.
_STREAMED: dict[str, type[BaseModel]] = {}


def streaming(media_type: str, *items: type[BaseModel], description: str) -> dict[int, Any]:
    """``responses=`` of a route that answers JSON, or a stream when the request asks for
    one: NDJSON lines or SSE events, each one of ``items``."""
    for model in items:
        _STREAMED[model.__name__] = model
    refs = [{"$ref": f"{COMPONENTS}{model.__name__}"} for model in items]
    item = refs[0] if len(refs) == 1 else {"anyOf": refs}
    if media_type == SSE:
        # Before OpenAPI 3.2, an event stream's schema describes one event.
        item = {
            "type": "object",
            "properties": {
                "data": {
                    "type": "string",
                    "description": "JSON of the item, or `[DONE]` after the last one.",
                    "contentMediaType": "application/json",
                    "contentSchema": item,
                }
            },
            "required": ["data"],
        }
    return {200: {"description": description, "content": {media_type: {"schema": item}}}}


def errors(*statuses: int) -> dict[int, Any]:
    """``responses=`` for the errors only a route knows it answers (401, 404, 429, 503);
    the envelope is filled in by :func:`install_openapi` after the route's path."""
    return {status: {"description": _DESCRIPTIONS[status]} for status in statuses}


def install_openapi(app: FastAPI) -> None:
    """Serve ``app``'s OpenAPI schema completed by :func:`document`."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document(schema: dict[str, Any]) -> dict[str, Any]:
    """Complete a generated schema: the error envelopes, and the streamed models."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, operations in schema.get("paths", {}).items():
        envelope = OllamaError if is_ollama_path(path) else ErrorEnvelope
        for operation in operations.values():
            _document_errors(operation, envelope)
    models = [*_STREAMED.values(), OllamaError, ErrorEnvelope]
    _add_components(components, [m for m in models if _refers_to(schema["paths"], m.__name__)])
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)  # FastAPI's 422, replaced above
    return schema


def _document_errors(operation: dict[str, Any], envelope: type[BaseModel]) -> None:
    responses = operation.setdefault("responses", {})
    statuses = {int(status) for status in responses if status.isdigit() and int(status) >= 400}
    if "requestBody" in operation:
        statuses |= {400, 413, 422}
    if operation.get("parameters"):
        statuses.add(422)
    ref = {"$ref": f"{COMPONENTS}{envelope.__name__}"}
    for status in sorted(statuses):
        entry = responses.setdefault(str(status), {})
        entry["description"] = _DESCRIPTIONS.get(status, entry.get("description", "Error."))
        # FastAPI's own 422 (HTTPValidationError) is not what the daemons answer.
        entry["content"] = {"application/json": {"schema": ref}}


def _add_components(components: dict[str, Any], models: list[type[BaseModel]]) -> None:
    missing = [model for model in models if model.__name__ not in components]
    if not missing:
        return
    _, generated = models_json_schema(
        [(model, "serialization") for model in missing],
        ref_template=COMPONENTS + "{model}",
    )
    for name, definition in generated.get("$defs", {}).items():
        components.setdefault(name, definition)


def _refers_to(node: Any, name: str) -> bool:
    if isinstance(node, dict):
        if node.get("$ref") == f"{COMPONENTS}{name}":
            return True
        return any(_refers_to(value, name) for value in node.values())
    if isinstance(node, list):
        return any(_refers_to(value, name) for value in node)
    return False
