"""The router's core: pick candidates for a call and forward it, falling back on failure.

Upstream calls go through one aiohttp session (DESIGN 7: httpx's async client is slow
under concurrency). A candidate fails when it cannot be reached, times out, or answers
5xx or 429; the call then goes to the next candidate, up to ``max_attempts``. Other 4xx
answers are the caller's request at fault and pass through as they are. Which failures
count toward an endpoint's circuit: ``router.errors``. A stream falls
back only before its first byte; after it, an upstream that fails or stalls ends the
stream with an error event.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import random as random_module
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
import httpx
from starlette.responses import Response

from router.breaker import Breakers
from router.candidates import Candidate, rank
from router.cloud import CloudClient
from router.directory import Directory
from router.errors import UpstreamFailed, failed_answer
from router.metrics import RouterMetrics
from router.settings import RouterSettings
from router.usage import UsageLog
from schemas.routing import RouteDecision
from schemas.usage import Status, UsageRecord
from services.common.backoff import backoff_delay
from services.common.context import REQUEST_ID_HEADER, current_request_id
from services.common.errors import NotFound, ServiceUnavailable, SwarmError
from services.common.streaming import SSE_DONE, EventStream, sse_error

log = logging.getLogger(__name__)

CAPABILITY_PREFIX = "capability:"
CHAT_PATH = "/v1/chat/completions"
ROUTED_TO_HEADER = "X-Routed-To"
LATENCY_WEIGHT = 0.2  # of the newest call in an endpoint's moving latency average


@dataclass
class Answer:
    """An upstream's answer: whole (``rest`` None), or a stream's first chunk and the rest."""

    status: int
    media_type: str
    first: bytes
    rest: AsyncIterator[bytes] | None = None
    release: Callable[[], Awaitable[None]] | None = None  # the connection, once streamed
    usage: list[int] | None = None  # a cloud call's [prompt, completion] tokens


@dataclass(frozen=True)
class Outcome:
    """How one request was routed: what served it (None: nothing could) after what."""

    capability: str
    candidate: Candidate | None
    tried: list[tuple[Candidate, UpstreamFailed]]
    stream: bool
    began: float


@dataclass
class Load:
    """What the router measured of one endpoint: latency (moving average), calls open."""

    latency_ms: float | None = None
    in_flight: int = 0

    def observe(self, milliseconds: float) -> None:
        if self.latency_ms is None:
            self.latency_ms = milliseconds
        else:
            self.latency_ms += LATENCY_WEIGHT * (milliseconds - self.latency_ms)


@dataclass
class Router:
    settings: RouterSettings
    directory: Directory
    breakers: Breakers
    session: aiohttp.ClientSession
    clock: Callable[[], float]
    metrics: RouterMetrics
    usage: UsageLog
    wall_clock: Callable[[], float]
    cloud: CloudClient | None  # None when no provider is keyed
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    random: Callable[[], float] = random_module.random
    loads: dict[str, Load] = field(default_factory=dict)

    # --- decisions -----------------------------------------------------------------------

    def capabilities(self) -> set[str]:
        """Every capability some agent or keyed provider serves, itself or through one of
        the profile's capability fallbacks."""
        served = set(self.directory.by_capability)
        for provider in self.settings.keyed_providers.values():
            served |= set(provider.models)
        fallbacks = self.settings.capability_fallbacks
        return served | {c for c, others in fallbacks.items() if served.intersection(others)}

    def candidates(
        self, capability: str, prefer_local: bool = True, *, open_circuits: bool = False
    ) -> list[Candidate]:
        """Who may serve ``capability`` now, best first (``open_circuits``: also those
        whose circuit is open). None at all: a 404 when nothing serves the capability (the
        caller asked for the wrong thing), else an empty list (every circuit is open)."""
        ranked = rank(
            capability,
            self.directory.by_capability,
            fallbacks=self.settings.capability_fallbacks,
            providers=self.settings.keyed_providers,
            prefer_local=prefer_local,
            usable=lambda endpoint: open_circuits or self.breakers[endpoint].allows(),
            latency_ms=lambda c: self._load(c.endpoint).latency_ms,
            in_flight=lambda c: self._load(c.endpoint).in_flight,
        )
        if not ranked and capability not in (served := self.capabilities()):
            raise NotFound(
                f"no agent or provider serves the capability {capability!r}; "
                f"capabilities served now: {', '.join(sorted(served)) or 'none yet'}",
                code="unknown_capability",
                param="capability",
            )
        return ranked

    def decide(self, capability: str, prefer_local: bool = True) -> RouteDecision:
        ranked = self.candidates(capability, prefer_local)
        if not ranked:
            raise self._exhausted(capability, [])
        best, rest = ranked[0], ranked[1:]
        where = "local agent" if best.local else "cloud provider"
        reason = (
            f"{where} {best.agent_id or best.provider} serves {best.capability}"
            f"{' (a fallback capability)' if best.fallback else ''} at "
            f"{best.cost_per_1k_tokens:g}/1k tokens; best of {len(ranked)} candidates"
            f"{' with local first' if prefer_local else ''}"
        )
        fallbacks = [candidate.public() for candidate in rest]
        return RouteDecision(**best.public().model_dump(), fallbacks=fallbacks, reason=reason)

    def capability_of(self, model: str, header: str | None) -> str:
        """The capability a chat call asks for: ``capability:<name>``, ``X-Capability``, or
        the capability of the agent serving a concrete model."""
        if model.startswith(CAPABILITY_PREFIX):
            return model.removeprefix(CAPABILITY_PREFIX).strip().lower()
        if header:
            return header.strip().lower()
        agent = self.directory.by_model.get(model)
        if agent is not None and agent.capabilities:
            return agent.capabilities[0]
        raise NotFound(
            f"no agent serves the model {model!r}; ask for a capability with "
            f'"model": "capability:<name>" or the X-Capability header',
            code="model_not_found",
            param="model",
        )

    # --- forwarding ----------------------------------------------------------------------

    async def chat(self, body: bytes, capability: str, stream: bool) -> Response:
        """Forward an OpenAI chat call to the first candidate that serves it."""
        tried: list[tuple[Candidate, UpstreamFailed]] = []
        counted: set[str] = set()  # endpoints whose circuit this request has charged
        spent: set[str] = set()  # endpoints that failed this request itself (a 500)
        began = self.clock()
        for retry in itertools.count():
            failures_before = len(tried)
            for candidate in self.candidates(capability):
                if len(tried) >= self.settings.max_attempts:
                    break
                breaker = self.breakers[candidate.endpoint]
                if candidate.endpoint in spent or not breaker.begin():
                    continue
                load = self._load(candidate.endpoint)
                load.in_flight += 1
                started = self.clock()
                try:
                    answer = await self._attempt(candidate, body, stream)
                except BaseException:  # the caller left: nothing was learned of the upstream
                    load.in_flight -= 1
                    breaker.released()
                    raise
                who = _name(candidate)
                if isinstance(answer, UpstreamFailed):
                    load.in_flight -= 1
                    self._charge(candidate.endpoint, answer, counted, spent)
                    self.metrics.failed_attempts.labels(who, answer.kind).inc()
                    tried.append((candidate, answer))
                    continue
                breaker.succeeded()
                self.metrics.calls.labels(capability, who, "ok").inc()
                if tried:
                    self.metrics.fallbacks.labels(capability).inc()
                headers = {ROUTED_TO_HEADER: who}
                outcome = Outcome(capability, candidate, tried, stream, began)
                if answer.rest is None:
                    load.in_flight -= 1
                    load.observe((self.clock() - started) * 1000)
                    status = "ok" if answer.status < 400 else "error"
                    self._record(outcome, status=status, first_at=None, usage=answer.usage)
                    return Response(
                        answer.first,
                        status_code=answer.status,
                        media_type=answer.media_type,
                        headers=headers,
                    )
                chunks = self._relay(answer, outcome, load, started)
                response = EventStream(chunks, "text/event-stream")
                response.headers.update(headers)
                return response
            wait = self._retry_wait(tried[failures_before:], len(tried), retry)
            if wait is None:
                break
            await self.sleep(wait)
        self.metrics.calls.labels(capability, "", "error").inc()
        outcome = Outcome(capability, None, tried, stream, began)
        self._record(outcome, status="error", first_at=None)
        raise self._exhausted(capability, tried)

    async def _attempt(
        self, candidate: Candidate, body: bytes, stream: bool
    ) -> Answer | UpstreamFailed:
        try:
            if candidate.local:
                return await self._local(candidate, body, stream)
            return await self._cloud(candidate, body, stream)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return UpstreamFailed(_describe(exc), kind=_kind(exc))
        except UpstreamFailed as failed:
            return failed

    def _charge(
        self, endpoint: str, failure: UpstreamFailed, counted: set[str], spent: set[str]
    ) -> None:
        """Tell the endpoint's circuit what a failed attempt says about it (router.errors)."""
        breaker = self.breakers[endpoint]
        if failure.blame == "upstream" and endpoint not in counted:
            counted.add(endpoint)
            breaker.failed(refused=failure.kind == "connect")
        else:
            breaker.released()
        if failure.blame == "request":
            spent.add(endpoint)

    async def _local(self, candidate: Candidate, body: bytes, stream: bool) -> Answer:
        """A registry agent, through the aiohttp pool: the body goes as it came."""
        headers = {"Content-Type": "application/json"}
        if request_id := current_request_id():
            headers[REQUEST_ID_HEADER] = request_id
        answer = await self.session.post(candidate.endpoint + CHAT_PATH, data=body, headers=headers)
        failure = failed_answer(answer.status, answer.headers.get("Retry-After"))
        if failure is not None:
            answer.release()
            raise failure
        media = answer.headers.get("Content-Type", "application/json")
        if not stream or answer.status != 200:  # a refusal is the caller's to read, whole
            return Answer(answer.status, media, await answer.read())

        async def rest() -> AsyncIterator[bytes]:
            while chunk := await answer.content.readany():
                yield chunk

        async def release() -> None:
            # Back to the pool once read to the end (aiohttp closes one left half-read):
            # closing every streamed connection cost a new connection per stream.
            answer.release()

        first = await answer.content.readany()
        return Answer(answer.status, media, first, rest(), release=release)

    async def _cloud(self, candidate: Candidate, body: bytes, stream: bool) -> Answer:
        """A keyed cloud provider (its call record is made with the route's)."""
        assert self.cloud is not None  # cloud candidates exist only for keyed providers
        try:
            cloud = await self.cloud.chat(candidate, json.loads(body), stream)
            if cloud.chunks is None:
                return Answer(cloud.status, "application/json", cloud.body, usage=cloud.usage)
            first = await anext(cloud.chunks, b"")
        except httpx.HTTPError as exc:
            raise UpstreamFailed(_describe(exc), kind="broken") from None
        response = cloud.response
        assert response is not None
        return Answer(
            cloud.status,
            "text/event-stream",
            first,
            cloud.chunks,
            release=response.aclose,
            usage=cloud.usage,
        )

    async def _relay(
        self, answer: Answer, outcome: Outcome, load: Load, started: float
    ) -> AsyncIterator[bytes]:
        """The upstream's chunks as they come; a failure or stall ends with an error event."""
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
        except (aiohttp.ClientError, httpx.HTTPError, TimeoutError) as exc:
            self.breakers[candidate.endpoint].failed()
            message = f"{_name(candidate)} failed mid-stream: {_describe(exc)}"
            log.warning("%s", message)
            yield sse_error(ServiceUnavailable(message, code="upstream_failed")) + SSE_DONE
        finally:
            load.in_flight -= 1
            if answer.release is not None:
                await answer.release()
            self._record(outcome, status=status, first_at=first_at, usage=answer.usage)

    def _record(
        self,
        outcome: Outcome,
        *,
        status: Status,
        first_at: float | None,
        usage: list[int] | None = None,
    ) -> None:
        """The routing outcome, for the usage records. A local model call's own record
        (with its tokens) comes from the agent that served it; a cloud call's is made
        here, with the tokens the provider reported and the profile's prices."""
        now = self.clock()
        candidate = outcome.candidate
        latency_ms = (now - outcome.began) * 1000
        request_id = current_request_id() or uuid.uuid4().hex
        route = UsageRecord(
            record_id=uuid.uuid4().hex,
            kind="route",
            request_id=request_id,
            time=datetime.fromtimestamp(self.wall_clock(), UTC),
            agent_id=candidate.agent_id if candidate else None,
            provider=candidate.provider if candidate else "none",
            model=candidate.model if candidate else "",
            capability=outcome.capability,
            latency_ms=latency_ms,
            time_to_first_token_ms=(
                (first_at - outcome.began) * 1000 if first_at is not None else latency_ms
            ),
            stream=outcome.stream,
            status=status,
            fallback_from=_name(outcome.tried[0][0]) if outcome.tried else None,
        )
        self.usage.add(route)
        if candidate is not None:
            labels = (outcome.capability, _name(candidate))
            self.metrics.duration.labels(*labels).observe(latency_ms / 1000)
            if outcome.stream and first_at is not None:
                ttft = first_at - outcome.began
                self.metrics.time_to_first_token.labels(*labels).observe(ttft)
        if candidate is None or candidate.local or usage is None:
            return
        provider = self.settings.providers[candidate.provider]
        prompt, completion = usage
        cost = (
            prompt / 1000 * provider.price_per_1k_input
            + completion / 1000 * provider.price_per_1k_output
        )
        self.metrics.tokens.labels(candidate.provider, "input").inc(prompt)
        self.metrics.tokens.labels(candidate.provider, "output").inc(completion)
        self.metrics.cost.labels(candidate.provider).inc(cost)
        update = {"record_id": uuid.uuid4().hex, "kind": "call", "fallback_from": None}
        update |= {"prompt_tokens": prompt, "completion_tokens": completion, "cost": cost}
        self.usage.add(route.model_copy(update=update))

    def _retry_wait(
        self, failed_now: list[tuple[Candidate, UpstreamFailed]], attempts: int, retry: int
    ) -> float | None:
        """How long to wait before trying the candidates again, or None to give up: when
        the attempts are spent, when nothing could be tried (every circuit open), or when
        the wait (backoff with full jitter, at least what a 429 asked) is too long."""
        # A round whose every failure was the request's own (500s) has nothing to retry.
        retryable = [f for _, f in failed_now if f.blame != "request"]
        if not retryable or attempts >= self.settings.max_attempts:
            return None
        asked = [f.retry_after for f in retryable if f.retry_after is not None]
        wait = max([backoff_delay(retry, self.random), *asked])
        return wait if wait <= self.settings.retry_wait_max_seconds else None

    def _exhausted(
        self, capability: str, tried: list[tuple[Candidate, UpstreamFailed]]
    ) -> SwarmError:
        attempts = "; ".join(
            f"{c.agent_id or c.provider} ({c.endpoint}): {failure.reason}" for c, failure in tried
        )
        # When the first candidate may be tried again: what its 429 asked, or its circuit
        # (with nothing tried, every circuit was open: the first to close).
        waits = [
            max(f.retry_after or 0.0, self.breakers[c.endpoint].retry_after()) for c, f in tried
        ] or [
            self.breakers[c.endpoint].retry_after()
            for c in self.candidates(capability, open_circuits=True)
        ]
        retry_after = max(1, math.ceil(min(waits))) if waits else 1
        message = f"no candidate could serve {capability!r}"
        message += f"; tried {attempts}" if attempts else "; every candidate's circuit is open"
        return ServiceUnavailable(
            message, code="no_candidate", headers={"Retry-After": str(retry_after)}
        )

    def _load(self, endpoint: str) -> Load:
        load = self.loads.get(endpoint)
        if load is None:
            load = self.loads[endpoint] = Load()
        return load


def _name(candidate: Candidate) -> str:
    return candidate.agent_id or candidate.provider


def _kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    return "broken"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
