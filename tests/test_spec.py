"""The original specification's own bodies, copied verbatim into tests/data/spec/.

A client written against the specification sends these requests unchanged and reads the
fields its response examples show. So every request is accepted as is, and every answer
carries each field of its example with the same JSON type (values differ; extra fields are
fine; a null in an example stands for a figure not measured yet: null or a number).
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import pytest

from schemas.config import load_settings
from services.wrapper.registration import agent_definition
from services.wrapper.settings import WrapperSettings
from tests.conftest import DATA, MODEL, REPO, make_settings, read, sent_json, streamed
from tests.test_tmd import recorded_answer, tlc_settings, tmd_lines

pytestmark = pytest.mark.anyio

SPEC = DATA / "spec"
OLLAMA_PROFILE = REPO / "config" / "swarm.ollama.yaml"


def spec(name: str) -> Any:
    return json.loads((SPEC / name).read_text())


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: a bool is an int to Python, not to JSON
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def shape_differences(example: Any, answer: Any, where: str = "") -> list[str]:
    """Where ``answer`` lacks a field of ``example`` or holds one with another JSON type."""
    expected, got = json_type(example), json_type(answer)
    if expected == "null":
        return [] if got in ("null", "number") else [f"{where}: null or a number, got {got}"]
    if expected != got:
        return [f"{where}: {expected} expected, got {got}"]
    found = []
    if expected == "object":
        for key, value in example.items():
            if key in answer:
                found += shape_differences(value, answer[key], f"{where}.{key}")
            else:
                found.append(f"{where}.{key}: missing")
    elif expected == "array" and example:
        if not answer:
            found.append(f"{where}: empty, the example has items")
        for index, item in enumerate(answer):
            found += shape_differences(example[0], item, f"{where}[{index}]")
    return found


def test_the_shape_check_finds_missing_and_retyped_fields():
    example = {"a": 1, "b": {"c": "x"}, "d": [{"e": True}], "f": None}
    assert shape_differences(example, {**example, "a": 2.5, "extra": 0, "f": 3}) == []
    answer = {"a": "1", "b": {}, "d": [{"e": 1}], "f": "soon"}
    assert shape_differences(example, answer) == [
        ".a: number expected, got string",
        ".b.c: missing",
        ".d[0].e: boolean expected, got number",
        ".f: null or a number, got string",
    ]


# --- the registry --------------------------------------------------------------------------


def test_the_registration_of_the_spec_is_stored_as_sent(registry):
    body = spec("register.request.json")
    response = registry.post("/register", json=body)
    assert response.status_code == 200, response.text
    record = response.json()
    assert {key: record[key] for key in body} == body  # tier 2 and transport "rest" included
    assert record["locality"] == "local"


# --- a wrapper (the spec's clients name llama3.1:8b whatever the wrapper serves) ----------------


@pytest.fixture(params=["reasoner", "tlc_domain_classifier"])
async def any_wrapper(request, start_wrapper):
    """Every wrapper takes the spec's bodies, the TLC's (16 tokens at most) included."""
    return await start_wrapper(make_settings() if request.param == "reasoner" else tlc_settings())


async def test_chat_completions_of_the_spec(any_wrapper, backend):
    # A completion-style wrapper (the TLC) serves chat through /api/generate.
    routes = [
        backend.post("/api/chat").respond(json=read("chat_response.json")),
        backend.post("/api/generate").respond(json=read("generate_response.json")),
    ]
    response = await any_wrapper.http.post(
        "/chat/completions", json=spec("chat_completions.request.json")
    )
    assert response.status_code == 200, response.text
    assert shape_differences(spec("chat_completions.response.json"), response.json()) == []
    (route,) = [route for route in routes if route.called]
    sent = sent_json(route)
    assert sent["model"] == MODEL  # served by the wrapper's own model
    assert sent["options"]["num_predict"] == min(500, any_wrapper.settings.max_tokens_limit)


async def test_generate_of_the_spec(any_wrapper, backend):
    route = backend.post("/api/generate").respond(json=read("generate_response.json"))
    response = await any_wrapper.http.post("/generate", json=spec("generate.request.json"))
    assert response.status_code == 200, response.text
    assert shape_differences(spec("generate.response.json"), response.json()) == []
    assert sent_json(route)["model"] == MODEL
    limit = any_wrapper.settings.max_tokens_limit
    assert sent_json(route)["options"]["num_predict"] == min(500, limit)


async def test_health_of_the_spec(wrapper, backend):
    response = await wrapper.http.get("/health")
    assert response.status_code == 200
    assert shape_differences(spec("health.response.json"), response.json()) == []


async def test_info_of_the_spec_after_a_call(wrapper, backend):
    def answer(_):
        wrapper.clock.advance(2.0)  # the call takes time: its throughput is measured
        return httpx.Response(200, json=read("chat_response.json"))

    backend.post("/api/chat").mock(side_effect=answer)
    await wrapper.http.post("/chat/completions", json=spec("chat_completions.request.json"))
    response = await wrapper.http.get("/info")
    assert response.status_code == 200
    assert shape_differences(spec("info.response.json"), response.json()) == []


# --- the TLC classifier (its backend answers as the recorded embedded classifier did) ------


@pytest.fixture
async def tlc(start_wrapper):
    return await start_wrapper(tlc_settings())


async def test_classify_domain_of_the_spec(tlc, backend):
    backend.post("/api/generate").mock(
        side_effect=lambda _: streamed(tmd_lines("generate_stream_domain.ndjson"))
    )
    response = await tlc.http.post("/classify_domain", json=spec("classify_domain.request.json"))
    assert response.status_code == 200, response.text
    assert shape_differences(spec("classify_domain.response.json"), response.json()) == []


async def test_extract_tmd_of_the_spec(tlc, backend):
    backend.post("/api/generate").mock(side_effect=recorded_answer)
    response = await tlc.http.post("/extract_tmd", json=spec("extract_tmd.request.json"))
    assert response.status_code == 200, response.text
    assert shape_differences(spec("extract_tmd.response.json"), response.json()) == []


# --- the router: the spec's capability map -------------------------------------------------

# The spec names the TLC service's model "tlc_classifier"; its agent registers the model it
# runs on, as every wrapper does.
REGISTERED_MODEL = {"tlc_classifier": "tinyllama:1.1b"}


@pytest.fixture
def ollama_profile(monkeypatch):
    """The Ollama profile, its daemons reached at localhost as in the spec's map; no
    provider keyed."""
    for name in [n for n in os.environ if n.startswith("SWARM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SWARM_HOST", "localhost")
    profile = load_settings(OLLAMA_PROFILE)
    for provider in profile.providers.values():
        monkeypatch.delenv(provider.api_key_env, raising=False)
    return profile


async def register_profile_agents(profile, registry_http) -> None:
    for name in profile.wrappers:
        settings = WrapperSettings.from_swarm(profile, name)
        definition = agent_definition(settings, facts=None, context_length=None)
        response = await registry_http.post("/register", json=definition.model_dump(mode="json"))
        assert response.status_code == 200, response.text


async def route(router, capability: str) -> list[dict]:
    response = await router.post("/route", json={"capability": capability, "prefer_local": True})
    assert response.status_code == 200, response.text
    decision = response.json()
    return [decision, *decision["fallbacks"]]


async def test_route_chooses_as_the_capability_map_of_the_spec(
    ollama_profile, registry_http, start_router, monkeypatch
):
    for provider in ollama_profile.providers.values():
        monkeypatch.setenv(provider.api_key_env, "sk-test")
    await register_profile_agents(ollama_profile, registry_http)
    # The router fixture's capability fallback is the profile's: classification to reasoning.
    assert ollama_profile.router.capability_fallbacks["classification"] == ["reasoning"]
    router = await start_router(providers=ollama_profile.providers)
    for capability, expected in spec("route.candidates.json").items():
        chosen = await route(router, capability)
        wanted = [
            entry | {"model": REGISTERED_MODEL.get(entry["model"], entry["model"])}
            for entry in expected
        ]
        first, after = chosen[: len(wanted)], chosen[len(wanted) :]
        pairs = zip(first, wanted, strict=True)
        assert [{key: c[key] for key in entry} for c, entry in pairs] == wanted, capability
        # What the map does not list may follow: keyed cloud providers, never a local agent.
        assert all(c["provider"] != "local" for c in after), (capability, after)


async def test_without_keys_the_map_is_local_only(ollama_profile, registry_http, start_router):
    await register_profile_agents(ollama_profile, registry_http)
    router = await start_router(providers=ollama_profile.providers)
    assert {c["provider"] for c in await route(router, "reasoning")} == {"local"}
