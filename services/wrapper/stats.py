"""Live figures of a wrapper: a window of recent calls for ``/info``, the load its heartbeats
report, and the LLM metrics for ``/metrics`` (on the app's own CollectorRegistry)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.agents import MAX_MILLISECONDS, AgentLoad, expected_wait_ms
from schemas.health import Performance, PromptCache
from schemas.ollama import ChatResponse, GenerateResponse
from schemas.usage import Endpoint, Status, UsageRecord
from services.common.context import current_request_id, new_id
from services.common.errors import SwarmError
from services.common.metrics import LLM_DURATION_BUCKETS, TTFT_BUCKETS

WINDOW = 256
# The calls a reported service time averages: enough to even out short and long answers,
# few enough to follow a change of prompts within a few heartbeats.
LOAD_WINDOW = 32

log = logging.getLogger(__name__)


class LlmMetrics:
    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        self.requests = Counter(
            "llm_requests_total",
            "Model calls by API and outcome.",
            ["model", "api", "stream", "status"],
            registry=registry,
        )
        self.input_tokens = Counter(
            "llm_input_tokens_total",
            "Prompt tokens of finished model calls.",
            ["model"],
            registry=registry,
        ).labels(model)
        self.output_tokens = Counter(
            "llm_output_tokens_total",
            "Completion tokens of finished model calls.",
            ["model"],
            registry=registry,
        ).labels(model)
        self.duration = Histogram(
            "llm_request_duration_seconds",
            "Model call time, from the request to the last token.",
            ["model", "api", "stream"],
            buckets=LLM_DURATION_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "llm_time_to_first_token_seconds",
            "Streamed model calls: time from the request to the first chunk.",
            ["model", "api"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.active = Gauge(
            "llm_active_requests", "Model calls in progress.", ["model"], registry=registry
        ).labels(model)
        self.errors = Counter(
            "llm_errors_total",
            "Failed model calls by error type.",
            ["model", "type"],
            registry=registry,
        )
        self.cost = Counter(
            "llm_cost_total",
            "Cost of the tokens served, at the configured cost_per_1k_tokens.",
            ["model"],
            registry=registry,
        ).labels(model)
        self.model = model
        self._series: dict[tuple[str, str], Series] = {}

    def series(self, api: str, stream: str) -> Series:
        """The labelled children of one kind of call, looked up once."""
        found = self._series.get((api, stream))
        if found is None:
            model = self.model
            found = self._series[(api, stream)] = Series(
                ok=self.requests.labels(model, api, stream, "ok"),
                error=self.requests.labels(model, api, stream, "error"),
                duration=self.duration.labels(model, api, stream),
                time_to_first_token=self.time_to_first_token.labels(model, api),
            )
        return found


class PromptCacheStats:
    """What the backend says of its prompt cache, from the last answer of each call that
    reached it (a stream left early has none): how many prompt tokens it read from its cache
    rather than evaluated (``prompt_eval_cached_count``; what Ollama counts: see
    ``schemas.ollama``). A backend that does not say is counted apart, not as a miss."""

    def __init__(
        self, registry: CollectorRegistry, *, model: str, backend: str, window: int = WINDOW
    ) -> None:
        tokens = Counter(
            "llm_prompt_cache_tokens_total",
            "Prompt tokens of the model calls that ended with the backend's counts: read from "
            "its cache (cached), evaluated, or of a backend that does not say (unreported).",
            ["model", "backend", "result"],
            registry=registry,
        )
        self.cached = tokens.labels(model, backend, "cached")
        self.evaluated = tokens.labels(model, backend, "evaluated")
        self.unreported = tokens.labels(model, backend, "unreported")
        self.backend = backend
        # (prompt tokens, of them read from the cache or None when the backend did not say)
        self.recent: deque[tuple[int, int | None]] = deque(maxlen=window)

    def observe(self, answer: GenerateResponse | ChatResponse) -> None:
        prompt = answer.prompt_eval_count
        if prompt is None:  # nothing said of the prompt at all
            return
        cached = answer.prompt_eval_cached_count
        if cached is None:
            self.unreported.inc(prompt)
        else:
            cached = min(cached, prompt)
            self.cached.inc(cached)
            self.evaluated.inc(prompt - cached)
        self.recent.append((prompt, cached))

    def summary(self) -> PromptCache:
        reported = [(prompt, cached) for prompt, cached in self.recent if cached is not None]
        prompt_tokens = sum(prompt for prompt, _ in reported)
        cached_tokens = sum(cached for _, cached in reported)
        return PromptCache(
            backend=self.backend,
            calls=len(self.recent),
            calls_reporting=len(reported),
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            cached_share=round(cached_tokens / prompt_tokens, 4) if prompt_tokens else None,
        )


class Slots:
    """The backend's parallel slots as the wrapper's own calls fill them: ``parallel`` at a
    time, the others queued in arrival order until an earlier call ends (as the embedded
    host and Ollama serve them). The wrapper is taken for the backend's only client."""

    def __init__(self, parallel: int) -> None:
        self.parallel = parallel
        self.running = 0
        self.queue: deque[Call] = deque()

    def enter(self, call: Call, now: float) -> None:
        if self.running < self.parallel:
            self.running += 1
            call.served_from = now
        else:
            self.queue.append(call)

    def leave(self, call: Call, now: float) -> None:
        if call.served_from is None:  # it ended while queued: it held no slot
            self.queue.remove(call)
            return
        self.running -= 1
        if self.queue:
            self.enter(self.queue.popleft(), now)


@dataclass(frozen=True, slots=True)
class Series:
    ok: Any
    error: Any
    duration: Any
    time_to_first_token: Any


class Stats:
    """What the wrapper measures about its own calls."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        model: str,
        cost_per_1k_tokens: float,
        clock: Callable[[], float],
        backend: str,
        window: int = WINDOW,
        agent_id: str | None = None,
        provider: str = "local",
        report: Callable[[UsageRecord], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
        parallel: int = 1,
    ) -> None:
        """``parallel``: the calls the backend serves at once."""
        self.metrics = LlmMetrics(registry, model)
        self.prompt_cache = PromptCacheStats(registry, model=model, backend=backend, window=window)
        self.model = model
        self.cost_per_1k_tokens = cost_per_1k_tokens
        self.clock = clock
        self.agent_id = agent_id
        self.provider = provider
        self.report = report  # where each finished call's usage record goes
        self.wall_clock = wall_clock
        self.in_flight = 0
        # (latency seconds, completion tokens) of the last successful calls
        self.recent: deque[tuple[float, int]] = deque(maxlen=window)
        self.slots = Slots(parallel)
        # (seconds in a slot, completion tokens) of the last calls served, left early or not
        self.served: deque[tuple[float, int]] = deque(maxlen=LOAD_WINDOW)

    def begin(self, api: str, stream: bool, endpoint: Endpoint = "chat") -> Call:
        """A call of ``api`` (a metrics label); ``endpoint`` goes in its usage record."""
        self.in_flight += 1
        self.metrics.active.inc()
        call = Call(self, api, stream, endpoint)
        self.slots.enter(call, call.started)
        return call

    def load(self) -> AgentLoad:
        """The load the heartbeats report: calls under way and queued, from this wrapper's
        own calls, and the service times of the last ``LOAD_WINDOW`` calls served."""
        per_call = per_token = None
        if self.served:
            seconds = sum(held for held, _ in self.served)
            tokens = sum(count for _, count in self.served)
            per_call = _milliseconds(seconds / len(self.served))
            per_token = _milliseconds(seconds / tokens) if tokens else None
        parallel = self.slots.parallel
        wait = expected_wait_ms(self.in_flight, parallel, per_call)
        return AgentLoad(
            in_flight=self.in_flight,
            queued=len(self.slots.queue),
            parallel=parallel,
            service_ms_per_call=per_call,
            service_ms_per_token=per_token,
            expected_wait_ms=None if wait is None else min(wait, MAX_MILLISECONDS),
        )

    def performance(self) -> Performance:
        if not self.recent:
            return Performance()
        latencies = sorted(latency for latency, _ in self.recent)
        seconds = sum(latencies)
        tokens = sum(count for _, count in self.recent)
        p95 = latencies[max(0, math.ceil(0.95 * len(latencies)) - 1)]  # nearest rank
        return Performance(
            avg_throughput_tok_s=round(tokens / seconds, 2) if seconds > 0 else None,
            avg_latency_ms=round(seconds / len(latencies) * 1000, 3),
            p95_latency_ms=round(p95 * 1000, 3),
        )


def _milliseconds(seconds: float) -> float:
    """Rounded, and within what a load may report (a call held longer is reported a day)."""
    return min(round(seconds * 1000, 3), MAX_MILLISECONDS)


class Call:
    """One model call; it ends once, with ``done``, ``failed`` or ``cancelled``."""

    __slots__ = (
        "ended",
        "endpoint",
        "first_token_at",
        "series",
        "served_from",
        "started",
        "stats",
        "stream",
    )

    def __init__(self, stats: Stats, api: str, stream: bool, endpoint: Endpoint = "chat") -> None:
        self.stats = stats
        self.stream = stream
        self.endpoint = endpoint
        self.series = stats.metrics.series(api, "true" if stream else "false")
        self.started = stats.clock()
        self.served_from: float | None = None  # when it took a slot (Slots)
        self.first_token_at: float | None = None
        self.ended = False

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = self.stats.clock()
            self.series.time_to_first_token.observe(self.first_token_at - self.started)

    def done(self, prompt_tokens: int, completion_tokens: int) -> None:
        now = self.stats.clock()
        if self._end(now):
            return
        elapsed = now - self.started
        if self.endpoint == "chat":  # /info's throughput and latency are of generation
            self.stats.recent.append((elapsed, completion_tokens))
        self._served(now, completion_tokens)
        self.series.ok.inc()
        self.series.duration.observe(elapsed)
        cost = self._tokens(prompt_tokens, completion_tokens)
        self._report("ok", prompt_tokens, completion_tokens, elapsed, cost)

    def failed(self, error_type: str) -> None:
        now = self.stats.clock()
        if self._end(now):
            return
        self.series.error.inc()
        self.stats.metrics.errors.labels(self.stats.model, error_type).inc()
        self._report("error", 0, 0, now - self.started, 0.0)

    def cancelled(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The caller left mid-stream (the TLC classifier does, once its label is
        decided). The tokens spent so far count; it is no failure of the model."""
        now = self.stats.clock()
        if self._end(now):
            return
        self.stats.metrics.errors.labels(self.stats.model, "client_disconnected").inc()
        cost = self._tokens(prompt_tokens, completion_tokens)
        # The slot time it took counts: the TLC classifier leaves every call early.
        self._served(now, completion_tokens)
        self._report("cancelled", prompt_tokens, completion_tokens, now - self.started, cost)

    def _served(self, now: float, completion_tokens: int) -> None:
        """Record the time it held a slot (none if it ended while queued, as a backend with
        more slots than configured serves it)."""
        if self.served_from is not None:
            self.stats.served.append((now - self.served_from, completion_tokens))

    def _tokens(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Count the tokens; their cost."""
        metrics = self.stats.metrics
        metrics.input_tokens.inc(prompt_tokens)
        metrics.output_tokens.inc(completion_tokens)
        cost = (prompt_tokens + completion_tokens) / 1000 * self.stats.cost_per_1k_tokens
        if cost:
            metrics.cost.inc(cost)
        return cost

    def _report(
        self,
        status: Status,
        prompt: int,
        completion: int,
        elapsed: float,
        cost: float,
    ) -> None:
        stats = self.stats
        if stats.report is None:
            return
        record_id = new_id()
        first = self.first_token_at
        stats.report(
            UsageRecord(
                record_id=record_id,
                request_id=current_request_id() or record_id,
                time=datetime.fromtimestamp(stats.wall_clock(), UTC),
                agent_id=stats.agent_id,
                provider=stats.provider,
                model=stats.model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                latency_ms=elapsed * 1000,
                time_to_first_token_ms=None if first is None else (first - self.started) * 1000,
                stream=self.stream,
                status=status,
                cost=cost,
                endpoint=self.endpoint,
            )
        )

    def _end(self, now: float) -> bool:
        """Mark the call ended, its slot free; True when it already was."""
        if self.ended:
            return True
        self.ended = True
        self.stats.in_flight -= 1
        self.stats.metrics.active.dec()
        self.stats.slots.leave(self, now)
        return False


@contextlib.contextmanager
def counting_failures(call: Call) -> Iterator[None]:
    """Count a call that fails before it answers; the error goes on to its handler."""
    try:
        yield
    except SwarmError as exc:
        call.failed(exc.code)
        raise
    except BaseException:
        call.failed("internal_error")
        raise


def stream_failure(call: Call, exc: Exception) -> SwarmError:
    """Count a stream that failed after it started (call from its ``except``); the error
    to end the stream with."""
    if isinstance(exc, SwarmError):
        call.failed(exc.code)
        log.warning("stream failed: %s", exc.message)
        return exc
    call.failed("internal_error")
    log.exception("stream failed")
    return SwarmError("internal error")
