"""Usage records: stored through SQLAlchemy (SQLite by default, PostgreSQL by URL), and the
dashboard's queries over them (DESIGN 5; the record kinds are in ``schemas.usage``)."""

from __future__ import annotations

import asyncio
import bisect
import importlib
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    case,
    cast,
    delete,
    func,
    inspect,
    select,
    text,
)

from schemas.usage import (
    LATENCY_BUCKETS_MS,
    AgentUsage,
    UsageBucket,
    UsageByAgent,
    UsageRecord,
    UsageSummary,
    UsageTimeseries,
)
from services.common.database import schema_turn
from services.common.pending import Pending

log = logging.getLogger(__name__)

MAX_LATENCIES = 100_000  # rows read for the percentiles and histograms of one by-agent answer
PRUNE_EVERY_SECONDS = 3_600
# The key of the PostgreSQL advisory lock router replicas take to create the ledger in turn.
SCHEMA_LOCK = 0x5377_6172_6D4C_6467  # "SwarmLdg"
# Dollars to the nano-dollar: a short text embedded at $0.00002 per 1k tokens costs
# $0.0000004, which six decimals would show as nothing.
MONEY_DECIMALS = 9
# The ledger is written on the event loop (SQLite: services.common.database.db_runner),
# so each write holds every call for as long as it takes: ~20 us a row. Written every
# FLUSH_SECONDS, at most WRITE_BATCH rows at a time with calls let in between, a write
# holds them for ~4 ms at most; a second's records at once held them for ~35 ms at
# 2,000 calls a second (the router's p99). A writer thread fared worse: sqlite3 lets go
# of the GIL for every row, and each row then waited for the busy event loop to give it
# back (a backlog of 10,000 records and 17 MB).
FLUSH_SECONDS = 0.1
WRITE_BATCH = 200


# SQLAlchemy Core, not SQLModel: the router reads and writes rows in bulk, never as
# objects, and SQLModel's ORM layer would cost the router ~6 MB of its 80 MB budget.
METADATA = MetaData()
T = Table(
    "usage",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("record_id", String(64), nullable=False, unique=True),
    Column("kind", String(8), nullable=False),
    Column("request_id", String(128), nullable=False, index=True),
    Column("time", Float, nullable=False),  # epoch seconds
    Column("agent_id", String(128)),
    Column("provider", String(64), nullable=False),
    Column("model", String(200), nullable=False),
    Column("capability", String(64)),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("time_to_first_token_ms", Float),
    Column("stream", Boolean, nullable=False),
    Column("status", String(16), nullable=False),
    Column("fallback_from", String(128)),
    Column("cost", Float, nullable=False),
    # Added by issue 14; a database made before has them added at start (add_missing_columns).
    Column("reason", String(16)),
    Column("spill_wait_ms", Float),
    # Added by issue 15: "embeddings", or "chat" (null in a row stored before: a chat call).
    Column("endpoint", String(16)),
    # The dashboard reads a time window of one kind, or of one agent.
    Index("ix_usage_kind_time", "kind", "time"),
    Index("ix_usage_agent_time", "agent_id", "time"),
)


EMBEDDING = T.c.endpoint == "embeddings"


class UsageStore:
    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], float],
        reference_price_per_1k: float,
        reference_embedding_price_per_1k: float = 0.0,
    ) -> None:
        """The reference prices value what the calls would have cost in the cloud: chat
        tokens at ``reference_price_per_1k``, embedding tokens at the embedding price."""
        self.engine = engine
        self.clock = clock
        self.reference_price_per_1k = reference_price_per_1k
        self.reference_embedding_price_per_1k = reference_embedding_price_per_1k
        with schema_turn(engine, SCHEMA_LOCK) as conn:
            METADATA.create_all(conn)
            add_missing_columns(conn, T)
        self._insert = _insert_or_ignore(engine.dialect.name)

    def add(self, records: Sequence[UsageRecord]) -> int:
        """Store records; one already stored (a resent batch) is skipped. Returns how many
        were new."""
        if not records:
            return 0
        rows = [_row(record) for record in records]
        with self.engine.begin() as conn:
            if self._insert is None:  # another database: skip known ids by asking first
                ids = [row["record_id"] for row in rows]
                known = set(conn.execute(select(T.c.record_id).where(T.c.record_id.in_(ids))))
                rows = [row for row in rows if (row["record_id"],) not in known]
                if rows:
                    conn.execute(T.insert(), rows)
                return len(rows)
            if self.engine.dialect.name == "sqlite":
                return conn.execute(self._insert, rows).rowcount
            # psycopg reports no row count for a batch (-1): count what RETURNING gave.
            return len(conn.execute(self._insert, rows).all())

    def prune(self, older_than_seconds: float) -> int:
        with self.engine.begin() as conn:
            cutoff = self.clock() - older_than_seconds
            return conn.execute(delete(T).where(T.c.time < cutoff)).rowcount

    # --- the dashboard's queries ---------------------------------------------------------

    def for_request(self, request_id: str, limit: int = 100) -> list[UsageRecord]:
        """The records of one request (its route and its model calls), oldest first."""
        query = select(T).where(T.c.request_id == request_id).order_by(T.c.time, T.c.id)
        with self.engine.connect() as conn:
            rows = conn.execute(query.limit(limit)).mappings().all()
        return [_record(row) for row in rows]

    def summary(self, window: float) -> UsageSummary:
        since = self.clock() - window
        local = T.c.provider == "local"
        tokens = T.c.prompt_tokens + T.c.completion_tokens
        calls = select(
            func.count(),
            func.coalesce(func.sum(case((local, 1), else_=0)), 0),
            func.coalesce(func.sum(T.c.prompt_tokens), 0),
            func.coalesce(func.sum(T.c.completion_tokens), 0),
            func.coalesce(func.sum(case((local, tokens), else_=0)), 0),
            func.coalesce(func.sum(T.c.cost), 0.0),
            func.coalesce(func.sum(case((T.c.status == "error", 1), else_=0)), 0),
            func.coalesce(func.sum(case((EMBEDDING, 1), else_=0)), 0),
            func.coalesce(func.sum(case((EMBEDDING, T.c.prompt_tokens), else_=0)), 0),
        ).where(T.c.kind == "call", T.c.time >= since)
        routes = select(
            func.count(),
            func.coalesce(func.sum(case((T.c.fallback_from.is_not(None), 1), else_=0)), 0),
            func.coalesce(func.sum(case((T.c.reason == "spill", 1), else_=0)), 0),
        ).where(T.c.kind == "route", T.c.time >= since)
        with self.engine.connect() as conn:
            n, n_local, prompt, completion, local_tokens, cost, errors, n_embed, embed_tokens = (
                conn.execute(calls).one()
            )
            routed, fallbacks, spills = conn.execute(routes).one()
        all_tokens = prompt + completion
        would_embed = embed_tokens / 1000 * self.reference_embedding_price_per_1k
        would = (all_tokens - embed_tokens) / 1000 * self.reference_price_per_1k + would_embed
        return UsageSummary(
            window_seconds=window,
            calls=n,
            local_calls=n_local,
            cloud_calls=n - n_local,
            local_share=_share(n_local, n),
            prompt_tokens=prompt,
            completion_tokens=completion,
            local_tokens=local_tokens,
            cloud_tokens=all_tokens - local_tokens,
            cost=round(cost, MONEY_DECIMALS),
            would_have_cost=round(would, MONEY_DECIMALS),
            saved=round(max(0.0, would - cost), MONEY_DECIMALS),
            errors=errors,
            error_rate=_share(errors, n),
            routed=routed,
            fallbacks=fallbacks,
            fallback_rate=_share(fallbacks, routed),
            spills=spills,
            embedding_calls=n_embed,
            embedding_tokens=embed_tokens,
            embedding_would_have_cost=round(would_embed, MONEY_DECIMALS),
        )

    def timeseries(self, window: float, buckets: int) -> UsageTimeseries:
        now = self.clock()
        size = window / buckets
        start = now - window
        index = cast((T.c.time - start) / size, Integer).label("bucket")
        local = T.c.provider == "local"
        tokens = T.c.prompt_tokens + T.c.completion_tokens
        is_call = T.c.kind == "call"
        fell_back = (T.c.kind == "route") & T.c.fallback_from.is_not(None)
        query = (
            select(
                index,
                func.sum(case((is_call, 1), else_=0)),
                func.sum(case((is_call & local, tokens), else_=0)),
                func.sum(case((is_call & ~local, tokens), else_=0)),
                func.sum(case((is_call, T.c.cost), else_=0.0)),
                func.sum(case((is_call & (T.c.status == "error"), 1), else_=0)),
                func.sum(case((fell_back, 1), else_=0)),
            )
            .where(T.c.time >= start)
            .group_by(index)
        )
        found: dict[int, list[float]] = {}
        with self.engine.connect() as conn:
            for bucket, *sums in conn.execute(query):
                # a record of this very instant ends the last bucket, not a new one
                totals = found.setdefault(min(bucket, buckets - 1), [0] * 6)
                totals[:] = [a + b for a, b in zip(totals, sums, strict=True)]
        series = []
        for n in range(buckets):
            calls, local_tokens, cloud_tokens, cost, errors, fallbacks = found.get(n, [0] * 6)
            series.append(
                UsageBucket(
                    start=datetime.fromtimestamp(start + n * size, UTC),
                    calls=calls,
                    local_tokens=local_tokens,
                    cloud_tokens=cloud_tokens,
                    cost=round(cost, MONEY_DECIMALS),
                    errors=errors,
                    fallbacks=fallbacks,
                )
            )
        return UsageTimeseries(window_seconds=window, bucket_seconds=size, buckets=series)

    def by_agent(self, window: float) -> UsageByAgent:
        since = self.clock() - window
        who = func.coalesce(T.c.agent_id, T.c.provider)
        totals = (
            select(
                who,
                T.c.provider,
                func.count(),
                func.sum(T.c.prompt_tokens),
                func.sum(T.c.completion_tokens),
                func.sum(case((EMBEDDING, 0.0), else_=T.c.latency_ms)),
                func.sum(case((T.c.status == "error", 1), else_=0)),
                func.sum(case((EMBEDDING, 1), else_=0)),
                func.sum(case((EMBEDDING, T.c.prompt_tokens), else_=0)),
            )
            .where(T.c.kind == "call", T.c.time >= since)
            .group_by(who, T.c.provider)
        )
        latencies = (
            select(who, T.c.latency_ms)
            .where(T.c.kind == "call", T.c.time >= since, T.c.status == "ok")
            .order_by(T.c.time.desc())
            .limit(MAX_LATENCIES)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(totals).all()
            measured: dict[str, list[float]] = {}
            for agent, latency in conn.execute(latencies):
                measured.setdefault(agent, []).append(latency)
        agents = []
        for agent, provider, calls, prompt, completion, latency_sum, errors, n_embed, embed in rows:
            ms = sorted(measured.get(agent, []))
            agents.append(
                AgentUsage(
                    agent_id=agent,
                    provider=provider,
                    calls=calls,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    tokens_per_second=(
                        round(completion / (latency_sum / 1000), 2) if latency_sum else None
                    ),
                    latency_p50_ms=_percentile(ms, 0.50),
                    latency_p95_ms=_percentile(ms, 0.95),
                    latency_p99_ms=_percentile(ms, 0.99),
                    latency_histogram=_histogram(ms),
                    errors=errors,
                    embedding_calls=n_embed,
                    embedding_tokens=embed,
                )
            )
        agents.sort(key=lambda usage: -usage.calls)
        return UsageByAgent(window_seconds=window, agents=agents)


class UsageLog:
    """The router's own records, written in batches off the request path: every
    ``interval`` seconds, and at shutdown. Records older than ``retention`` seconds are
    deleted once every ``PRUNE_EVERY_SECONDS``."""

    def __init__(
        self,
        store: UsageStore,
        run,
        *,
        retention: float,
        interval: float = FLUSH_SECONDS,
        limit: int = 100_000,
    ) -> None:
        self.store = store
        self.run = run  # how the blocking store is called (services.common.database)
        self.retention = retention
        self.interval = interval
        # While the database is gone, the newest records stay, up to ``limit``.
        self.pending = Pending(limit)
        self.pruned_at: float | None = None

    def add(self, record: UsageRecord) -> None:
        self.pending.add(record)

    async def flush(self) -> None:
        try:
            await self.pending.deliver(self._write, WRITE_BATCH)
        except Exception:
            log.exception("usage records not stored; keeping them for the next flush")
            return
        now = self.store.clock()
        if self.pruned_at is None or now - self.pruned_at >= PRUNE_EVERY_SECONDS:
            self.pruned_at = now
            await self.run(self.store.prune, self.retention)

    async def _write(self, records: list[UsageRecord]) -> None:
        await self.run(self.store.add, records)
        await asyncio.sleep(0)  # the calls waiting meanwhile go first

    async def run_forever(self, sleep=asyncio.sleep) -> None:
        while True:
            await sleep(self.interval)
            await self.flush()


def add_missing_columns(conn: Connection, table: Table) -> list[str]:
    """Add the nullable columns ``table`` has and the database's table lacks (made by an
    older router): ``create_all`` makes missing tables only, and a ledger is never
    dropped to be made again. ``ALTER TABLE ... ADD COLUMN``, as SQLite and PostgreSQL
    both have it. Returns the names added."""
    present = {column["name"] for column in inspect(conn).get_columns(table.name)}
    missing = [column for column in table.columns if column.name not in present]
    quote = conn.dialect.identifier_preparer.quote
    for column in missing:
        if not column.nullable:  # a row already stored would have no value for it
            raise RuntimeError(f"the {table.name} table lacks the column {column.name}")
        kind = column.type.compile(dialect=conn.dialect)
        conn.execute(
            text(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} {kind}")
        )
        log.info("the %s table had no column %s: added", table.name, column.name)
    return [column.name for column in missing]


def _insert_or_ignore(dialect: str):
    """``INSERT ... ON CONFLICT (record_id) DO NOTHING`` where the database has it. The
    dialect is imported for the database in use only: PostgreSQL's costs a router on
    SQLite 2 MB of its memory budget."""
    if dialect not in ("sqlite", "postgresql"):
        return None
    insert = importlib.import_module(f"sqlalchemy.dialects.{dialect}").insert
    statement = insert(T).on_conflict_do_nothing(index_elements=["record_id"])
    if dialect == "sqlite":
        # No RETURNING: then every batch runs one prepared statement, and sqlite3 counts
        # the rows added. With RETURNING, SQLAlchemy writes the rows into the SQL, a new
        # statement for each batch size, and sqlite3 keeps 128 of them prepared: the
        # router grew by 27 MB under load (scripts/bench/bench_router.py, memray).
        return statement
    return statement.returning(T.c.record_id)


def _row(record: UsageRecord) -> dict:
    row = record.model_dump()
    row["time"] = record.time.timestamp()
    return row


def _record(row) -> UsageRecord:
    data = {key: value for key, value in row.items() if key != "id"}
    data["time"] = datetime.fromtimestamp(row["time"], UTC)
    data["endpoint"] = row["endpoint"] or "chat"
    return UsageRecord.model_validate(data)


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _histogram(ordered: list[float]) -> list[int]:
    """Counts per bucket of ``LATENCY_BUCKETS_MS`` (a value on a bound is in that bucket),
    then the count above the last bound."""
    at_most = [bisect.bisect_right(ordered, bound) for bound in LATENCY_BUCKETS_MS]
    at_most.append(len(ordered))
    return [n - below for below, n in itertools.pairwise([0, *at_most])]


def _percentile(ordered: list[float], fraction: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(fraction * len(ordered)) - 1)], 3)
