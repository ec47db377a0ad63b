"""Records kept until something acknowledges them (stored, or received by the router)."""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable

from schemas.usage import UsageRecord

log = logging.getLogger(__name__)


class Pending:
    """A bounded queue of usage records: when full, the oldest go first (and are counted);
    a batch leaves only once acknowledged, by id, so records dropped or added while the
    batch was on its way are accounted right."""

    def __init__(self, limit: int) -> None:
        self.records: deque[UsageRecord] = deque(maxlen=limit)
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.records)

    def add(self, record: UsageRecord) -> None:
        if len(self.records) == self.records.maxlen:
            self.dropped += 1
            if self.dropped in (1, 100) or self.dropped % 10_000 == 0:
                log.warning("usage buffer full: %d oldest records dropped", self.dropped)
        self.records.append(record)

    def batch(self, size: int) -> list[UsageRecord]:
        return list(itertools.islice(self.records, size))

    async def deliver(
        self, send: Callable[[list[UsageRecord]], Awaitable[object]], size: int
    ) -> None:
        """Hand what is pending to ``send``, ``size`` records at a time, each batch
        acknowledged once ``send`` returns. What ``send`` raises ends the round, and the
        rest waits for the next. Records added meanwhile wait too: a busy source cannot
        keep one round going forever."""
        for _ in range(math.ceil(len(self.records) / size)):
            batch = self.batch(size)
            await send(batch)
            self.done(batch)

    def done(self, batch: list[UsageRecord]) -> None:
        acknowledged = {record.record_id for record in batch}
        while self.records and self.records[0].record_id in acknowledged:
            self.records.popleft()
