"""Registrations, heartbeats and discovery, with liveness computed from the clock.

Liveness follows Consul's TTL checks: each heartbeat moves ``expires_at`` to now + TTL.
Past it an agent is ``critical`` and not discovered; ``reap_after`` seconds later the
reaper removes it. Nothing here sleeps: time comes from the injected clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from sqlalchemy import Engine, case, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from registry.tables import TABLES, AgentRow, CapabilityRow
from schemas.agents import (
    AgentDefinition,
    AgentRecord,
    CheckStatus,
    DiscoverRequest,
    Heartbeat,
    HeartbeatAck,
)
from services.common.errors import NotFound

log = logging.getLogger(__name__)

Clock = Callable[[], float]


def _when(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class AgentStore:
    def __init__(
        self, engine: Engine, clock: Clock, *, default_ttl: float, reap_after: float
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.default_ttl = default_ttl
        self.reap_after = reap_after

    def create_tables(self) -> None:
        AgentRow.metadata.create_all(self.engine, tables=TABLES)

    def register(self, definition: AgentDefinition) -> AgentRecord:
        """Insert or replace an agent; registering also counts as a heartbeat."""
        now = self.clock()
        ttl = definition.ttl_seconds or self.default_ttl
        values = definition.model_dump(exclude={"agent_id", "metadata", "ttl_seconds"}) | {
            "meta": definition.metadata,
            "ttl_seconds": ttl,
            "check_status": "passing",
            "output": "",
            "in_flight": None,
            "latency_ms": None,
            "last_heartbeat": now,
            "expires_at": now + ttl,
        }
        agent_id = definition.agent_id
        # Two first registrations of one agent can race to INSERT; the loser retries
        # and takes the UPDATE path. Portable, unlike dialect-specific upserts.
        for attempt in range(3):
            try:
                with Session(self.engine) as session:
                    updated = session.exec(
                        update(AgentRow).where(AgentRow.agent_id == agent_id).values(**values)
                    )
                    if updated.rowcount == 0:
                        session.add(AgentRow(agent_id=agent_id, registered_at=now, **values))
                        session.flush()
                    session.exec(delete(CapabilityRow).where(CapabilityRow.agent_id == agent_id))
                    session.add_all(
                        CapabilityRow(agent_id=agent_id, capability=capability)
                        for capability in definition.capabilities
                    )
                    session.commit()
                    row = session.get(AgentRow, agent_id)
                    return self._record(row, now)
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def heartbeat(self, agent_id: str, beat: Heartbeat) -> HeartbeatAck:
        now = self.clock()
        with Session(self.engine) as session:
            result = session.exec(
                update(AgentRow)
                .where(AgentRow.agent_id == agent_id)
                .values(
                    last_heartbeat=now,
                    expires_at=AgentRow.ttl_seconds + now,
                    check_status=beat.status,
                    output=beat.output,
                    in_flight=beat.in_flight,
                    latency_ms=beat.latency_ms,
                )
            )
            if result.rowcount == 0:
                raise NotFound(f"agent {agent_id!r} is not registered", code="agent_not_found")
            expires_at = session.exec(
                select(AgentRow.expires_at).where(AgentRow.agent_id == agent_id)
            ).scalar_one()
            session.commit()
        return HeartbeatAck(agent_id=agent_id, status=beat.status, expires_at=_when(expires_at))

    def deregister(self, agent_id: str) -> None:
        with Session(self.engine) as session:
            session.exec(delete(CapabilityRow).where(CapabilityRow.agent_id == agent_id))
            removed = session.exec(delete(AgentRow).where(AgentRow.agent_id == agent_id))
            session.commit()
        if removed.rowcount == 0:
            raise NotFound(f"agent {agent_id!r} is not registered", code="agent_not_found")

    def get(self, agent_id: str) -> AgentRecord:
        with Session(self.engine) as session:
            row = session.get(AgentRow, agent_id)
        if row is None:
            raise NotFound(f"agent {agent_id!r} is not registered", code="agent_not_found")
        return self._record(row, self.clock())

    def list(
        self,
        *,
        capability: str | None = None,
        status: CheckStatus | None = None,
        tier: str | None = None,
        role: str | None = None,
        limit: int,
        offset: int = 0,
    ) -> list[AgentRecord]:
        now = self.clock()
        query = select(AgentRow)
        if capability:
            query = query.where(AgentRow.agent_id.in_(_having_capabilities([capability], "all")))
        if status == "critical":
            query = query.where(or_(AgentRow.expires_at < now, AgentRow.check_status == "critical"))
        elif status is not None:
            query = query.where(AgentRow.expires_at >= now, AgentRow.check_status == status)
        return self._select(_filtered(query, tier, role).offset(offset).limit(limit), now)

    def discover(self, request: DiscoverRequest) -> list[AgentRecord]:
        now = self.clock()
        query = select(AgentRow)
        if request.capabilities:
            query = query.where(
                AgentRow.agent_id.in_(_having_capabilities(request.capabilities, request.match))
            )
        if not request.include_unhealthy:
            query = query.where(AgentRow.expires_at >= now, AgentRow.check_status != "critical")
        query = _filtered(query, request.tier, request.role).limit(request.limit)
        return self._select(query, now)

    def reap(self) -> list[str]:
        """Remove agents critical for longer than the grace; return their ids."""
        cutoff = self.clock() - self.reap_after
        with Session(self.engine) as session:
            expired = select(AgentRow.agent_id).where(AgentRow.expires_at < cutoff)
            agent_ids = list(session.exec(expired).scalars())
            if agent_ids:
                session.exec(delete(CapabilityRow).where(CapabilityRow.agent_id.in_(agent_ids)))
                session.exec(delete(AgentRow).where(AgentRow.agent_id.in_(agent_ids)))
                session.commit()
        return agent_ids

    def count_by_status(self) -> dict[str, int]:
        now = self.clock()
        expired = func.sum(case((AgentRow.expires_at < now, 1), else_=0))
        query = select(AgentRow.check_status, func.count(), expired).group_by(AgentRow.check_status)
        with Session(self.engine) as session:
            rows = session.exec(query).all()
        counts = {"passing": 0, "warning": 0, "critical": 0}
        for check_status, total, expired_count in rows:
            counts["critical"] += expired_count or 0
            counts[check_status] += total - (expired_count or 0)
        return counts

    def _select(self, query, now: float) -> list[AgentRecord]:
        with Session(self.engine) as session:
            rows = session.exec(query.order_by(AgentRow.agent_id)).scalars().all()
        return [self._record(row, now) for row in rows]

    @staticmethod
    def _record(row: AgentRow, now: float) -> AgentRecord:
        status = "critical" if now > row.expires_at else row.check_status
        # Rows were validated on the way in; construct without validating again.
        return AgentRecord.model_construct(
            agent_id=row.agent_id,
            name=row.name,
            tier=row.tier,
            role=row.role,
            capabilities=row.capabilities,
            endpoint=row.endpoint,
            transport=row.transport,
            cost_per_1k_tokens=row.cost_per_1k_tokens,
            metadata=row.meta,
            ttl_seconds=row.ttl_seconds,
            status=status,
            output=row.output,
            registered_at=_when(row.registered_at),
            last_heartbeat=_when(row.last_heartbeat),
            expires_at=_when(row.expires_at),
            in_flight=row.in_flight,
            latency_ms=row.latency_ms,
        )


def _having_capabilities(capabilities: list[str], match: str):
    query = (
        select(CapabilityRow.agent_id)
        .where(CapabilityRow.capability.in_(capabilities))
        .group_by(CapabilityRow.agent_id)
    )
    if match == "all":
        query = query.having(func.count() == len(capabilities))
    return query


def _filtered(query, tier: str | None, role: str | None):
    if tier:
        query = query.where(AgentRow.tier == tier)
    if role:
        query = query.where(AgentRow.role == role)
    return query


async def reap_periodically(
    store: AgentStore,
    interval: float,
    *,
    on_reaped: Callable[[int], object] = lambda count: None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """The background reaper; a failed round is logged and retried next round."""
    while True:
        await sleep(interval)
        try:
            removed = await asyncio.to_thread(store.reap)
        except Exception:
            log.exception("reaping expired agents failed")
            continue
        if removed:
            on_reaped(len(removed))
            log.info("reaped %d expired agent(s): %s", len(removed), ", ".join(removed[:20]))
