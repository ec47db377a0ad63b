"""The registry's clock: the database's, so that replicas on several hosts agree.

Expiry is ``expires_at < now``, where ``expires_at`` was written by whichever replica
took the last heartbeat and ``now`` is read by whichever replica answers: with each
host's own clock, a replica running ahead would see healthy agents expire. Every replica
reads the time of the one database instead. Asking it per statement would add a round
trip to each heartbeat (the hot path, a prepared statement on the driver's cursor), so
the replica measures its clock's offset from the database's and adds it, measuring again
every ``resync`` seconds. A wrapper's own time is never asked for.
SQLite lives on the registry's own host: its clock is the process's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine, func, select

log = logging.getLogger(__name__)

Clock = Callable[[], float]

RESYNC_SECONDS = 30.0
_DATABASE_NOW = select(func.extract("epoch", func.clock_timestamp()))


class DatabaseClock:
    """Epoch seconds by the database's clock: the local clock plus its measured offset.

    A failed measurement keeps the last offset (0 before the first) and is tried again at
    the next ``resync``: the registry keeps answering while the database is away.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        local: Clock = time.time,
        monotonic: Clock = time.monotonic,
        resync: float = RESYNC_SECONDS,
    ) -> None:
        self.engine = engine
        self.local = local
        self.monotonic = monotonic
        self.resync = resync
        self.offset = 0.0
        self._measured_at: float | None = None
        self._lock = threading.Lock()  # the store runs in worker threads

    def __call__(self) -> float:
        due = self._measured_at is None or self.monotonic() - self._measured_at >= self.resync
        if due and self._lock.acquire(blocking=False):
            try:
                self.measure()
            finally:
                self._lock.release()
        return self.local() + self.offset

    def measure(self) -> None:
        """Set the offset from one reading of the database's clock, taken as of the
        middle of the round trip."""
        self._measured_at = self.monotonic()
        try:
            before = self.local()
            with self.engine.connect() as conn:
                database_now = float(conn.execute(_DATABASE_NOW).scalar_one())
            after = self.local()
        except Exception as exc:
            log.warning("cannot read the database's clock, keeping the last offset: %s", exc)
            return
        self.offset = database_now - (before + after) / 2


def registry_clock(engine: Engine) -> Clock:
    """The clock TTLs are decided by: the database's on a network database (several
    replicas, several hosts), the process's on SQLite (one host)."""
    if engine.dialect.name == "postgresql":
        return DatabaseClock(engine)
    return time.time
