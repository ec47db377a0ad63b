"""The router: candidate order, circuit breakers, decisions, and the OpenAI proxy with
fallback, against a real registry app and real loopback upstreams (fake OpenAI servers
that answer, fail, refuse or stall as a test asks)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from functools import partial

import httpx
import pytest
import respx
from aiohttp import web
from sqlalchemy import Column, MetaData, Table, event, inspect

from router.breaker import Breaker
from router.candidates import (
    agent_candidate,
    by_capability,
    provider_candidate,
    rank,
    within_budget,
)
from router.load import Load, expected_wait_ms
from router.ratelimit import RateLimiter
from router.usage import METADATA, WRITE_BATCH, T, UsageLog, UsageStore, add_missing_columns
from schemas.agents import AgentLoad, AgentRecord
from schemas.config import ProviderConfig
from schemas.usage import UsageRecord
from services.common.database import create_db_engine, db_runner
from tests.conftest import (
    NOW,
    OPENAI_PROVIDER,
    FakeClock,
    call_record,
    data,
    failures_at_once,
    free_port,
    post_and_leave,
)

pytestmark = pytest.mark.anyio

COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
CHAT = {"model": "capability:reasoning", "messages": [{"role": "user", "content": "Hi"}]}


def agent(
    agent_id: str,
    *capabilities: str,
    cost: float = 0.0,
    locality: str = "local",
    endpoint: str | None = None,
    status: str = "passing",
    model: str = "m",
) -> AgentRecord:
    return AgentRecord(
        agent_id=agent_id,
        name=agent_id,
        tier=2,
        locality=locality,
        role="reasoner",
        capabilities=list(capabilities),
        endpoint=endpoint or f"http://127.0.0.1:9/{agent_id}",
        transport="http",
        cost_per_1k_tokens=cost,
        metadata={"model": model},
        ttl_seconds=30,
        status=status,
        registered_at=NOW,
        last_heartbeat=NOW,
        expires_at=NOW,
    )


def ranked(
    capability: str,
    agents,
    *,
    waits=None,
    calls=None,
    prefer_local=True,
    providers=None,
    fallbacks=None,
    open_circuits=(),
):
    waits, calls = waits or {}, calls or {}
    return [
        c.agent_id or c.provider
        for c in rank(
            capability,
            by_capability(agents),
            fallbacks=fallbacks or {},
            providers=providers or {},
            prefer_local=prefer_local,
            usable=lambda e: e not in open_circuits,
            waiting=lambda c: (waits.get(c.agent_id), calls.get(c.agent_id, 0)),
        )
    ]


# --- candidate order ---------------------------------------------------------------------


def test_local_and_cheap_first_then_the_lowest_expected_wait():
    agents = [
        agent("cloud-ish", "reasoning", cost=0.5, locality="cloud"),
        agent("busy", "reasoning"),
        agent("idle", "reasoning"),
        agent("unknown", "reasoning"),
        agent("pricey", "reasoning", cost=0.1),
        agent("other", "classification"),
        agent("down", "reasoning", status="critical"),
    ]
    waits = {"busy": 900.0, "idle": 0.0, "pricey": 0.0}
    assert ranked("reasoning", agents, waits=waits) == [
        "idle",
        "busy",
        "unknown",  # an unknown wait comes after the known ones
        "pricey",
        "cloud-ish",
    ]
    # without local preference, cost alone leads
    assert ranked("reasoning", agents, waits=waits, prefer_local=False)[:4] == [
        "idle",
        "busy",
        "unknown",
        "pricey",
    ]


def test_equal_candidates_of_equal_waits_go_to_the_one_with_fewer_calls_open():
    replicas = [agent("a-first", "reasoning"), agent("b-second", "reasoning")]
    assert ranked("reasoning", replicas) == ["a-first", "b-second"]  # nothing open: by name
    # two slots each, one taken at a-first: both free, b-second has fewer calls open
    idle = {"a-first": 0.0, "b-second": 0.0}
    assert ranked("reasoning", replicas, waits=idle, calls={"a-first": 1}) == [
        "b-second",
        "a-first",
    ]
    # both busy and never measured (unknown): the fewer calls open first
    calls = {"a-first": 2, "b-second": 1}
    assert ranked("reasoning", replicas, calls=calls) == ["b-second", "a-first"]
    # a known wait still beats fewer calls
    waits = {"a-first": 100.0, "b-second": 200.0}
    assert ranked("reasoning", replicas, waits=waits, calls=calls) == ["a-first", "b-second"]


def test_fallback_capabilities_and_keyed_providers_come_after():
    providers = {
        "openai": ProviderConfig(
            kind="openai",
            base_url="https://api.openai.com/v1",
            api_key_env="OPENAI_API_KEY",
            models={"classification": "gpt-4o-mini"},
            price_per_1k_input=0.15,
            price_per_1k_output=0.6,
        )
    }
    agents = [agent("reasoner", "reasoning"), agent("classifier", "classification")]
    fallbacks = {"classification": ["reasoning"]}
    assert ranked("classification", agents, fallbacks=fallbacks, providers=providers) == [
        "classifier",
        "reasoner",
        "openai",
    ]
    # without local preference, a provider with the capability itself beats a fallback
    assert ranked(
        "classification", agents, fallbacks=fallbacks, providers=providers, prefer_local=False
    ) == ["classifier", "openai", "reasoner"]
    # an open circuit takes its endpoint out
    open_one = {"http://127.0.0.1:9/classifier"}
    assert ranked("classification", agents, fallbacks=fallbacks, open_circuits=open_one) == [
        "reasoner"
    ]


# --- circuit breakers --------------------------------------------------------------------


def breaker(clock: FakeClock) -> Breaker:
    return Breaker(failures=3, failure_rate=0.5, window=10, cooldown=5.0, clock=clock)


def test_a_circuit_opens_after_consecutive_failures_and_tries_once_when_cooled():
    clock = FakeClock(0.0)
    circuit = breaker(clock)
    circuit.failed()
    circuit.failed()
    assert circuit.allows()
    circuit.failed()
    assert (circuit.state, circuit.allows(), circuit.retry_after()) == ("open", False, 5.0)
    clock.advance(5.0)
    assert circuit.allows()
    assert circuit.state == "half_open"
    assert circuit.begin()  # the one trial call
    assert not circuit.begin()  # nobody else meanwhile
    circuit.failed()  # the trial failed: open again, for a whole cool-down
    assert (circuit.state, circuit.retry_after()) == ("open", 5.0)
    clock.advance(5.0)
    assert circuit.begin()
    circuit.succeeded()
    assert (circuit.state, circuit.allows()) == ("closed", True)


def test_a_refused_connection_opens_the_circuit_at_once():
    circuit = breaker(FakeClock(0.0))
    circuit.failed(refused=True)  # nothing listens: a killed wrapper
    assert (circuit.state, circuit.allows()) == ("open", False)


def test_a_trial_that_says_nothing_of_the_endpoint_lets_another_trial_run():
    clock = FakeClock(0.0)
    circuit = breaker(clock)
    circuit.failed(refused=True)
    clock.advance(5.0)
    assert circuit.begin()
    circuit.released()  # the trial got a 429, or its caller left
    assert circuit.state == "half_open"
    assert circuit.begin()  # not stuck half-open with a trial that never ends


def test_a_circuit_opens_on_the_failure_rate_of_a_window():
    circuit = breaker(FakeClock(0.0))
    for outcome in ("ok", "fail", "ok", "fail", "ok"):  # never 3 failures in a row
        circuit.succeeded() if outcome == "ok" else circuit.failed()
    assert circuit.state == "closed"  # 2 of 5: under half
    circuit.failed()  # 3 of 6, and 6 calls are half the window: enough to judge
    assert circuit.state == "open"


# --- the app against real upstreams ------------------------------------------------------


class Upstream:
    """A fake OpenAI-compatible server on a loopback port. ``mode``: ok, refuse (400),
    error (500, as for any body that holds "poison"), down (503), busy (429), slow
    (answers after the router's read timeout), sluggish (answers after 0.2 s, within it),
    hold (answers once the test sets ``release``), stall (streams one chunk, then
    nothing), long (streams a chunk every 0.1 s for 10 s)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.arrived = asyncio.Event()  # a held call has come
        self.release = asyncio.Event()
        self.calls: list[dict] = []
        self.dropped = 0  # streams whose caller went away
        self.arrivals: asyncio.Queue | None = None  # told of each call as it comes

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.arrivals is not None:
            self.arrivals.put_nowait(self)
        self.calls.append(
            {
                "body": body,
                "request_id": request.headers.get("X-Request-ID"),
                "connection": request.transport.get_extra_info("peername"),
            }
        )
        if self.mode == "error" or "poison" in json.dumps(body):
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if self.mode == "down":
            return web.json_response({"error": {"message": "no backend"}}, status=503)
        if self.mode == "refuse":
            return web.json_response({"error": {"message": "max_tokens too big"}}, status=400)
        if self.mode == "busy_once":
            self.mode = "ok"
            return web.json_response(
                {"error": {"message": "busy"}}, status=429, headers={"Retry-After": "1"}
            )
        if self.mode == "busy":
            return web.json_response(
                {"error": {"message": "busy"}}, status=429, headers={"Retry-After": "7"}
            )
        if self.mode == "slow":
            await asyncio.sleep(1.5)
        if self.mode == "sluggish":
            await asyncio.sleep(0.2)
        if self.mode == "hold":
            self.arrived.set()
            await self.release.wait()
        if not body.get("stream"):
            return web.json_response(COMPLETION)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            pieces = ["Hel", "lo"] if self.mode != "long" else ["Hel"] + ["lo"] * 100
            for piece in pieces:
                chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                if self.mode in ("stall", "long"):
                    await asyncio.sleep(1.5 if self.mode == "stall" else 0.1)
            await response.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            self.dropped += 1
        return response


@pytest.fixture
async def upstreams():
    made: list[Upstream] = []

    async def make() -> tuple[Upstream, str]:
        upstream = Upstream()
        made.append(upstream)
        return upstream, await upstream.start()

    yield make
    for upstream in made:
        await upstream.runner.cleanup()


async def register(
    registry_http,
    agent_id: str,
    endpoint: str,
    *capabilities: str,
    cost: float = 0.0,
    locality: str = "local",
) -> None:
    definition = {
        "locality": locality,
        "cost_per_1k_tokens": cost,
        "agent_id": agent_id,
        "name": agent_id,
        "role": "reasoner",
        "capabilities": list(capabilities) or ["reasoning"],
        "endpoint": endpoint,
        "metadata": {"model": f"model-of-{agent_id}"},
    }
    (await registry_http.post("/register", json=definition)).raise_for_status()


async def test_route_answers_the_decision_of_the_spec(start_router, registry_http):
    await register(registry_http, "llm_reasoner", "http://127.0.0.1:8050", "reasoning")
    router = await start_router()
    decision = (await router.post("/route", json={"capability": "reasoning"})).json()
    assert decision["provider"] == "local"
    assert decision["endpoint"] == "http://127.0.0.1:8050"
    assert decision["agent_id"] == "llm_reasoner"
    assert decision["model"] == "model-of-llm_reasoner"
    assert decision["cost_per_1k_tokens"] == 0
    assert decision["fallbacks"] == []
    assert "llm_reasoner" in decision["reason"]
    # classification falls back to reasoning by the profile
    fallback = (await router.post("/route", json={"capability": "classification"})).json()
    assert fallback["agent_id"] == "llm_reasoner"


async def test_an_unknown_capability_is_404_naming_what_exists(start_router, registry_http):
    await register(registry_http, "llm_reasoner", "http://127.0.0.1:8050", "reasoning")
    router = await start_router()
    response = await router.post("/route", json={"capability": "telepathy"})
    assert response.status_code == 404
    assert "reasoning" in response.json()["error"]["message"]
    chat = await router.post("/v1/chat/completions", json=CHAT | {"model": "capability:x"})
    assert chat.status_code == 404


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/route", {}),
        ("/route", {"capability": "Not A Capability!"}),
        ("/v1/chat/completions", {"model": "capability:reasoning", "messages": []}),
    ],
)
async def test_bad_input_is_a_422_envelope(start_router, path, body):
    router = await start_router()
    response = await router.post(path, json=body)
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_a_call_goes_to_the_best_candidate_with_its_request_id(
    start_router, registry_http, upstreams
):
    first, first_url = await upstreams()
    second, second_url = await upstreams()
    await register(registry_http, "a-first", first_url)
    await register(registry_http, "b-second", second_url)
    router = await start_router()
    response = await router.post(
        "/v1/chat/completions", json=CHAT, headers={"X-Request-ID": "route-me-1"}
    )
    assert response.status_code == 200
    assert response.json() == COMPLETION
    assert response.headers["X-Routed-To"] == "a-first"
    assert [call["request_id"] for call in first.calls] == ["route-me-1"]
    assert second.calls == []


@pytest.mark.parametrize("failure", ["error", "down", "busy", "slow", "refused"])
async def test_a_failed_candidate_falls_back_to_the_next(
    start_router, registry_http, upstreams, failure
):
    first, first_url = await upstreams()
    second, second_url = await upstreams()
    if failure == "refused":
        first_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    first.mode = failure
    await register(registry_http, "a-first", first_url)
    await register(registry_http, "b-second", second_url)
    router = await start_router()
    for stream in (False, True):
        response = await router.post("/v1/chat/completions", json=CHAT | {"stream": stream})
        assert response.status_code == 200, response.text
        assert response.headers["X-Routed-To"] == "b-second"
    assert len(second.calls) == 2
    # a refused connection takes the endpoint out at once: the second call did not try it
    expected_attempts = 1 if failure == "refused" else 2
    metrics = (await router.get("/metrics")).text
    assert f'router_fallbacks_total{{capability="reasoning"}} {expected_attempts:.1f}' in metrics
    assert 'router_calls_total{capability="reasoning",served_by="b-second",status="ok"} 2.0' in (
        metrics
    )
    kind = {"error": "http_500", "down": "http_5xx", "busy": "http_429", "slow": "timeout"}
    kind["refused"] = "connect"
    expected = (
        f'router_failed_attempts_total{{candidate="a-first",kind="{kind[failure]}"}} '
        f"{expected_attempts:.1f}"
    )
    assert expected in metrics


async def test_a_callers_bad_request_never_opens_a_circuit_for_the_others(
    start_router, registry_http, upstreams
):
    first, first_url = await upstreams()
    second, second_url = await upstreams()
    await register(registry_http, "a-first", first_url)
    await register(registry_http, "b-second", second_url, cost=0.1)
    router = await start_router(breaker_failures=2)
    poison = CHAT | {"messages": [{"role": "user", "content": "poison"}]}
    for _ in range(5):  # issue 13: one client kept the capability down this way
        failed = await router.post("/v1/chat/completions", json=poison)
        assert failed.status_code == 503
        assert "HTTP 500" in failed.json()["error"]["message"]
    # each bad request tried each agent once, with no retry round, and opened nothing
    assert (len(first.calls), len(second.calls)) == (5, 5)
    assert set(router.app.state.router.breakers.states().values()) == {"closed"}
    served = await router.post("/v1/chat/completions", json=CHAT)
    assert served.headers["X-Routed-To"] == "a-first"


async def test_an_agent_in_front_of_a_cloud_is_called_at_its_endpoint(
    start_router, registry_http, upstreams
):
    upstream, url = await upstreams()
    await register(registry_http, "cloud-wrapper", url, cost=0.5, locality="cloud")
    router = await start_router()  # no provider keyed: the agent is the only way there
    for stream in (False, True):
        served = await router.post("/v1/chat/completions", json=CHAT | {"stream": stream})
        assert served.status_code == 200, served.text
        assert served.headers["X-Routed-To"] == "cloud-wrapper"
    assert len(upstream.calls) == 2
    await router.app.state.router.usage.flush()
    summary = (await router.get("/api/usage/summary", params={"window": "15m"})).json()
    assert (summary["routed"], summary["calls"]) == (2, 0)  # its calls are its own to report


async def test_a_busy_only_candidate_is_tried_again_after_its_retry_after(
    start_router, registry_http, upstreams
):
    upstream, url = await upstreams()
    upstream.mode = "busy_once"  # 429 with Retry-After: 1, then answers
    await register(registry_http, "only-one", url)
    router = await start_router()
    answer = await router.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 200
    assert len(upstream.calls) == 2
    # a longer Retry-After than the router waits for is the caller's to honour
    upstream.mode = "busy"  # Retry-After: 7
    refused = await router.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "7"


async def test_a_refusal_is_the_callers_to_read_and_not_a_fallback(
    start_router, registry_http, upstreams
):
    first, first_url = await upstreams()
    second, second_url = await upstreams()
    first.mode = "refuse"
    await register(registry_http, "a-first", first_url)
    await register(registry_http, "b-second", second_url, cost=0.1)  # always second
    router = await start_router()
    for stream in (False, True):
        response = await router.post("/v1/chat/completions", json=CHAT | {"stream": stream})
        assert response.status_code == 400
        assert response.json()["error"]["message"] == "max_tokens too big"
    assert second.calls == []


async def test_a_stream_passes_through_and_a_stall_ends_it_with_an_error_event(
    start_router, registry_http, upstreams
):
    upstream, url = await upstreams()
    await register(registry_http, "streamer", url)
    router = await start_router()
    whole = await router.post("/v1/chat/completions", json=CHAT | {"stream": True})
    assert whole.headers["content-type"].startswith("text/event-stream")
    assert whole.text.count("data: ") == 3
    assert whole.text.endswith("data: [DONE]\n\n")
    await router.post("/v1/chat/completions", json=CHAT | {"stream": True})
    assert len({call["connection"] for call in upstream.calls}) == 1  # a finished stream
    # gives its connection back to the pool
    upstream.mode = "stall"
    stalled = await router.post("/v1/chat/completions", json=CHAT | {"stream": True})
    events = [line for line in stalled.text.split("\n\n") if line]
    assert '"Hel"' in events[0]
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "upstream_failed"
    assert events[-1] == "data: [DONE]"


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_a_client_that_goes_away_drops_the_upstream_stream(
    start_router, registry_http, upstreams, spec_version
):
    upstream, url = await upstreams()
    upstream.mode = "long"  # 10 s of chunks: still generating when the client leaves
    await register(registry_http, "streamer", url)
    router = await start_router()
    body = CHAT | {"stream": True}
    sent = await post_and_leave(router.app, "/v1/chat/completions", body, spec_version)
    assert (sent[0]["status"], b'"Hel"' in sent[1]["body"]) == (200, True)
    for _ in range(100):  # the upstream sees its connection closed at its next write
        if upstream.dropped:
            break
        await asyncio.sleep(0.05)
    assert upstream.dropped == 1
    await router.app.state.router.usage.flush()
    request_id = dict(sent[0]["headers"])[b"x-request-id"].decode()
    (route,) = (await router.get(f"/api/usage/requests/{request_id}")).json()["records"]
    assert (route["agent_id"], route["status"]) == ("streamer", "cancelled")


async def test_a_tripped_endpoint_is_skipped_and_the_last_failure_says_what_was_tried(
    start_router, registry_http, upstreams
):
    first, first_url = await upstreams()
    second, second_url = await upstreams()
    first.mode = second.mode = "down"
    await register(registry_http, "a-first", first_url)
    await register(registry_http, "b-second", second_url)
    router = await start_router(breaker_failures=2)
    # a-first, b-second, then (after a short backoff) a-first again; one request charges
    # each circuit once, however often it tried there: none opens yet
    failed = await router.post("/v1/chat/completions", json=CHAT)
    assert failed.status_code == 503
    message = failed.json()["error"]["message"]
    assert message.count("a-first") == 2
    assert message.count("b-second") == 1
    assert "HTTP 503" in message
    assert router.app.state.router.breakers.states() == {first_url: "closed", second_url: "closed"}
    # a second request fails on both: their second failures open both circuits
    failed = await router.post("/v1/chat/completions", json=CHAT)
    message = failed.json()["error"]["message"]
    assert (message.count("a-first"), message.count("b-second")) == (1, 1)
    # both circuits are open now: no call reaches them, and the caller hears when to retry
    failed = await router.post("/v1/chat/completions", json=CHAT)
    assert failed.status_code == 503
    assert "circuit is open" in failed.json()["error"]["message"]
    assert 4 <= int(failed.headers["Retry-After"]) <= 5  # when the first cool-down ends
    assert (len(first.calls), len(second.calls)) == (3, 2)
    metrics = (await router.get("/metrics")).text
    assert f'router_circuit_state{{endpoint="{first_url}"}} 2.0' in metrics  # open
    # no deployments available is never the answer while a candidate is healthy
    second.mode = "ok"
    await register(registry_http, "c-third", second_url.replace("127.0.0.1", "localhost"))
    await router.app.state.router.directory.refresh()
    served = await router.post("/v1/chat/completions", json=CHAT)
    assert served.status_code == 200
    assert served.headers["X-Routed-To"] == "c-third"


async def test_health_says_whether_the_registry_was_read(start_router):
    router = await start_router()
    health = await router.get("/health")
    assert (health.status_code, health.json()["status"]) == (200, "healthy")


async def test_ready_once_the_registry_was_read(start_router):
    ready = await (await start_router()).get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    unread = httpx.AsyncClient(transport=httpx.MockTransport(refuse), base_url="http://r.test")
    router = await start_router(registry_client=unread)
    assert (await router.get("/healthz")).json() == {"status": "alive"}
    not_ready = await router.get("/readyz")
    assert (not_ready.status_code, not_ready.json()["status"]) == (503, "not_ready")
    assert not_ready.json()["reason"]


# --- usage records and the usage API -----------------------------------------------------


async def test_reported_calls_add_up_to_the_summary(start_router):
    router = await start_router(reference_price_per_1k_tokens=0.002)
    records = [
        call_record(1, "llm_a", "local", 100, 50, 200.0),
        call_record(2, "llm_a", "local", 300, 150, 400.0),
        call_record(3, "llm_b", "local", 10, 0, 50.0, status="error"),
        call_record(4, None, "openai", 1_000, 500, 900.0, cost=0.0006),
    ]
    accepted = await router.post("/usage", json={"records": records})
    assert accepted.json() == {"accepted": 4, "refused": []}
    again = await router.post("/usage", json={"records": records[:2]})  # a resent batch
    assert again.json() == {"accepted": 0, "refused": []}
    summary = (await router.get("/api/usage/summary", params={"window": "1h"})).json()
    tokens = 100 + 50 + 300 + 150 + 10 + 1_000 + 500
    assert summary["calls"] == 4
    assert (summary["local_calls"], summary["cloud_calls"]) == (3, 1)
    assert summary["local_share"] == 0.75
    assert (summary["prompt_tokens"], summary["completion_tokens"]) == (1_410, 700)
    assert (summary["local_tokens"], summary["cloud_tokens"]) == (610, 1_500)
    assert summary["cost"] == pytest.approx(0.0006)
    assert summary["would_have_cost"] == pytest.approx(tokens / 1000 * 0.002)
    assert summary["saved"] == pytest.approx(tokens / 1000 * 0.002 - 0.0006)
    assert (summary["errors"], summary["error_rate"]) == (1, 0.25)
    by_agent = (await router.get("/api/usage/by-agent", params={"window": "1h"})).json()
    first = by_agent["agents"][0]
    assert (first["agent_id"], first["calls"], first["completion_tokens"]) == ("llm_a", 2, 200)
    assert first["tokens_per_second"] == round(200 / 0.6, 2)  # 200 tokens in 0.6 s
    assert (first["latency_p50_ms"], first["latency_p99_ms"]) == (200.0, 400.0)
    series = (
        await router.get("/api/usage/timeseries", params={"window": "1h", "buckets": 6})
    ).json()
    assert len(series["buckets"]) == 6
    assert sum(b["calls"] for b in series["buckets"]) == 4
    assert sum(b["cloud_tokens"] for b in series["buckets"]) == 1_500
    # a window that has passed holds nothing
    router.wall_clock.advance(7_200)
    later = (await router.get("/api/usage/summary", params={"window": "1h"})).json()
    assert later["calls"] == 0


async def test_a_record_is_taken_only_with_the_json_types_of_its_schema(start_router):
    # Issue 13: "cost": false was stored as a cost of 0.
    router = await start_router()
    records = [
        call_record(1, "llm_a", "local", 1, 1, 10.0) | {"cost": False},
        call_record(2, "llm_a", "local", 1, 1, 10.0) | {"stream": 1},
        call_record(3, "llm_a", "local", 1, 1, 10.0) | {"prompt_tokens": "1"},
        call_record(4, "llm_a", "local", 1, 1, 10.0),
    ]
    answer = (await router.post("/usage", json={"records": records})).json()
    assert answer["accepted"] == 1
    refused = {refusal["index"]: refusal["reason"] for refusal in answer["refused"]}
    assert set(refused) == {0, 1, 2}
    assert refused[0].startswith("cost")
    assert refused[1].startswith("stream")
    assert refused[2].startswith("prompt_tokens")


async def test_the_usage_api_serves_the_fields_its_schema_requires_null_when_unknown(
    start_router,
):
    # Issue 13: an empty window left out the rates; an agent with only errors, latencies.
    router = await start_router()
    summary = (await router.get("/api/usage/summary")).json()
    assert {key: summary[key] for key in ("local_share", "error_rate", "fallback_rate")} == {
        "local_share": None,
        "error_rate": None,
        "fallback_rate": None,
    }
    failed = call_record(1, "llm_down", "local", 0, 0, 10.0, status="error")
    await router.post("/usage", json={"records": [failed]})
    (agent,) = (await router.get("/api/usage/by-agent")).json()["agents"]
    percentiles = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms")
    assert {key: agent[key] for key in percentiles} == dict.fromkeys(percentiles)


async def test_every_routed_request_is_recorded_with_its_fallbacks(
    start_router, registry_http, upstreams
):
    first, first_url = await upstreams()
    second, second_url = await upstreams()
    first.mode = "error"
    await register(registry_http, "a-first", first_url)
    await register(registry_http, "b-second", second_url, cost=0.1)
    router = await start_router()
    await router.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": "r-1"})
    await router.post("/v1/chat/completions", json=CHAT | {"stream": True})
    second.mode = "error"
    await router.post("/v1/chat/completions", json=CHAT)
    await router.app.state.router.usage.flush()
    summary = (await router.get("/api/usage/summary", params={"window": "15m"})).json()
    assert (summary["routed"], summary["fallbacks"]) == (3, 3)
    assert summary["fallback_rate"] == 1.0
    assert summary["calls"] == 0  # model calls are reported by the agents themselves
    (route,) = (await router.get("/api/usage/requests/r-1")).json()["records"]
    assert (route["kind"], route["agent_id"], route["fallback_from"]) == (
        "route",
        "b-second",
        "a-first",
    )
    assert (await router.get("/api/usage/requests/never-seen")).status_code == 404


@pytest.mark.parametrize("window", ["", "0", "soon", "1000d", "-1h"])
async def test_a_bad_window_is_a_422(start_router, window):
    router = await start_router()
    response = await router.get("/api/usage/summary", params={"window": window})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "window"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt_tokens", 2**63 - 1),  # SUM overflowed: every usage answer was a 500
        ("completion_tokens", 2**63),
        ("cost", 1.7e308),  # the summary's cost became null
        ("latency_ms", 1e300),
        ("time", "9999-01-01T00:00:00+00:00"),  # counted in every window, never pruned
        ("time", "2025-01-01T00:00:00+00:00"),  # older than the retention
    ],
)
async def test_a_record_that_would_poison_the_ledger_is_refused_alone(start_router, field, value):
    router = await start_router(usage_retention_days=90)
    good = call_record(1, "llm_a", "local", 1, 1, 1.0)
    bad = call_record(2, "llm_a", "local", 1, 1, 1.0) | {field: value}
    answer = await router.post("/usage", json={"records": [bad, good, "not a record"]})
    assert answer.status_code == 200
    assert answer.json()["accepted"] == 1
    first, second = answer.json()["refused"]
    assert (first["index"], first["record_id"]) == (0, bad["record_id"])
    assert first["reason"].startswith(field)
    assert (second["index"], second["record_id"]) == (2, None)
    for path in ("/api/usage/summary", "/api/usage/by-agent", "/api/usage/timeseries"):
        assert (await router.get(path, params={"window": "24h"})).status_code == 200
    summary = (await router.get("/api/usage/summary")).json()
    assert (summary["calls"], summary["prompt_tokens"]) == (1, 1)


async def test_a_batch_that_is_not_a_list_of_records_is_a_422(start_router):
    router = await start_router()
    for body in ({"records": []}, {"records": {"a": 1}}, {"rows": []}, []):
        assert (await router.post("/usage", json=body)).status_code == 422


async def test_usage_reports_need_the_token_when_one_is_set(start_router):
    router = await start_router(registry_token="s3cret")
    records = {"records": [call_record(1, "llm_a", "local", 1, 1, 1.0)]}
    assert (await router.post("/usage", json=records)).status_code == 401
    # the token is checked first: a caller without it learns nothing of the body's shape
    assert (await router.post("/usage", json={"records": "?"})).status_code == 401
    authorised = {"Authorization": "bearer s3cret"}  # the scheme in any case, as HTTP has it
    response = await router.post("/usage", json=records, headers=authorised)
    assert response.json() == {"accepted": 1, "refused": []}


# --- rate limiting -----------------------------------------------------------------------


def test_a_token_bucket_allows_its_burst_then_its_rate():
    clock = FakeClock(0.0)
    limiter = RateLimiter(rate=1.0, burst=3, clock=clock)
    taken = [limiter.take("alice") for _ in range(4)]
    assert [d.allowed for d in taken] == [True, True, True, False]
    assert [d.remaining for d in taken] == [2, 1, 0, 0]
    assert taken[-1].retry_after == pytest.approx(1.0)
    assert limiter.take("bob").allowed  # every client has its own bucket
    clock.advance(1.0)
    assert limiter.take("alice").allowed
    assert not limiter.take("alice").allowed
    clock.advance(10.0)  # refills up to the burst, no further
    assert limiter.take("alice").remaining == 2


async def test_a_client_over_its_limit_gets_429_with_the_limit_headers(start_router, registry_http):
    await register(registry_http, "llm_reasoner", "http://127.0.0.1:8050", "reasoning")
    clock = FakeClock(0.0)
    router = await start_router(clock=clock, rate_limit_per_second=0.5, rate_limit_burst=2)
    body = {"capability": "reasoning"}
    first = await router.post("/route", json=body)
    assert first.status_code == 200
    assert (first.headers["X-RateLimit-Limit"], first.headers["X-RateLimit-Remaining"]) == (
        "2",
        "1",
    )
    assert (await router.post("/route", json=body)).status_code == 200
    refused = await router.post("/route", json=body)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.headers["Retry-After"] == "2"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert refused.json()["error"]["request_id"] == refused.headers["X-Request-ID"]
    other_key = {"Authorization": "Bearer another-client"}
    assert (await router.post("/route", json=body, headers=other_key)).status_code == 200
    clock.advance(2.0)
    assert (await router.post("/route", json=body)).status_code == 200
    assert (await router.get("/health")).status_code == 200  # status is never limited


# --- cloud providers as fallbacks (the providers themselves: tests/test_cloud.py) --------


async def test_local_first_then_the_cloud_when_the_local_agent_fails(
    start_router, registry_http, upstreams, monkeypatch
):
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test-123")
    local, local_url = await upstreams()
    await register(registry_http, "llm_local", local_url)
    router = await start_router(providers={"openai": OPENAI_PROVIDER})
    with respx.mock(assert_all_called=False) as cloud:
        route = cloud.post("https://api.openai.com/v1/chat/completions").respond(
            json=data("openai/chat_completion.json")
        )
        served = await router.post("/v1/chat/completions", json=CHAT)
        assert served.headers["X-Routed-To"] == "llm_local"
        assert not route.called
        local.mode = "error"
        fell_back = await router.post("/v1/chat/completions", json=CHAT)
    assert fell_back.status_code == 200
    assert fell_back.headers["X-Routed-To"] == "openai"


@pytest.mark.postgres
def test_routers_starting_at_once_on_one_postgresql_create_the_ledger_once(fresh_database):
    # Without their turns, two CREATE TABLEs at once: one fails on PostgreSQL's duplicate key.
    engines = [create_db_engine(fresh_database) for _ in range(3)]
    clock = FakeClock(NOW.timestamp())
    failures = failures_at_once(
        [partial(UsageStore, engine, clock=clock, reference_price_per_1k=0.0) for engine in engines]
    )
    try:
        assert failures == []
        assert set(inspect(engines[0]).get_table_names()) >= {"usage"}
    finally:
        for engine in engines:
            engine.dispose()


def test_the_usage_store_is_the_same_on_sqlite_and_postgresql(database_url):
    engine = create_db_engine(database_url)
    try:
        store = UsageStore(engine, clock=FakeClock(NOW.timestamp()), reference_price_per_1k=0.002)
        records = [
            UsageRecord.model_validate(call_record(n, "llm_a", "local", 10 * n, n, 100.0 * n))
            for n in (1, 2)
        ]
        assert store.add(records) == 2
        assert store.add(records) == 0  # resent: stored once
        summary = store.summary(3_600)
        assert (summary.calls, summary.prompt_tokens, summary.completion_tokens) == (2, 30, 3)
        assert [r.record_id for r in store.for_request("req-2")] == ["rec-2"]
        assert store.by_agent(3_600).agents[0].latency_p99_ms == 200.0
    finally:
        METADATA.drop_all(engine)
        engine.dispose()


def test_a_batch_of_any_size_is_one_prepared_statement_on_sqlite(tmp_path):
    # sqlite3 keeps 128 prepared statements per connection: a statement per batch size
    # (SQLAlchemy's INSERT ... RETURNING with the rows in the SQL) grew the router by tens
    # of MB under load.
    engine = create_db_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    inserts: list[tuple[str, int]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def seen(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT"):
            inserts.append((statement, len(parameters) if executemany else 1))

    store = UsageStore(engine, clock=FakeClock(NOW.timestamp()), reference_price_per_1k=0.0)
    numbers = iter(range(1, 100))
    for size in (1, 2, 5, 3):
        records = [
            UsageRecord.model_validate(call_record(next(numbers), "llm_a", "local", 1, 1, 1.0))
            for _ in range(size)
        ]
        assert store.add(records) == size
        assert store.add(records[:2]) == 0  # known ids are not counted
    assert len({statement for statement, _ in inserts}) == 1
    assert [rows for _, rows in inserts] == [1, 1, 2, 2, 5, 2, 3, 2]
    engine.dispose()


async def test_a_backlog_is_written_in_bounded_batches(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    store = UsageStore(engine, clock=FakeClock(NOW.timestamp()), reference_price_per_1k=0.0)
    batches: list[int] = []

    async def run(function, *args):
        if function == store.add:
            batches.append(len(args[0]))
        return function(*args)

    log = UsageLog(store, run, retention=86_400)
    for n in range(2 * WRITE_BATCH + 5):
        log.add(UsageRecord.model_validate(call_record(n, "llm_a", "local", 1, 1, 1.0)))
    await log.flush()
    assert batches == [WRITE_BATCH, WRITE_BATCH, 5]
    assert (len(log.pending), store.summary(3_600).calls) == (0, 2 * WRITE_BATCH + 5)
    engine.dispose()


async def test_usage_older_than_the_retention_is_deleted(tmp_path):
    clock = FakeClock(NOW.timestamp())
    engine = create_db_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    store = UsageStore(engine, clock=clock, reference_price_per_1k=0.002)
    log = UsageLog(store, db_runner(engine), retention=86_400)
    log.add(UsageRecord.model_validate(call_record(1, "llm_a", "local", 1, 1, 1.0)))
    await log.flush()
    assert store.summary(3 * 86_400).calls == 1
    clock.advance(2 * 86_400)  # a day past the retention
    await log.flush()
    assert store.summary(3 * 86_400).calls == 0
    engine.dispose()


# --- expected wait and spill-over --------------------------------------------------------

NOW_S = NOW.timestamp()


def test_the_expected_wait_is_the_larger_of_the_routers_count_and_the_reported_wait():
    def wait(load: Load, **reported) -> float | None:
        record = agent("a", "reasoning")
        if reported:
            record = record.model_copy(update={"load": AgentLoad(**reported)})
        return expected_wait_ms(agent_candidate(record, "reasoning"), load, NOW_S)

    assert wait(Load()) == 0.0  # nothing open: a slot is free
    assert wait(Load(in_flight=2)) is None  # busy, and nothing says how long a call takes
    assert wait(Load(in_flight=2, latency_ms=300.0)) == 600.0  # the router's own average
    # the agent's service time and slots: 3 open on 2 slots, one wave ahead
    assert wait(Load(in_flight=3, latency_ms=300.0), parallel=2, service_ms_per_call=500.0) == 500
    # the report counts other callers' calls too: the larger, never the sum
    reported = {"parallel": 1, "service_ms_per_call": 500.0, "expected_wait_ms": 2_000.0}
    assert wait(Load(in_flight=1), **reported) == 2_000.0
    assert wait(Load(in_flight=6), **reported) == 3_000.0
    assert wait(Load(), expected_wait_ms=700.0) == 700.0  # none of the router's: theirs
    # the router's calls fill its slot and no service time is known: unknown, whatever
    # the report (from before them) says; an idle report must not hide a burst
    assert wait(Load(in_flight=1), parallel=1, expected_wait_ms=0.0) is None
    assert wait(Load(in_flight=1), expected_wait_ms=700.0) is None
    assert wait(Load(in_flight=1), parallel=2, expected_wait_ms=0.0) == 0.0  # a slot free
    cloud = provider_candidate("openai", OPENAI_PROVIDER, "reasoning")
    assert expected_wait_ms(cloud, Load(in_flight=50), NOW_S) == 0.0  # no queue known of


def test_a_reported_wait_drains_with_the_time_since_it_was_reported():
    reported = AgentLoad(parallel=1, service_ms_per_call=500.0, expected_wait_ms=4_000.0)
    record = agent("a", "reasoning").model_copy(
        update={"load": reported, "load_reported_at": datetime.fromtimestamp(NOW_S, UTC)}
    )
    candidate = agent_candidate(record, "reasoning")
    assert expected_wait_ms(candidate, Load(), NOW_S) == 4_000.0
    assert expected_wait_ms(candidate, Load(), NOW_S + 2.5) == 1_500.0  # its queue drained
    assert expected_wait_ms(candidate, Load(), NOW_S + 9.0) == 0.0  # never below nothing
    # a router clock behind the registry's: no discount, rather than a negative age
    assert expected_wait_ms(candidate, Load(), NOW_S - 3.0) == 4_000.0


def test_a_budget_tries_waits_within_it_then_unknown_ones_then_those_over_it():
    def budgeted(agents, budget, waits, calls=None):
        calls = calls or {}

        def waiting(c):
            return waits.get(c.agent_id), calls.get(c.agent_id, 0)

        index = by_capability(agents)
        options = {"fallbacks": {"classification": ["reasoning"]}, "providers": {}}
        found = rank("classification", index, **options, prefer_local=True,
                     usable=lambda e: True, waiting=waiting)  # fmt: skip
        order, spill = within_budget(found, waiting, budget)
        return [c.name for c in order], spill and (spill[0].name, spill[1])

    classifier, reasoner = agent("classifier", "classification"), agent("reasoner", "reasoning")
    # unknown and idle is a free slot (0): within, and tried first (local first)
    assert budgeted([classifier, reasoner], 2_000, {"classifier": 0.0, "reasoner": 0.0}) == (
        ["classifier", "reasoner"],
        None,
    )
    # busy with the router's call and never measured: the idle fallback first, a spill
    assert budgeted([classifier, reasoner], 2_000, {"reasoner": 0.0}, {"classifier": 1}) == (
        ["reasoner", "classifier"],
        ("classifier", None),
    )
    # both unknown: the fewer calls open first, not the one ranked first
    assert budgeted([classifier, reasoner], 2_000, {}, {"classifier": 2, "reasoner": 1}) == (
        ["reasoner", "classifier"],
        ("classifier", None),
    )
    # within, then unknown (fewer calls first), then over (shorter first); no budget: as ranked
    fleet = [agent(name, "classification") for name in ("a", "b", "c", "d")] + [reasoner]
    waits = {"a": 3_000.0, "b": 2_500.0, "reasoner": 0.0}
    calls = {"c": 2, "d": 1}
    assert budgeted(fleet, 2_000, waits, calls) == (
        ["reasoner", "d", "c", "b", "a"],
        ("b", 2_500.0),
    )
    assert budgeted(fleet, None, waits, calls) == (["b", "a", "d", "c", "reasoner"], None)
    # a budget all known waits are within: the unknown ones still after them
    assert budgeted(fleet, 5_000, waits, calls) == (["b", "a", "reasoner", "d", "c"], None)


async def heartbeat(registry_http, agent_id: str, **load) -> None:
    """A heartbeat with the load a wrapper reports (schemas.agents.Heartbeat)."""
    body = {"status": "passing", "load": load} if load else {"status": "passing"}
    (await registry_http.post(f"/heartbeat/{agent_id}", json=body)).raise_for_status()


async def routed_to(router, headers=None) -> str:
    decision = await router.post("/route", json={"capability": "reasoning"}, headers=headers)
    assert decision.status_code == 200, decision.text
    return decision.json()["agent_id"] or decision.json()["provider"]


async def test_among_equals_the_lowest_expected_wait_goes_first(
    start_router, registry_http, upstreams
):
    first, first_url = await upstreams()
    _, second_url = await upstreams()
    await register(registry_http, "a-first", first_url)
    await register(registry_http, "b-second", second_url)
    clock = FakeClock(0.0)
    router = await start_router(clock=clock)
    routing = router.app.state.router
    assert await routed_to(router) == "a-first"  # nothing known of either: by name

    async def held_call() -> asyncio.Task:
        """A call that a-first holds open until the test releases it."""
        first.mode, first.arrived, first.release = "hold", asyncio.Event(), asyncio.Event()
        call = asyncio.create_task(router.post("/v1/chat/completions", json=CHAT))
        await asyncio.wait_for(first.arrived.wait(), 5)
        return call

    # a-first holds the router's one call: busy, and how long a call takes is unknown
    call = await held_call()
    assert await routed_to(router) == "b-second"
    clock.advance(0.6)  # the call takes 600 ms by the router's clock
    first.release.set()
    assert (await call).headers["X-Routed-To"] == "a-first"
    assert routing.loads[first_url].latency_ms == 600.0
    # a-first holds a call again: a wait of 600 ms by the router's own measure
    call = await held_call()
    assert routing.waiting(routing.candidates("reasoning")[-1]) == (600.0, 1)
    assert await routed_to(router) == "b-second"
    # b-second reports others' calls queued at it: longer than a-first's
    await heartbeat(registry_http, "b-second", in_flight=3, queued=2, parallel=1,
                    service_ms_per_call=450.0, expected_wait_ms=900.0)  # fmt: skip
    await routing.directory.refresh()
    assert await routed_to(router) == "a-first"
    # a-first reports two slots: the router's one call leaves a slot free
    await heartbeat(registry_http, "a-first", in_flight=1, queued=0, parallel=2,
                    service_ms_per_call=400.0, expected_wait_ms=0.0)  # fmt: skip
    await heartbeat(registry_http, "b-second", expected_wait_ms=300.0)
    await routing.directory.refresh()
    assert [c.name for c in routing.candidates("reasoning")] == ["a-first", "b-second"]
    assert [routing.waiting(c) for c in routing.candidates("reasoning")] == [(0.0, 1), (300.0, 0)]
    first.release.set()
    assert (await call).status_code == 200


async def test_a_call_spills_only_when_every_local_candidate_is_over_its_budget(
    start_router, registry_http, upstreams, monkeypatch
):
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test-123")
    first, first_url = await upstreams()
    second, second_url = await upstreams()
    await register(registry_http, "a-first", first_url)
    await register(registry_http, "b-second", second_url)
    await heartbeat(registry_http, "a-first", parallel=1, expected_wait_ms=3_000.0)
    await heartbeat(registry_http, "b-second", parallel=1, expected_wait_ms=1_500.0)
    router = await start_router(providers={"openai": OPENAI_PROVIDER})

    async def chat(request_id: str, budget: str | None) -> httpx.Response:
        headers = {"X-Request-ID": request_id} | ({"X-Max-Wait-Ms": budget} if budget else {})
        answer = await router.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert answer.status_code == 200, answer.text
        return answer

    with respx.mock(assert_all_called=False) as cloud:
        route = cloud.post("https://api.openai.com/v1/chat/completions").respond(
            json=data("openai/chat_completion.json")
        )
        # no budget: local first, however long the wait (nothing spills)
        assert (await chat("no-budget", None)).headers["X-Routed-To"] == "b-second"
        # a budget one local agent is within: the lowest wait serves, as ranked
        assert (await chat("within", "2000")).headers["X-Routed-To"] == "b-second"
        # every local agent over the budget: the call spills to the cloud
        assert (await chat("over", "1000")).headers["X-Routed-To"] == "openai"
        decision = (
            await router.post(
                "/route", json={"capability": "reasoning"}, headers={"X-Max-Wait-Ms": "1000"}
            )
        ).json()
    assert route.call_count == 1
    assert (len(first.calls), len(second.calls)) == (0, 2)
    assert decision["provider"] == "openai"
    assert "spilled: b-second expects a wait of 1500 ms" in decision["reason"]
    assert [c["agent_id"] for c in decision["fallbacks"]] == ["b-second", "a-first"]
    await router.app.state.router.usage.flush()

    async def route_record(request_id: str) -> dict:
        records = (await router.get(f"/api/usage/requests/{request_id}")).json()["records"]
        return next(record for record in records if record["kind"] == "route")

    spilled = await route_record("over")
    assert (spilled["provider"], spilled["reason"], spilled["spill_wait_ms"]) == (
        "openai",
        "spill",
        1_500.0,
    )
    assert spilled.get("fallback_from") is None  # nothing failed
    for request_id in ("no-budget", "within"):
        record = await route_record(request_id)
        assert (record.get("reason"), record.get("spill_wait_ms")) == (None, None)
    metrics = (await router.get("/metrics")).text
    assert 'router_spills_total{capability="reasoning",from="b-second",to="openai"} 1.0' in metrics
    summary = (await router.get("/api/usage/summary", params={"window": "15m"})).json()
    assert (summary["routed"], summary["spills"], summary["fallbacks"]) == (3, 1, 0)


@pytest.mark.parametrize("value", ["0", "-5", "soon", "1.5", "", "86400001", "9" * 5_000])
async def test_a_bad_wait_budget_header_is_a_422_naming_it(start_router, registry_http, value):
    await register(registry_http, "llm_reasoner", "http://127.0.0.1:8050", "reasoning")
    router = await start_router()
    headers = {"X-Max-Wait-Ms": value}
    for path, body in (("/route", {"capability": "reasoning"}), ("/v1/chat/completions", CHAT)):
        response = await router.post(path, json=body, headers=headers)
        assert response.status_code == 422, path
        error = response.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", "X-Max-Wait-Ms")
        assert "X-Max-Wait-Ms" in error["message"]


@pytest.mark.parametrize("spill_to", ["fallback-agent", "cloud"])
async def test_with_a_slow_local_agent_and_a_budget_a_burst_spills_and_nothing_fails(
    start_router, registry_http, upstreams, monkeypatch, spill_to
):
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test-123")
    slow, slow_url = await upstreams()
    slow.mode = "sluggish"  # 0.2 s a call, one at a time as it reports
    await register(registry_http, "classifier", slow_url, "classification")
    await heartbeat(registry_http, "classifier", parallel=1, service_ms_per_call=200.0)
    providers = {}
    if spill_to == "fallback-agent":  # classification falls back to reasoning (the profile)
        _, other_url = await upstreams()
        await register(registry_http, "reasoner", other_url, "reasoning")
    else:
        providers = {"openai": OPENAI_PROVIDER}
    # the profile's budget: less than one call ahead of a new one
    router = await start_router(providers=providers, max_local_wait_ms={"classification": 100})
    burst = CHAT | {"model": "capability:classification"}
    with respx.mock(assert_all_called=False) as cloud:
        cloud.post("https://api.openai.com/v1/chat/completions").respond(
            json=data("openai/chat_completion.json")
        )
        answers = await asyncio.gather(
            *(router.post("/v1/chat/completions", json=burst) for _ in range(8))
        )
    assert [answer.status_code for answer in answers] == [200] * 8
    served = [answer.headers["X-Routed-To"] for answer in answers]
    target = "reasoner" if spill_to == "fallback-agent" else "openai"
    assert set(served) == {"classifier", target}
    spills = served.count(target)
    assert 1 <= served.count("classifier") == len(slow.calls)
    await router.app.state.router.usage.flush()
    summary = (await router.get("/api/usage/summary", params={"window": "15m"})).json()
    assert (summary["routed"], summary["spills"], summary["fallbacks"]) == (8, spills, 0)
    metrics = (await router.get("/metrics")).text
    counted = f'router_spills_total{{capability="classification",from="classifier",to="{target}"}}'
    assert f"{counted} {spills:.1f}" in metrics


@pytest.mark.parametrize(
    ("second", "budget", "served"),
    [
        ("fallback-agent", "2000", {"classifier": 4, "reasoner": 4}),
        ("cloud", "2000", {"classifier": 1, "openai": 7}),
        ("fallback-agent", None, {"classifier": 8}),  # no budget: local first, no spill
        ("replica", None, {"classifier": 4, "classifier-2": 4}),  # equals are balanced
    ],
)
async def test_a_burst_spreads_before_the_local_agents_wait_is_known(
    start_router, registry_http, upstreams, monkeypatch, second, budget, served
):
    """8 concurrent callers against a local agent never measured (its heartbeat: one slot,
    idle, no service time; start_all's classifier before its first call). It takes the
    first call; with a budget the others do not queue behind that call of unknown length:
    they go where the wait is known within the budget, else spread over the unknown ones
    by the calls open (a spill, of unknown wait)."""
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test-123")
    arrivals: asyncio.Queue = asyncio.Queue()  # every call, as it reaches whoever serves it
    idle = {"in_flight": 0, "queued": 0, "parallel": 1, "expected_wait_ms": 0.0}
    held: list[Upstream] = []
    local = [("classifier", "classification")]
    if second == "fallback-agent":
        local.append(("reasoner", "reasoning"))
    elif second == "replica":
        local.append(("classifier-2", "classification"))
    for agent_id, capability in local:
        upstream, url = await upstreams()
        upstream.mode, upstream.arrivals = "hold", arrivals
        held.append(upstream)
        await register(registry_http, agent_id, url, capability)
        await heartbeat(registry_http, agent_id, **idle)
    providers = {"openai": OPENAI_PROVIDER} if second == "cloud" else {}
    router = await start_router(clock=FakeClock(0.0), providers=providers)
    headers = {"X-Max-Wait-Ms": budget} if budget else {}
    decision = await router.post("/route", json={"capability": "classification"}, headers=headers)
    assert decision.json()["agent_id"] == "classifier"  # unknown and idle: local first

    def cloud_answer(request: httpx.Request) -> httpx.Response:
        arrivals.put_nowait("openai")
        return httpx.Response(200, json=data("openai/chat_completion.json"))

    burst = CHAT | {"model": "capability:classification"}
    with respx.mock(assert_all_called=False) as cloud:
        cloud.post("https://api.openai.com/v1/chat/completions").mock(side_effect=cloud_answer)
        calls = [
            asyncio.create_task(
                router.post(
                    "/v1/chat/completions",
                    json=burst,
                    headers=headers | {"X-Request-ID": f"burst-{n}"},
                )
            )
            for n in range(8)
        ]
        for _ in calls:  # every call routed before any ends: nothing was measured
            await asyncio.wait_for(arrivals.get(), 5)
        for upstream in held:
            upstream.release.set()
        answers = await asyncio.gather(*calls)
    assert [answer.status_code for answer in answers] == [200] * 8
    names = [answer.headers["X-Routed-To"] for answer in answers]
    assert {name: names.count(name) for name in set(names)} == served
    assert len(held[0].calls) == served["classifier"]
    spills = 8 - served["classifier"] if budget else 0
    routing = router.app.state.router
    await routing.usage.flush()
    summary = (await router.get("/api/usage/summary", params={"window": "15m"})).json()
    assert (summary["routed"], summary["spills"], summary["fallbacks"]) == (8, spills, 0)
    records = [
        record
        for n in range(8)
        for record in (await router.get(f"/api/usage/requests/burst-{n}")).json()["records"]
        if record["kind"] == "route"
    ]
    spilled = [record for record in records if record.get("reason") == "spill"]
    assert len(spilled) == spills
    assert all(record.get("spill_wait_ms") is None for record in spilled)  # unknown
    if spills:
        to = "reasoner" if second == "fallback-agent" else "openai"
        counted = f'router_spills_total{{capability="classification",from="classifier",to="{to}"}}'
        assert f"{counted} {spills:.1f}" in (await router.get("/metrics")).text


def test_a_usage_table_made_before_spills_gets_their_columns_and_keeps_its_rows(database_url):
    engine = create_db_engine(database_url)
    old = MetaData()
    Table(
        "usage",
        old,
        *(
            Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable, unique=c.unique)
            for c in T.columns
            if c.name not in ("reason", "spill_wait_ms")
        ),
    )
    old.create_all(engine)
    try:
        before = UsageRecord.model_validate(call_record(1, "llm_a", "local", 10, 5, 100.0))
        row = before.model_dump(exclude={"reason", "spill_wait_ms"})
        with engine.begin() as conn:
            conn.execute(old.tables["usage"].insert(), [row | {"time": before.time.timestamp()}])
        store = UsageStore(engine, clock=FakeClock(NOW.timestamp()), reference_price_per_1k=0.0)
        names = {column["name"] for column in inspect(engine).get_columns("usage")}
        assert {"reason", "spill_wait_ms"} <= names
        assert store.for_request("req-1") == [before]  # the row is still there, unchanged
        spilled = before.model_copy(
            update={
                "record_id": "route-2",
                "kind": "route",
                "reason": "spill",
                "spill_wait_ms": 9.5,
            }
        )
        assert store.add([spilled]) == 1
        assert store.summary(3_600).spills == 1
        with engine.begin() as conn:
            assert add_missing_columns(conn, T) == []  # a second start adds nothing
    finally:
        METADATA.drop_all(engine)
        engine.dispose()
