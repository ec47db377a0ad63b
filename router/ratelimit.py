"""Per-client rate limiting of the router's model calls: a token bucket per API key (or
client address when the call carries none), answered as OpenAI does: 429 with
``Retry-After`` and ``X-RateLimit-Limit/Remaining/Reset`` on every answer."""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import RateLimited, error_response

MAX_CLIENTS = 100_000  # buckets kept; the least recently seen go first


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: float  # until the bucket is full again
    retry_after: float  # until one more call is allowed (0 when allowed)


class RateLimiter:
    """Token buckets: ``rate`` calls a second on average, bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def take(self, client: str) -> Decision:
        now = self.clock()
        tokens, at = self.buckets.pop(client, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self.buckets[client] = (tokens, now)
        if len(self.buckets) > MAX_CLIENTS:
            self.buckets.popitem(last=False)
        return Decision(
            allowed=allowed,
            limit=self.burst,
            remaining=math.floor(tokens),
            reset_seconds=(self.burst - tokens) / self.rate,
            retry_after=0.0 if allowed else (1 - tokens) / self.rate,
        )


def client_key(scope: Scope) -> str:
    """The caller: its API key (hashed, never kept as given), else its address."""
    for name, value in scope["headers"]:
        if name == b"authorization" and value:
            return "key:" + hashlib.sha256(value).hexdigest()[:32]
    client = scope.get("client")
    return f"addr:{client[0]}" if client else "addr:unknown"


class RateLimitMiddleware:
    def __init__(self, app: ASGIApp, limiter: RateLimiter, paths: Collection[str]) -> None:
        self.app = app
        self.limiter = limiter
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        decision = self.limiter.take(client_key(scope))
        headers = [
            (b"x-ratelimit-limit", str(decision.limit).encode()),
            (b"x-ratelimit-remaining", str(decision.remaining).encode()),
            (b"x-ratelimit-reset", str(math.ceil(decision.reset_seconds)).encode()),
        ]
        if not decision.allowed:
            wait = max(1, math.ceil(decision.retry_after))
            error = RateLimited(
                f"rate limit of {self.limiter.rate:g} calls/s (bursts of {decision.limit}) "
                f"reached; retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
            response = error_response(scope["path"], error)
            response.raw_headers.extend(headers)
            await response(scope, receive, send)
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).extend(headers)
            await send(message)

        await self.app(scope, receive, send_with_limits)
