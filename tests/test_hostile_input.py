"""Hostile input, route by route (issue 13): every daemon answers each kind of bad value, in
every place of a valid body, with a 4xx in its error envelope, never a 5xx.

Each valid body (from ``tests/data``) is sent once per place in it (every value, at any
depth, and the body itself) and per hostile value: integers past 64 bits, non-finite
floats, nesting deep within the size limit, non-ASCII and broken base64, dates far ahead
and far back, lone surrogates, NUL, wrong types. The property-based run of every published
schema is ``test_fuzz.py``; this sweep holds the classes of input that broke things once.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from services.common.strict_json import parse_json
from services.modelhost.app import create_app as create_modelhost_app
from services.modelhost.settings import ModelHostSettings
from tests.conftest import (
    SMOLLM,
    call_record,
    load_data,
    read,
    recorded_answer,
    replaced,
    tlc_settings,
)

pytestmark = pytest.mark.anyio

DEEP = 400  # levels: about 800 bytes, far inside every body limit
HOSTILE: list[Any] = [
    2**64,
    -(2**63) - 1,
    10**400,
    float("nan"),
    float("inf"),
    -float("inf"),
    1e308,
    -1,
    0,
    "",
    "é" * 3,
    "\ud800",  # a lone surrogate: valid JSON, no UTF-8 encoding
    "a\x00b",
    "x" * 100_000,
    "data:image/png;base64,é",  # issue 13: its binascii error was a 500
    "!!!not base64!!!",
    "9999-12-31T23:59:59Z",
    "0001-01-01T00:00:00Z",
    True,
    None,
    [],
    {},
    json.loads("[" * DEEP + "]" * DEEP),
    json.loads('{"a":' * DEEP + "1" + "}" * DEEP),
]
IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,é"}}

Send = Callable[[str, str, bytes], Awaitable[httpx.Response]]


def places(value: Any, at: tuple = ()) -> Iterator[tuple]:
    """The path of every value in a JSON document, the document itself first."""
    yield at
    if isinstance(value, dict):
        for key, item in value.items():
            yield from places(item, (*at, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from places(item, (*at, index))


def encode(document: Any) -> bytes:
    # NaN and Infinity as Python writes them, and lone surrogates escaped: what arrives
    # is valid JSON to Python's parser, or close enough that the server must say why not.
    return json.dumps(document, allow_nan=True).encode()


async def sweep(send: Send, method: str, path: str, valid: Any) -> list[str]:
    """Every hostile variant of ``valid``; the ones answered with a 5xx or no envelope."""
    problems = []
    for at in places(valid):
        for value in HOSTILE:
            body = encode(replaced(valid, at, value))
            where = f"{method} {path} {'.'.join(map(str, at)) or '<body>'}={ascii(value)[:40]}"
            try:
                response = await send(method, path, body)
            except Exception as exc:  # in-process, an app's exception reaches the caller
                problems.append(f"{where}: raised {exc!r}"[:300])
                continue
            if response.status_code >= 500:
                problems.append(f"{where}: {response.status_code} {response.text[:200]}")
            elif response.status_code >= 400 and "error" not in response.json():
                problems.append(f"{where}: {response.status_code} without the error envelope")
    return problems


def sender(client: httpx.AsyncClient) -> Send:
    async def send(method: str, path: str, body: bytes) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        return await client.request(method, path, content=body, headers=headers)

    return send


def in_process(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app.test")


# --- what a body may hold -------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"NaN", b"[Infinity]", b"[-Infinity]", b"[1e400]", b"[" + b"9" * 309 + b"]", b'["\\ud800"]'],
)
def test_a_body_json_cannot_carry_is_not_json(body):
    with pytest.raises(json.JSONDecodeError):
        parse_json(body)


@pytest.mark.parametrize(
    ("body", "value"),
    [
        (b'["\\ud83d\\ude00"]', ["\U0001f600"]),  # a surrogate pair is a character
        (b'["\\\\ud800"]', ["\\ud800"]),  # an escaped backslash, then text
        (b"[1.5e308, -2e-308]", [1.5e308, -2e-308]),
        (b"[" + b"9" * 308 + b"]", [int("9" * 308)]),
    ],
)
def test_a_body_within_json_is_parsed_as_python_would(body, value):
    assert parse_json(body) == value


# --- the registry ----------------------------------------------------------------------------


async def test_the_registry_answers_hostile_input_with_4xx(registry_http, agent):
    (await registry_http.post("/register", json=agent)).raise_for_status()
    send = sender(registry_http)
    problems = await sweep(send, "POST", "/register", load_data("spec/register.request.json"))
    heartbeat = {"status": "passing", "output": "ok", "in_flight": 1, "latency_ms": 2.5}
    problems += await sweep(send, "POST", f"/heartbeat/{agent['agent_id']}", heartbeat)
    discover = {"capability": "reasoning", "include_unhealthy": False}
    problems += await sweep(send, "POST", "/discover", discover)
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("agent_id", ["é" * 5, "x" * 10_000, "%00", "..", "a b", "%ED%A0%80"])
async def test_a_hostile_agent_id_in_the_path_is_a_4xx(registry_http, agent_id):
    for method, path in (
        ("GET", "/agents/{}"),
        ("DELETE", "/agents/{}"),
        ("POST", "/heartbeat/{}"),
    ):
        response = await registry_http.request(method, path.format(agent_id))
        assert 400 <= response.status_code < 500, (method, response.text[:200])


# --- the router ------------------------------------------------------------------------------


async def test_the_router_answers_hostile_input_with_4xx(start_router):
    router = await start_router()
    send = sender(router)
    problems = await sweep(send, "POST", "/route", {"capability": "reasoning"})
    problems += await sweep(
        send, "POST", "/v1/chat/completions", load_data("openai/chat_request_full.json")
    )
    record = call_record(1, "llm_a", "local", 10, 5, 1.0)
    problems += await sweep(send, "POST", "/usage", {"records": [record]})
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/api/usage/summary", {"window": "1e400d"}),
        ("/api/usage/summary", {"window": "9" * 400}),
        ("/api/usage/by-agent", {"window": "é"}),
        ("/api/usage/by-agent", {"window": "nan"}),
        ("/api/usage/timeseries", {"window": "inf"}),
        ("/api/usage/timeseries", {"window": "1h", "buckets": str(2**64)}),
        ("/api/usage/timeseries", {"window": "1h", "buckets": "-1"}),
    ],
)
async def test_a_hostile_usage_query_is_a_4xx(start_router, path, query):
    router = await start_router()
    response = await router.get(path, params=query)
    assert 400 <= response.status_code < 500, response.text[:200]
    assert "error" in response.json()


# --- a wrapper, on a backend that answers everything ------------------------------------------


def answering(backend) -> None:
    # A chat answer in the JSON format the OpenAI request asks (the wrapper checks it).
    chat = replaced(read("chat_response.json"), ("message", "content"), '{"objects": []}')
    backend.post("/api/chat").respond(json=chat)
    backend.post("/api/generate").respond(json=read("generate_response.json"))


async def test_a_wrapper_answers_hostile_input_with_4xx(start_wrapper, backend):
    answering(backend)
    wrapper = await start_wrapper()
    async with in_process(wrapper.app) as client:
        send = sender(client)
        chat = load_data("ollama/chat_request.json")
        chat["messages"][0]["images"] = [read("generate_request_full.json")["images"][0]]
        openai_chat = load_data("openai/chat_request_full.json")
        openai_chat["messages"][1]["content"].append(IMAGE_PART)
        openai_chat["stream"] = False
        problems = await sweep(send, "POST", "/api/chat", chat | {"stream": False})
        # Without its format: the fake backend ignores formats, and the wrapper answers one
        # it ignored with a 502 (the host's sweep below builds grammars from hostile ones).
        generate = load_data("ollama/generate_request_full.json")
        del generate["format"]
        problems += await sweep(send, "POST", "/api/generate", generate)
        problems += await sweep(
            send, "POST", "/v1/chat/completions", openai_chat | {"stream": False}
        )
        problems += await sweep(send, "POST", "/api/show", load_data("ollama/show_request.json"))
    assert problems == [], "\n".join(problems)


async def test_the_tlc_wrapper_answers_hostile_input_with_4xx(start_wrapper, backend):
    backend.post("/api/generate").mock(side_effect=recorded_answer)
    tlc = await start_wrapper(tlc_settings())
    async with in_process(tlc.app) as client:
        send = sender(client)
        problems = await sweep(
            send, "POST", "/classify_domain", load_data("spec/classify_domain.request.json")
        )
        problems += await sweep(
            send, "POST", "/extract_tmd", load_data("spec/extract_tmd.request.json")
        )
        problems += await sweep(send, "POST", "/validate_domain", {"domain": "medicine"})
    assert problems == [], "\n".join(problems)


# --- the embedded model host, on a real model ------------------------------------------------


async def test_the_model_host_answers_hostile_input_with_4xx(engine, tmp_path):
    settings = ModelHostSettings(model=SMOLLM, models_dir=tmp_path)
    app = create_modelhost_app(settings, engine=engine)
    # One token a call: what survives the checks is decoded, and must decode fast.
    options = {"num_predict": 1, "temperature": 0.5, "top_k": 20, "seed": 7}
    generate = {"model": SMOLLM, "prompt": "Hi", "options": options, "stream": False}
    chat = {
        "model": SMOLLM,
        "messages": [{"role": "user", "content": "Hi"}],
        "options": options,
        "format": {"type": "object"},
        "stream": False,
    }
    async with app.router.lifespan_context(app), in_process(app) as client:
        send = sender(client)
        problems = await sweep(send, "POST", "/api/generate", generate)
        problems += await sweep(send, "POST", "/api/chat", chat)
        problems += await sweep(send, "POST", "/api/show", {"model": SMOLLM})
    assert problems == [], "\n".join(problems)
