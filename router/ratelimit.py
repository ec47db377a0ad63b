"""Per-client rate limiting of the router's model calls: a token bucket per API key (or
client address when the call carries none), answered as OpenAI does: 429 with
``Retry-After`` and ``X-RateLimit-Limit/Remaining/Reset`` on every answer.

A call is charged when it starts to be served: once its body has arrived whole. A
request that never finishes its body (a stalled or abandoned upload) costs nothing, so
half-sent requests cannot spend a client's burst, nor another's sharing its address."""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import RateLimited, error_response
from services.common.middleware import AnsweredEarly, EarlyAnswer

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
        """Charge ``client`` one call, if its bucket holds one."""
        return self._decide(client, charge=True)

    def peek(self, client: str) -> Decision:
        """Where ``client`` stands, charging nothing (for an answer to an uncharged call)."""
        return self._decide(client, charge=False)

    def _decide(self, client: str, *, charge: bool) -> Decision:
        now = self.clock()
        tokens, at = self.buckets.pop(client, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1
        if allowed and charge:
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
    """Charge a call when the last part of its body is read; over the limit, answer 429
    in place of the app (whose body read then stops)."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter, paths: Collection[str]) -> None:
        self.app = app
        self.limiter = limiter
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        client = client_key(scope)
        decision: Decision | None = None  # until the call is charged
        answer = EarlyAnswer(scope, receive, send)

        async def receive_then_charge() -> Message:
            nonlocal decision
            message = await receive()
            body_done = message["type"] == "http.request" and not message.get("more_body")
            if body_done and decision is None:
                decision = self.limiter.take(client)
                if not decision.allowed:
                    await answer.give(self._refusal(scope["path"], decision))
            return message

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                given = decision or self.limiter.peek(client)
                message.setdefault("headers", []).extend(_limit_headers(given))
            await answer.app_send(message)

        with contextlib.suppress(AnsweredEarly):
            await self.app(scope, receive_then_charge, send_with_limits)

    def _refusal(self, path: str, decision: Decision) -> Response:
        wait = max(1, math.ceil(decision.retry_after))
        error = RateLimited(
            f"rate limit of {self.limiter.rate:g} calls/s (bursts of {decision.limit}) "
            f"reached; retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )
        response = error_response(path, error)
        response.raw_headers.extend(_limit_headers(decision))
        return response


def _limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-ratelimit-limit", str(decision.limit).encode()),
        (b"x-ratelimit-remaining", str(decision.remaining).encode()),
        (b"x-ratelimit-reset", str(math.ceil(decision.reset_seconds)).encode()),
    ]
