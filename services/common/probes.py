"""``GET /healthz`` and ``GET /readyz`` of every daemon, as Kubernetes' probes.

``/healthz``: the process answers (a supervisor restarts one that does not).
``/readyz``: it can do its job now (a router sends nothing to one that cannot): a model host
once a real decode succeeded, a wrapper while its backend serves its model, the registry
while its database answers, the router once it has read the registry.
``/health`` stays the richer report of DESIGN §3.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from starlette.responses import Response

from schemas.health import Probe
from services.common.streaming import json_response

Readiness = Callable[[Request], Awaitable[str | None]]
"""None when the daemon can serve, else why it cannot (one line)."""


def install_probes(app: FastAPI, readiness: Readiness) -> None:
    async def healthz() -> Response:
        return json_response(Probe(status="alive"))

    async def readyz(request: Request) -> Response:
        reason = await readiness(request)
        if reason is None:
            return json_response(Probe(status="ready"))
        return json_response(Probe(status="not_ready", reason=reason), status=503)

    tags = ["Probes"]
    app.add_api_route("/healthz", healthz, methods=["GET"], response_model=Probe, tags=tags)
    app.add_api_route(
        "/readyz",
        readyz,
        methods=["GET"],
        response_model=Probe,
        responses={503: {"model": Probe, "description": "Not ready; `reason` says why."}},
        tags=tags,
    )
