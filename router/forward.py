"""Forward one model call (chat, or embeddings): walk its candidates best first, fall back
on failure, retry the walk after a backoff; relay a stream. An embeddings call goes to
registry agents only: the router's cloud client speaks chat.

A candidate fails when it cannot be reached, times out, or answers 5xx or 429
(``router.upstream``); the call then goes to the next candidate, up to ``max_attempts``.
Other 4xx answers are the caller's request at fault and pass through as they are. Which
failures count toward an endpoint's circuit: ``router.errors``. A stream falls back only
before its first byte; after it, an upstream that fails or stalls ends the stream with an
error event.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random as random_module
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from starlette.responses import Response

from router.accounting import Accounting, Outcome
from router.breaker import Breaker, Breakers
from router.candidates import Candidate, Waiting, within_budget
from router.errors import UpstreamFailed
from router.load import Load, Loads
from router.upstream import CHAT_PATH, EMBEDDINGS_PATH, Answer, Upstream
from schemas.usage import Endpoint, Status
from services.common.backoff import backoff_delay
from services.common.errors import ServiceUnavailable, SwarmError
from services.common.streaming import SSE_DONE, EventStream, sse_error

log = logging.getLogger(__name__)

ROUTED_TO_HEADER = "X-Routed-To"
Tried = list[tuple[Candidate, UpstreamFailed]]


@dataclass
class Walk:
    """One call's way through its candidates."""

    capability: str
    stream: bool
    began: float
    endpoint: Endpoint = "chat"
    model: str | None = None  # only candidates serving this model (None: any)
    tried: Tried = field(default_factory=list)  # the failed attempts, in order
    counted: set[str] = field(default_factory=set)  # endpoints whose circuit it charged
    spent: set[str] = field(default_factory=set)  # endpoints that failed it itself (500)
    # The first-ranked candidate and its expected wait (None: unknown), when that is not
    # within the call's wait budget (of the latest round over the candidates): another
    # candidate serving spilled.
    over_budget: tuple[Candidate, float | None] | None = None

    def outcome(self, candidate: Candidate | None) -> Outcome:
        spill = self.over_budget
        if candidate is None or spill is None or spill[0] == candidate:
            spill = None
        return Outcome(
            self.capability, candidate, self.tried, self.stream, self.began, spill, self.endpoint
        )

    @property
    def path(self) -> str:
        return EMBEDDINGS_PATH if self.endpoint == "embeddings" else CHAT_PATH


@dataclass
class Forwarder:
    """Forwards model calls; one :class:`Walk` each."""

    candidates: Callable[..., list[Candidate]]  # Router.candidates: who may serve, best first
    waiting: Waiting  # Router.waiting: a candidate's expected wait and calls open
    breakers: Breakers
    loads: Loads
    upstream: Upstream
    accounting: Accounting
    clock: Callable[[], float]
    max_attempts: int
    retry_wait_max_seconds: float
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    random: Callable[[], float] = random_module.random

    async def forward(
        self,
        body: bytes,
        capability: str,
        stream: bool,
        budget_ms: float | None = None,
        endpoint: Endpoint = "chat",
        model: str | None = None,
    ) -> Response:
        """Forward an OpenAI call (``endpoint``: chat, or embeddings) to the first candidate
        that serves it (``model``: only those serving that model); with a wait budget, to
        those expected to wait within it first (router.candidates.within_budget)."""
        walk = Walk(capability, stream, self.clock(), endpoint, model)
        for retry in itertools.count():
            failures_before = len(walk.tried)
            ranked = self.candidates(capability)
            order, walk.over_budget = within_budget(ranked, self.waiting, budget_ms)
            for candidate in order:
                if len(walk.tried) >= self.max_attempts:
                    break
                if candidate.endpoint in walk.spent:
                    continue
                if endpoint != "chat" and not candidate.is_agent:
                    continue  # a cloud provider: chat only
                if model is not None and candidate.model != model:
                    continue
                breaker = self.breakers[candidate.endpoint]
                if not breaker.begin():
                    continue
                response = await self._attempt(walk, candidate, breaker, body)
                if response is not None:
                    return response
            wait = self._retry_wait(walk.tried[failures_before:], len(walk.tried), retry)
            if wait is None:
                break
            await self.sleep(wait)
        self.accounting.unserved(walk.outcome(None))
        raise no_candidate(capability, walk.tried, self.breakers, self.candidates)

    async def _attempt(
        self, walk: Walk, candidate: Candidate, breaker: Breaker, body: bytes
    ) -> Response | None:
        """One call to a candidate whose circuit let it through: the caller's answer, or
        None when the candidate failed (its circuit charged, the failure noted in ``walk``)."""
        load = self.loads[candidate.endpoint]
        load.in_flight += 1
        started = self.clock()
        try:
            answer = await self.upstream.send(candidate, body, walk.stream, walk.path)
        except UpstreamFailed as failure:
            load.in_flight -= 1
            self._charge(walk, candidate.endpoint, breaker, failure)
            self.accounting.attempt_failed(candidate, failure)
            walk.tried.append((candidate, failure))
            return None
        except BaseException:  # the caller left: nothing was learned of the upstream
            load.in_flight -= 1
            breaker.released()
            raise
        breaker.succeeded()
        outcome = walk.outcome(candidate)
        self.accounting.served(outcome)
        headers = {ROUTED_TO_HEADER: candidate.name}
        if answer.rest is None:
            load.in_flight -= 1
            load.observe((self.clock() - started) * 1000)
            status = "ok" if answer.status < 400 else "error"
            self.accounting.record(outcome, status=status, first_at=None, usage=answer.usage)
            return Response(
                answer.first,
                status_code=answer.status,
                media_type=answer.media_type,
                headers=headers,
            )
        response = EventStream(self._relay(answer, outcome, load, started), "text/event-stream")
        response.headers.update(headers)
        return response

    async def _relay(
        self, answer: Answer, outcome: Outcome, load: Load, started: float
    ) -> AsyncIterator[bytes]:
        """The upstream's chunks as they come; a failure or stall ends with an error event.
        The call is open (``load``) and unrecorded until the stream ends."""
        candidate = outcome.candidate
        assert candidate is not None
        assert answer.rest is not None
        first_at = self.clock()
        status: Status = "error"
        try:
            yield answer.first
            async for chunk in answer.rest:
                yield chunk
            load.observe((self.clock() - started) * 1000)
            status = "ok"
        except (GeneratorExit, asyncio.CancelledError):  # the caller left
            status = "cancelled"
            raise
        except UpstreamFailed as failure:
            self.breakers[candidate.endpoint].failed()
            message = f"{candidate.name} failed mid-stream: {failure.reason}"
            log.warning("%s", message)
            yield sse_error(ServiceUnavailable(message, code="upstream_failed")) + SSE_DONE
        finally:
            load.in_flight -= 1
            if answer.release is not None:
                await answer.release()
            self.accounting.record(outcome, status=status, first_at=first_at, usage=answer.usage)

    def _charge(self, walk: Walk, endpoint: str, breaker: Breaker, failure: UpstreamFailed) -> None:
        """Tell the endpoint's circuit what a failed attempt says about it (router.errors)."""
        if failure.blame == "upstream" and endpoint not in walk.counted:
            walk.counted.add(endpoint)
            breaker.failed(refused=failure.kind == "connect")
        else:
            breaker.released()
        if failure.blame == "request":
            walk.spent.add(endpoint)

    def _retry_wait(self, failed_now: Tried, attempts: int, retry: int) -> float | None:
        """How long to wait before walking the candidates again, or None to give up: when
        the attempts are spent, when nothing could be tried (every circuit open), or when
        the wait (backoff with full jitter, at least what a 429 asked) is too long."""
        # A round whose every failure was the request's own (500s) has nothing to retry.
        retryable = [f for _, f in failed_now if f.blame != "request"]
        if not retryable or attempts >= self.max_attempts:
            return None
        asked = [f.retry_after for f in retryable if f.retry_after is not None]
        wait = max([backoff_delay(retry, self.random), *asked])
        return wait if wait <= self.retry_wait_max_seconds else None


def no_candidate(
    capability: str, tried: Tried, breakers: Breakers, candidates: Callable[..., list[Candidate]]
) -> SwarmError:
    """The 503 when no candidate could serve ``capability``: what was tried, and when the
    first candidate may be tried again (``candidates``: ``Router.candidates``)."""
    attempts = "; ".join(f"{c.name} ({c.endpoint}): {failure.reason}" for c, failure in tried)
    # What its 429 asked, or its circuit (with nothing tried, every circuit was open: the
    # first to close).
    waits = [max(f.retry_after or 0.0, breakers[c.endpoint].retry_after()) for c, f in tried] or [
        breakers[c.endpoint].retry_after() for c in candidates(capability, open_circuits=True)
    ]
    retry_after = max(1, math.ceil(min(waits))) if waits else 1
    message = f"no candidate could serve {capability!r}"
    message += f"; tried {attempts}" if attempts else "; every candidate's circuit is open"
    return ServiceUnavailable(
        message, code="no_candidate", headers={"Retry-After": str(retry_after)}
    )
