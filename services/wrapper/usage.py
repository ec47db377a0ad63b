"""The wrapper's model calls, reported to the router's ``POST /usage`` in batches.

Records wait in a bounded buffer until a router acknowledges them: a router that is
down or restarting loses nothing of what the wrapper saw, within the bound (beyond it the
oldest go first, counted in the log). With router replicas on one usage store, a batch
goes to whichever answers (a ``Failover`` over them). A resent batch is harmless: every
record has its own id, and the usage store keeps each once.
"""

from __future__ import annotations

import asyncio
import logging
import random as random_module
from collections.abc import Awaitable, Callable

import httpx
from pydantic import SecretStr

from schemas.usage import MAX_BATCH, REFUSALS_LOGGED, UsageBatch, UsageRecord
from services.common.backoff import backoff_delay
from services.common.http import Failover
from services.common.pending import Pending

log = logging.getLogger(__name__)

BUFFER_LIMIT = 10_000
FLUSH_INTERVAL_SECONDS = 2.0


class UsageReporter:
    def __init__(
        self,
        http: httpx.AsyncClient | Failover,
        *,
        token: SecretStr | None = None,
        interval: float = FLUSH_INTERVAL_SECONDS,
        limit: int = BUFFER_LIMIT,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        random: Callable[[], float] = random_module.random,
    ) -> None:
        self.http = http
        self.headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        self.interval = interval
        self.pending = Pending(limit)
        self.sleep = sleep
        self.random = random
        self.failures = 0

    def add(self, record: UsageRecord) -> None:
        self.pending.add(record)

    async def flush(self) -> bool:
        """Send what is pending, a batch at a time; False when no router took it."""
        try:
            await self.pending.deliver(self._send, MAX_BATCH)
        except httpx.HTTPError as exc:
            self.failures += 1
            log.warning("usage report failed (%s); %d records kept", exc, len(self.pending))
            return False
        self.failures = 0
        return True

    async def _send(self, batch: list[UsageRecord]) -> None:
        body = UsageBatch(records=batch).model_dump(mode="json")
        response = await self.http.post("/usage", json=body, headers=self.headers)
        # Kept for the next round: the router is away (5xx), or the token is wrong (401,
        # fixed by a restart with the right one). Any other refusal would be the same
        # next time: resending it forever would hold back every record behind it.
        if response.status_code == 401 or response.status_code >= 500:
            response.raise_for_status()
        if response.status_code >= 400:
            log.error(
                "usage batch of %d records refused, dropped: %s %s",
                len(batch),
                response.status_code,
                response.text[:200],
            )
            return
        for refusal in response.json().get("refused", [])[:REFUSALS_LOGGED]:
            log.error(
                "usage record %s refused, dropped: %s", refusal["record_id"], refusal["reason"]
            )

    async def run(self) -> None:
        """Flush every interval; after failures, back off (full jitter) up to 30 s."""
        while True:
            delay = self.interval
            if self.failures:
                delay = max(delay, backoff_delay(self.failures, self.random))
            await self.sleep(delay)
            await self.flush()
