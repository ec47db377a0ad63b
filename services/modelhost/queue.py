"""The model's queue: bounded, first come first served, with a measured service time.

A generation takes a ``Ticket`` when its request is admitted (in the handler, before any
answer is sent, so that a full queue is a 503 for streamed and non-streamed calls alike)
and gets the model in the order the tickets were taken. At most ``limit`` tickets are
held at once, waiting and running together; one more is refused with the wait a caller
admitted now would have, from the measured time the recent generations held the model.

A ticket whose caller goes away while it waits leaves the queue and never gets the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from prometheus_client import Counter, Gauge, Histogram

from schemas.agents import expected_wait_ms
from services.common.errors import ServiceUnavailable
from services.common.metrics import LLM_DURATION_BUCKETS

# Before any generation has been measured, a generation is taken to hold the model for 2 s:
# a short answer (about 100 tokens) of the packaged models on this project's 2-core
# machine, where SmolLM2 writes 44 tok/s on one thread. It is only a starting guess:
# ``service_time`` says None until a real generation replaces it.
DEFAULT_SERVICE_SECONDS = 2.0
# The service time is the mean of this many recent generations: enough to smooth one long
# answer out, few enough to follow a change of load within a minute or so.
SERVICE_WINDOW = 16

# Ollama's words for its full queue (ErrMaxQueue): clients match on them.
QUEUE_FULL = "server busy, please try again. maximum pending requests exceeded"


class QueueFull(ServiceUnavailable):
    """503 with ``Retry-After``: the expected wait of the refused caller, in whole seconds."""

    code = "queue_full"

    def __init__(self, retry_after: int) -> None:
        super().__init__(QUEUE_FULL, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class _State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


class QueueMetrics:
    """The queue's figures for ``/metrics``. Not registered anywhere: an app registers them
    on its own registry (tests run several apps on one queue)."""

    def __init__(self, queue: ModelQueue) -> None:
        self.queued = Gauge(
            "modelhost_queue_length",
            "Generations admitted and waiting for the model.",
            registry=None,
        )
        self.queued.set_function(lambda: queue.queued)
        self.running = Gauge("modelhost_running", "Generations holding the model.", registry=None)
        self.running.set_function(lambda: queue.running)
        self.service = Gauge(
            "modelhost_service_time_seconds",
            "Mean time the recent generations held the model (NaN before the first).",
            registry=None,
        )
        self.service.set_function(lambda: math.nan if (s := queue.service_time) is None else s)
        self.wait = Histogram(
            "modelhost_queue_wait_seconds",
            "Time from admission to the model, of the generations that got it.",
            buckets=(0.001, *LLM_DURATION_BUCKETS),
            registry=None,
        )
        self.refused = Counter(
            "modelhost_queue_refused",
            "Generations refused with a 503: the queue held its maximum.",
            registry=None,
        )
        self.left = Counter(
            "modelhost_queue_left",
            "Generations whose caller went away while they waited: they never ran.",
            registry=None,
        )

    def collectors(self) -> list[Gauge | Histogram | Counter]:
        return [self.queued, self.running, self.service, self.wait, self.refused, self.left]


class Ticket:
    """One admitted generation's place in the queue, then its hold on the model."""

    def __init__(self, queue: ModelQueue, admitted: float) -> None:
        self._queue = queue
        self._granted = asyncio.Event()
        self.state = _State.WAITING
        self.admitted = admitted
        self.started: float | None = None

    async def wait(self) -> None:
        """Until the model is this ticket's. Cancelled, the ticket leaves the queue (and
        hands the model on, had it just been given it)."""
        if self.state is _State.DONE:
            raise RuntimeError("this ticket has left the queue")
        try:
            await self._granted.wait()
        except BaseException:
            self.leave()
            raise

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold the model for one generation; its time counts toward the service time."""
        await self.wait()
        try:
            yield
        finally:
            self._queue._release(self, measured=True)

    def leave(self) -> None:
        """Give up the place or the model, whichever is held; nothing once done."""
        if self.state is _State.WAITING:
            self._queue._drop(self)
        elif self.state is _State.RUNNING:
            self._queue._release(self, measured=False)

    def _grant(self, now: float) -> None:
        self.state, self.started = _State.RUNNING, now
        self._granted.set()


class ModelQueue:
    """First come, first served access to ``slots`` generations at a time, for at most
    ``limit`` admitted generations (waiting and running)."""

    def __init__(
        self, *, limit: int, slots: int = 1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit < 1 or slots < 1:
            raise ValueError("a queue needs a limit and slots of at least 1")
        self.limit = limit
        self.slots = slots
        self.clock = clock
        self.running = 0
        self._waiting: deque[Ticket] = deque()
        self._durations: deque[float] = deque(maxlen=SERVICE_WINDOW)
        self.metrics = QueueMetrics(self)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def service_time(self) -> float | None:
        """Mean seconds the recent generations held the model; None before the first."""
        if not self._durations:
            return None
        return sum(self._durations) / len(self._durations)

    def expected_wait(self) -> float:
        """Seconds a generation admitted now would wait for the model: the swarm's one
        formula (``schemas.agents.expected_wait_ms``, which wrappers report and the router
        ranks by) over the generations held, with the measured service time (before any,
        ``DEFAULT_SERVICE_SECONDS``). It errs long, the safe side for a caller deciding
        whether to wait."""
        service = self.service_time
        seconds = DEFAULT_SERVICE_SECONDS if service is None else service
        wait_ms = expected_wait_ms(self.queued + self.running, self.slots, seconds * 1e3)
        return (wait_ms or 0.0) / 1e3

    def enter(self) -> Ticket:
        """Admit a generation at the back of the queue; ``QueueFull`` when it holds ``limit``."""
        if self.queued + self.running >= self.limit:
            self.metrics.refused.inc()
            raise QueueFull(retry_after=max(1, math.ceil(self.expected_wait())))
        ticket = Ticket(self, admitted=self.clock())
        self._waiting.append(ticket)
        self._hand_on()
        return ticket

    def _hand_on(self) -> None:
        while self._waiting and self.running < self.slots:
            ticket = self._waiting.popleft()
            now = self.clock()
            self.running += 1
            self.metrics.wait.observe(now - ticket.admitted)
            ticket._grant(now)

    def _drop(self, ticket: Ticket) -> None:
        self._waiting.remove(ticket)
        ticket.state = _State.DONE
        self.metrics.left.inc()

    def _release(self, ticket: Ticket, *, measured: bool) -> None:
        if ticket.state is not _State.RUNNING:
            return
        ticket.state = _State.DONE
        self.running -= 1
        if measured and ticket.started is not None:
            self._durations.append(self.clock() - ticket.started)
        self._hand_on()
