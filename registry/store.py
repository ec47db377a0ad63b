"""Registrations, heartbeats and discovery, with liveness computed from the clock.

Liveness follows Consul's TTL checks: each heartbeat moves ``expires_at`` to now + TTL.
Past it an agent is ``critical`` and not discovered; ``reap_after`` seconds later the
reaper removes it. Nothing here sleeps: time comes from the injected clock.

Each heartbeat replaces the agent's load (schemas.agents.AgentLoad; none reported: unknown).
A load is answered while it is younger than the agent's TTL, as null past it: a stale report
is unknown, not zero. Both are decided by the database at read time, like the status.
A load is reported with a heartbeat and stale one TTL later, when the agent expires: only an
expired agent has a stale load.

Queries use SQLAlchemy Core over the SQLModel tables: these are the hot paths, and the
ORM's identity map and session bookkeeping cost more than the queries themselves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import (
    Engine,
    bindparam,
    case,
    delete,
    func,
    insert,
    inspect,
    null,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy.exc import IntegrityError

from registry.tables import TABLES, AgentRow, CapabilityRow
from schemas.agents import (
    AgentDefinition,
    AgentRecord,
    CheckStatus,
    DiscoverRequest,
    Heartbeat,
    HeartbeatAck,
    definition_fingerprint,
)
from services.common.database import Runner, schema_turn
from services.common.errors import NotFound

log = logging.getLogger(__name__)

Clock = Callable[[], float]

AGENTS = AgentRow.__table__
CAPABILITIES = CapabilityRow.__table__
STORED_FIELDS = [name for name in AgentRecord.model_fields if name != "status"]
_RECORD_KEYS = [*STORED_FIELDS, "status"]
_RECORDS = TypeAdapter(list[AgentRecord])
# How far _rarity_query counts a capability: far enough to tell rare from common, short
# enough that counting a capability every agent has stays well under a millisecond.
RAREST_PROBE = 2_000
# The key of the PostgreSQL advisory lock replicas take to create the tables in turn.
SCHEMA_LOCK = 0x5377_6172_6D52_6567  # "SwarmReg"
# The columns discovery and listing filter on by equality.
LABELS = ("tier", "locality", "role")


def _load_is_fresh(now: float | Any):
    """Whether the stored load may be answered at ``now``: reported within the agent's TTL
    (false when none was reported)."""
    return AGENTS.c.load_reported_at + AGENTS.c.ttl_seconds >= now


def record_columns(now: float | Any) -> list:
    """The columns of an AgentRecord, with the status and the load (null once stale)
    computed by the database at ``now``."""
    status = case((AGENTS.c.expires_at < now, "critical"), else_=AGENTS.c.check_status)
    fresh = case((_load_is_fresh(now), AGENTS.c.load), else_=null())
    computed = {"load": type_coerce(fresh, AGENTS.c.load.type).label("load")}
    columns = [computed[name] if name in computed else AGENTS.c[name] for name in STORED_FIELDS]
    return [*columns, status.label("status")]


def _expected_wait_key(now: float | Any):
    """The sort key of discovery by expected wait: the reported one, NULL once stale."""
    return case((_load_is_fresh(now), AGENTS.c.expected_wait_ms), else_=null())


_HEARTBEAT = (
    update(AGENTS)
    .where(AGENTS.c.agent_id == bindparam("target"))
    .values(
        last_heartbeat=bindparam("now"),
        expires_at=AGENTS.c.ttl_seconds + bindparam("now"),
        check_status=bindparam("status"),
        output=bindparam("output"),
        load=bindparam("load"),
        load_reported_at=bindparam("load_reported_at"),
        expected_wait_ms=bindparam("wait"),
    )
    .returning(AGENTS.c.expires_at, AGENTS.c.fingerprint)
)
# The copy of the wait that discovery sorts by (CapabilityRow), written only when it changed:
# an idle agent's heartbeats repeat it.
_HEARTBEAT_WAIT = (
    update(CAPABILITIES)
    .where(
        CAPABILITIES.c.agent_id == bindparam("target"),
        CAPABILITIES.c.expected_wait_ms.is_distinct_from(bindparam("wait")),
    )
    .values(expected_wait_ms=bindparam("wait"))
)
_REAP = delete(AGENTS).where(AGENTS.c.expires_at < bindparam("cutoff")).returning(AGENTS.c.agent_id)
_GET = select(*record_columns(bindparam("now"))).where(AGENTS.c.agent_id == bindparam("target"))


class Prepared:
    """Statements compiled once for the engine's dialect and run on the driver's cursor.

    Heartbeats are the registry's hottest write: SQLAlchemy's per-execution bookkeeping
    costs more than SQLite's update itself. Compiling per dialect keeps it portable.
    """

    def __init__(self, engine: Engine, *statements) -> None:
        self.engine = engine
        self.statements = []
        for statement in statements:
            compiled = statement.compile(dialect=engine.dialect)
            positions = compiled.positiontup if compiled.positional else None
            self.statements.append((str(compiled), positions))

    def run(self, params: dict[str, Any]) -> tuple | None:
        """Execute in one transaction; return the first statement's first row. Without one
        (nothing matched), the statements after it are not run."""
        connection = self.engine.raw_connection()
        try:
            cursor = connection.cursor()
            first = None
            for index, (sql, positions) in enumerate(self.statements):
                cursor.execute(sql, params if positions is None else [params[n] for n in positions])
                if index == 0:
                    first = cursor.fetchone()
                    if first is None:
                        break
            cursor.close()
            connection.commit()
        finally:
            connection.close()  # back to the pool, rolled back if not committed
        return first


class AgentStore:
    def __init__(
        self, engine: Engine, clock: Clock, *, default_ttl: float, reap_after: float
    ) -> None:
        self.engine = engine
        self._heartbeat = Prepared(engine, _HEARTBEAT, _HEARTBEAT_WAIT)
        self.clock = clock
        self.default_ttl = default_ttl
        self.reap_after = reap_after

    def create_tables(self) -> None:
        """Create the tables; tables of another version are replaced, not migrated.

        Registrations are soft state: every agent registers again on its next heartbeat
        (the registry answers 404), so starting empty loses nothing an agent cannot resend.
        Replicas starting at once on one PostgreSQL take turns (an advisory lock held to the
        commit; PostgreSQL's DDL is transactional): one creates, the others find the tables.
        """
        with schema_turn(self.engine, SCHEMA_LOCK) as conn:
            found = inspect(conn)
            for table in TABLES:
                if found.has_table(table.name) and _shape(found, table.name) != _shape(table):
                    log.warning(
                        "the %s table is from another version of the registry: replacing the "
                        "tables; agents register again on their next heartbeat",
                        table.name,
                    )
                    AgentRow.metadata.drop_all(conn, tables=TABLES)
                    break
            AgentRow.metadata.create_all(conn, tables=TABLES)

    def register(self, definition: AgentDefinition) -> AgentRecord:
        """Insert or replace an agent; registering also counts as a heartbeat."""
        now = self.clock()
        ttl = definition.ttl_seconds or self.default_ttl
        agent_id = definition.agent_id
        values = definition.model_dump(exclude={"agent_id", "ttl_seconds"}) | {
            "ttl_seconds": ttl,
            "check_status": "passing",
            "output": "",
            # A new definition starts of unknown load; its first heartbeat follows at once.
            "load": None,
            "load_reported_at": None,
            "expected_wait_ms": None,
            "last_heartbeat": now,
            "expires_at": now + ttl,
            # What the agent computes from the record this registration answers.
            "fingerprint": definition_fingerprint(
                definition.model_copy(update={"ttl_seconds": float(ttl)})
            ),
        }
        capability_rows = [{"agent_id": agent_id, "capability": c} for c in definition.capabilities]
        # Two first registrations of one agent can race to INSERT; the loser retries
        # and takes the UPDATE path. Portable, unlike dialect-specific upserts.
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    updated = conn.execute(
                        update(AGENTS).where(AGENTS.c.agent_id == agent_id).values(values)
                    )
                    if updated.rowcount == 0:
                        row = values | {"agent_id": agent_id, "registered_at": now}
                        conn.execute(insert(AGENTS).values(row))
                    conn.execute(delete(CAPABILITIES).where(CAPABILITIES.c.agent_id == agent_id))
                    conn.execute(insert(CAPABILITIES), capability_rows)
                    stored = conn.execute(_GET, {"target": agent_id, "now": now}).one()
                return _records([stored])[0]
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def heartbeat(self, agent_id: str, beat: Heartbeat) -> HeartbeatAck:
        now = self.clock()
        load = beat.reported_load()
        params = {
            "target": agent_id,
            "now": now,
            "status": beat.status,
            "output": beat.output,
            # Serialized here: the prepared statement bypasses SQLAlchemy's JSON type.
            "load": None if load is None else load.model_dump_json(exclude_none=True),
            "load_reported_at": None if load is None else now,
            "wait": None if load is None else load.expected_wait_ms,
        }
        row = self._heartbeat.run(params)
        if row is None:
            raise _not_found(agent_id)
        return HeartbeatAck(
            agent_id=agent_id,
            status=beat.status,
            expires_at=datetime.fromtimestamp(row[0], UTC),
            fingerprint=row[1],
        )

    def deregister(self, agent_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(CAPABILITIES).where(CAPABILITIES.c.agent_id == agent_id))
            removed = conn.execute(delete(AGENTS).where(AGENTS.c.agent_id == agent_id))
        if removed.rowcount == 0:
            raise _not_found(agent_id)

    def get(self, agent_id: str) -> AgentRecord:
        with self.engine.connect() as conn:
            row = conn.execute(_GET, {"target": agent_id, "now": self.clock()}).first()
        if row is None:
            raise _not_found(agent_id)
        return _records([row])[0]

    def list(
        self,
        *,
        capability: str | None = None,
        status: CheckStatus | None = None,
        tier: int | None = None,
        locality: str | None = None,
        role: str | None = None,
        limit: int,
        offset: int = 0,
    ) -> list[AgentRecord]:
        now = self.clock()
        if status == "critical":
            health = [or_(AGENTS.c.expires_at < now, AGENTS.c.check_status == "critical")]
        elif status is not None:
            health = [AGENTS.c.expires_at >= now, AGENTS.c.check_status == status]
        else:
            health = []
        conditions = [*health, *_labels(tier=tier, locality=locality, role=role)]
        query = _having_all([capability] if capability else [], conditions, now)
        # Pages need a stable order; discovery does not, and is faster without one.
        query = query.order_by(AGENTS.c.agent_id).offset(offset).limit(limit)
        return self._fetch(query)

    def discover(self, request: DiscoverRequest) -> list[AgentRecord]:
        params: dict[str, Any] = {"now": self.clock(), "limit": request.limit}
        capabilities = request.capabilities
        match_any = request.match == "any" and len(capabilities) > 1
        with self.engine.connect() as conn:
            if not match_any and len(capabilities) > 1:
                counts = conn.execute(_rarity_query(len(capabilities)), _numbered(capabilities))
                found = counts.one()
                capabilities = [c for _, c in sorted(zip(found, capabilities, strict=True))]
            params |= _numbered(capabilities)
            labels = {name: getattr(request, name) for name in LABELS}
            params |= labels
            params["probe_limit"] = request.limit * len(capabilities)
            by_wait = request.sort == "expected_wait"
            if by_wait and capabilities:
                groups = [[c] for c in capabilities] if match_any else [capabilities]
                filtered = frozenset(name for name, value in labels.items() if value is not None)
                return _by_wait(conn, groups, filtered, not request.include_unhealthy, params)
            shape = (
                match_any,
                len(capabilities),
                frozenset(name for name, value in labels.items() if value is not None),
                not request.include_unhealthy,
                by_wait,
            )
            found = _records(conn.execute(_discover_query(*shape), params).all())
        return found if by_wait else sorted(found, key=lambda record: record.agent_id)

    def reap(self) -> list[str]:
        """Remove agents critical for longer than the grace; return their ids.

        One DELETE tests the expiry and removes (its capabilities by the cascade), so it is
        safe to run in every replica at once: a heartbeat committed before it makes the
        agent not match (PostgreSQL re-checks the condition on the row's newest version);
        one that comes later waits for it, finds no agent, and the agent registers again.
        Selecting the ids first and deleting them by id would remove an agent whose
        heartbeat landed in between.
        """
        cutoff = self.clock() - self.reap_after
        with self.engine.begin() as conn:
            return list(conn.execute(_REAP, {"cutoff": cutoff}).scalars())

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(AGENTS)).scalar_one()

    def count_by_status(self) -> dict[str, int]:
        now = self.clock()
        expired = func.sum(case((AGENTS.c.expires_at < now, 1), else_=0))
        query = select(AGENTS.c.check_status, func.count(), expired).group_by(AGENTS.c.check_status)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        counts = {"passing": 0, "warning": 0, "critical": 0}
        for check_status, total, expired_count in rows:
            counts["critical"] += expired_count or 0
            counts[check_status] += total - (expired_count or 0)
        return counts

    def _fetch(self, query) -> list[AgentRecord]:
        with self.engine.connect() as conn:
            return _records(conn.execute(query).all())


def _shape(source, name: str | None = None) -> tuple:
    """A table's columns and the ON DELETE of its foreign keys: of ``source`` (a Table),
    or of the stored table ``name`` as ``source`` (an Inspector) reflects it."""
    if name is None:
        columns = {column.name for column in source.columns}
        keys = {
            (key.column.table.name, (key.ondelete or "").upper()) for key in source.foreign_keys
        }
    else:
        columns = {column["name"] for column in source.get_columns(name)}
        keys = {
            (key["referred_table"], (key.get("options", {}).get("ondelete") or "").upper())
            for key in source.get_foreign_keys(name)
        }
    return columns, keys


def _records(rows) -> list[AgentRecord]:
    # One validation pass in pydantic-core for the whole page: epoch floats become
    # datetimes there, much faster than building each record in Python.
    return _RECORDS.validate_python([dict(zip(_RECORD_KEYS, row, strict=True)) for row in rows])


def _not_found(agent_id: str) -> NotFound:
    return NotFound(f"agent {agent_id!r} is not registered", code="agent_not_found")


def _labels(**wanted: Any) -> list:
    """Conditions on the label columns (tier, locality, role) given a value."""
    return [AGENTS.c[name] == value for name, value in wanted.items() if value is not None]


def _numbered(capabilities: list[str]) -> dict[str, str]:
    return {f"capability_{i}": capability for i, capability in enumerate(capabilities)}


def _capability_params(count: int) -> list:
    return [bindparam(f"capability_{i}") for i in range(count)]


# Discovery statements are built once per shape and reused with bound values: building a
# statement costs SQLAlchemy more than SQLite takes to run it.
@functools.lru_cache(maxsize=512)
def _rarity_query(count: int):
    """How many agents have each capability, counted up to RAREST_PROBE.

    The first capability drives the walk in _having_all; driving by a popular one would
    probe thousands of agents to find the few that also have a rare one.
    """
    counts = [
        select(func.count())
        .select_from(
            select(CAPABILITIES.c.agent_id)
            .where(CAPABILITIES.c.capability == capability)
            .limit(RAREST_PROBE)
            .subquery()
        )
        .scalar_subquery()
        for capability in _capability_params(count)
    ]
    return select(*counts)


@functools.lru_cache(maxsize=512)
def _discover_query(
    match_any: bool, count: int, labels: frozenset[str], healthy_only: bool, by_wait: bool
):
    """Discovery of one shape; values bind as now, limit, probe_limit, the ``labels``
    filtered on and capability_0.. (rarest first for match all).

    ``by_wait`` orders every match by expected wait (unknown last) before the limit: the
    database then reads all the matches, where unordered it stops at the limit. Only
    discovery without a capability takes this way; with one, see _by_wait.
    """
    now = bindparam("now")
    conditions = _labels(**{name: bindparam(name) for name in labels})
    if healthy_only:
        conditions += [AGENTS.c.expires_at >= now, AGENTS.c.check_status != "critical"]
    capabilities = _capability_params(count)
    if match_any:
        probe_limit = None if by_wait else bindparam("probe_limit")
        query = _having_any(capabilities, conditions, now, probe_limit)
    else:
        query = _having_all(capabilities, conditions, now)
    if by_wait:
        query = query.order_by(_expected_wait_key(now).asc().nulls_last(), AGENTS.c.agent_id)
    return query.limit(bindparam("limit"))


def _by_wait(
    conn, groups: list[list[str]], labels: frozenset[str], healthy_only: bool, params: dict
) -> list[AgentRecord]:
    """Discovery sorted by expected wait: the agents of a known wait, lowest first, then
    those of an unknown one; ties and the unknown ones by agent id.

    Each walk reads a capability's agents from ix_agent_capabilities_wait in the order
    wanted and stops at the limit. Match any (one group per capability) merges the walks:
    an agent among the first ``limit`` of the union is among the first of each of its
    capabilities. The unknown ones are read only when the known ones fall short.
    """

    def walk(known: bool, limit: int) -> list:
        rows: dict[str, Any] = {}
        for group in groups:
            query = _wait_walk_query(len(group), labels, healthy_only, known)
            for row in conn.execute(query, params | _numbered(group) | {"limit": limit}):
                rows.setdefault(row.agent_id, row)
        if known:
            return sorted(rows.values(), key=lambda row: (row.wait_key, row.agent_id))[:limit]
        return sorted(rows.values(), key=lambda row: row.agent_id)[:limit]

    found = walk(True, params["limit"])
    if len(found) < params["limit"]:
        # On a network database a heartbeat may land between the walks: one answer each.
        known = {row.agent_id for row in found}
        unknown = walk(False, params["limit"] - len(found))
        found += [row for row in unknown if row.agent_id not in known]
    # The walks select the sort key after the record's columns.
    return _records([row[:-1] for row in found])


@functools.lru_cache(maxsize=512)
def _wait_walk_query(count: int, labels: frozenset[str], healthy_only: bool, known: bool):
    """The matches of capability_0.. (rarest first) of a known wait, by wait then agent id,
    or of an unknown wait, by agent id; values bind as in _discover_query."""
    now = bindparam("now")
    conditions = _labels(**{name: bindparam(name) for name in labels})
    if healthy_only:
        conditions += [AGENTS.c.expires_at >= now, AGENTS.c.check_status != "critical"]
    wait = CAPABILITIES.c.expected_wait_ms
    if known:
        conditions += [wait.is_not(None), _load_is_fresh(now)]
        order = [wait, CAPABILITIES.c.agent_id]
    else:
        unknown = wait.is_(None)
        if not healthy_only:  # only an expired agent has a stale load (module docstring)
            unknown = or_(unknown, ~_load_is_fresh(now))
        conditions.append(unknown)
        order = [CAPABILITIES.c.agent_id]
    query = _having_all(_capability_params(count), conditions, now)
    return query.add_columns(wait.label("wait_key")).order_by(*order).limit(bindparam("limit"))


def _having_all(capabilities: list, conditions: list, now: Any):
    """Agents with every capability.

    Unordered, so that the database can drive the walk by whichever index is most
    selective (the first capability's, or the role's) and stop at the LIMIT; the other
    capabilities are probed through the primary key.
    """
    columns = record_columns(now)
    if not capabilities:
        return select(*columns).where(*conditions)
    first, *others = capabilities
    query = (
        select(*columns)
        .select_from(CAPABILITIES.join(AGENTS, CAPABILITIES.c.agent_id == AGENTS.c.agent_id))
        .where(CAPABILITIES.c.capability == first, *conditions)
    )
    for other in others:
        probe = CAPABILITIES.alias()
        query = query.where(
            select(probe.c.agent_id)
            .where(probe.c.agent_id == AGENTS.c.agent_id, probe.c.capability == other)
            .exists()
        )
    return query


def _having_any(capabilities: list, conditions: list, now: Any, probe_limit: Any | None):
    """Agents with any of the capabilities.

    The capability indexes are read only until enough matches are found (an agent appears
    once per capability it matches, hence probe_limit = limit x capabilities), instead of
    walking every agent or sorting every match; ``None``: every match (to sort them).
    """
    matches = (
        select(CAPABILITIES.c.agent_id)
        .select_from(CAPABILITIES.join(AGENTS, CAPABILITIES.c.agent_id == AGENTS.c.agent_id))
        .where(CAPABILITIES.c.capability.in_(capabilities), *conditions)
    )
    if probe_limit is not None:
        matches = matches.limit(probe_limit)
    return select(*record_columns(now)).where(AGENTS.c.agent_id.in_(matches))


async def reap_periodically(
    store: AgentStore,
    interval: float,
    *,
    run: Runner,
    on_reaped: Callable[[int], object] = lambda count: None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """The background reaper; a failed round is logged and retried next round."""
    while True:
        await sleep(interval)
        try:
            removed = await run(store.reap)
        except Exception:
            log.exception("reaping expired agents failed")
            continue
        if removed:
            on_reaped(len(removed))
            log.info("reaped %d expired agent(s): %s", len(removed), ", ".join(removed[:20]))
