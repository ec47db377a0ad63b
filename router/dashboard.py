"""The cost dashboard (DESIGN 5): one page and its script and style, served by the router
from the project so that it works offline, and the registry's agents with their health
for its table. The page draws everything else from ``/api/usage/...``."""

from __future__ import annotations

from pathlib import Path

import httpx
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import FileResponse, Response

from router.directory import read_agents
from router.routes import router_of
from schemas.agents import AgentList
from schemas.errors import ErrorEnvelope
from services.common.errors import NotFound, ServiceUnavailable
from services.common.streaming import json_response

STATIC = Path(__file__).resolve().parent / "static"
PAGE_FILE = "dashboard.html"
# The assets by name: nothing else under static/ (or elsewhere) can be asked for.
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
MAX_AGENTS = 10_000  # a bound on what one answer reads: the page asks every 5 s
RETRY_AFTER_SECONDS = "5"
# Same origin only: a stray external reference (a CDN, a web font) fails in the browser
# at once instead of working only while online.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Revalidated on every load (the ETag makes that cheap): a restarted router's new page
# and script arrive together.
HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": CSP}

router = APIRouter()


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> Response:
    return FileResponse(STATIC / PAGE_FILE, media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/dashboard/static/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no dashboard asset {name!r}", param="name")
    return FileResponse(STATIC / name, media_type=media_type, headers=HEADERS)


@router.get(
    "/api/agents",
    response_model=AgentList,
    responses={503: {"model": ErrorEnvelope}},
    summary="The registry's agents, every status, for the dashboard",
)
async def agents(request: Request) -> Response:
    """Read live from the registry (not the router's snapshot, which keeps passing agents
    only), so the table shows a critical agent as critical rather than as gone."""
    http = router_of(request).directory.http
    try:
        found = await read_agents(http, most=MAX_AGENTS)
    except (httpx.HTTPError, ValidationError) as exc:
        raise ServiceUnavailable(
            f"the registry at {http.base_url} cannot be read: {exc}",
            code="registry_unavailable",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        ) from None
    return json_response(AgentList.model_construct(agents=found))
