"""The registry's passing agents, as the router last read them.

A request never waits on the registry: the router reads every passing agent in the
background every ``discovery_refresh_seconds`` and routes from that snapshot. While the
registry cannot be read (any of its replicas: ``http`` fails over between them, see
services.common.http.Failover), the last snapshot stays (with its age in ``/health``): agents
that stop answering are caught by the circuit breakers, not by the registry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import httpx
from pydantic import ValidationError

from router.candidates import Candidate, by_capability
from schemas.agents import AgentList, AgentRecord
from services.common.http import Failover

log = logging.getLogger(__name__)

PAGE = 1_000
MAX_AGENTS = 100_000  # a bound on what one refresh reads


class Directory:
    def __init__(
        self,
        http: Failover | httpx.AsyncClient,
        *,
        interval: float,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.http = http if isinstance(http, Failover) else Failover([http])
        self.interval = interval
        self.clock = clock
        self.sleep = sleep
        self.agents: list[AgentRecord] = []
        self.by_capability: dict[str, list[Candidate]] = {}  # router.candidates.by_capability
        self.by_model: dict[str, AgentRecord] = {}  # the first agent serving each model
        self.read_at: float | None = None
        self.error: str | None = None

    async def refresh(self) -> None:
        """Read every passing agent; keep the last snapshot if the registry fails."""
        try:
            agents = await read_agents(self.http, most=MAX_AGENTS, status="passing")
        except (httpx.HTTPError, ValidationError) as exc:
            self.error = f"no registry ({self.http.peers}) can be read: {exc}"
            log.warning("%s", self.error)
            return
        self.agents, self.read_at, self.error = agents, self.clock(), None
        self.by_capability = by_capability(agents)
        self.by_model = {}
        for agent in agents:
            if "model" in agent.metadata:
                self.by_model.setdefault(str(agent.metadata["model"]), agent)

    async def run(self) -> None:
        while True:
            await self.refresh()
            await self.sleep(self.interval)

    def age(self) -> float | None:
        return None if self.read_at is None else round(self.clock() - self.read_at, 3)


async def read_agents(
    http: Failover | httpx.AsyncClient, *, most: int, status: str | None = None
) -> list[AgentRecord]:
    """The registry's agents (of ``status`` only, when given), page by page, at most
    ``most``. Raises what the client or the validation raise."""
    agents: list[AgentRecord] = []
    while len(agents) < most:
        limit = min(PAGE, most - len(agents))
        params = {"limit": limit, "offset": len(agents)} | ({"status": status} if status else {})
        response = await http.get("/agents", params=params)
        response.raise_for_status()
        page = AgentList.model_validate_json(response.content).agents
        agents += page
        if len(page) < limit:
            break
    return agents
