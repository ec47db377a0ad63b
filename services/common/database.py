"""Engines for the daemons' stores: SQLite (WAL) on one machine, any SQLAlchemy URL beyond."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pydantic_core
from sqlalchemy import Connection, Engine, create_engine, event, func, select
from sqlalchemy.engine import make_url

Runner = Callable[..., Awaitable[Any]]

# asyncio.to_thread's executor (ThreadPoolExecutor's default size), where db_runner sends a
# network database's calls: as many can hold a connection at once.
WORKER_THREADS = min(32, (os.cpu_count() or 1) + 4)


def create_db_engine(url: str) -> Engine:
    parsed = make_url(url)
    # pydantic-core parses the JSON columns several times faster than the json module.
    options: dict[str, Any] = {"json_deserializer": pydantic_core.from_json}
    if parsed.get_backend_name() != "sqlite":
        # A pool smaller than the worker threads opens an overflow connection, and closes it
        # on return, whenever they are all busy: a new server process per burst.
        return create_engine(url, pool_pre_ping=True, pool_size=WORKER_THREADS, **options)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 5}, **options)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        # WAL: readers never block the writer. synchronous=NORMAL in WAL keeps every
        # committed transaction across a process crash (kill -9); only an OS crash or
        # power loss can drop the last commits, which then re-register on heartbeat 404.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def db_runner(engine: Engine) -> Runner:
    """How async endpoints call the blocking store.

    SQLite answers in microseconds while holding the GIL, so a hop to a worker thread costs
    more than the query; run on the event loop, writes also never wait on each other's
    locks. A network database waits on I/O, so its calls go to worker threads.
    """
    if engine.dialect.name == "sqlite":

        async def run_inline(function: Callable[..., Any], *args: Any) -> Any:
            return function(*args)

        return run_inline
    return asyncio.to_thread


@contextlib.contextmanager
def schema_turn(engine: Engine, key: int) -> Iterator[Connection]:
    """A transaction in which this process alone creates or changes the tables ``key``
    names: replicas starting at once on one PostgreSQL take turns (an advisory lock held to
    the commit; PostgreSQL's DDL is transactional), so one creates and the others find the
    tables, where two would both create them and one fail on a duplicate key."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(key)))
        yield conn
