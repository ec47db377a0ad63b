"""Cloud providers behind the router: keyed OpenAI-compatible APIs passed through, and
Anthropic's Messages API translated both ways (respx at the providers' documented shapes)."""

from __future__ import annotations

import json

import httpx
import pytest
import respx
from openai import AsyncOpenAI, BadRequestError

from router.anthropic import answers_in_json, anthropic_request, openai_completion
from schemas.config import ProviderConfig
from tests.conftest import DATA, OPENAI_PROVIDER, data

pytestmark = pytest.mark.anyio

CHAT = {"model": "capability:reasoning", "messages": [{"role": "user", "content": "Hi"}]}
ANTHROPIC = ProviderConfig(
    kind="anthropic",
    base_url="https://api.anthropic.com",
    api_key_env="TEST_ANTHROPIC_KEY",
    models={"reasoning": "claude-3-5-haiku-latest"},
    price_per_1k_input=0.8,
    price_per_1k_output=4.0,
)


async def test_a_keyed_openai_compatible_provider_serves_and_is_priced(start_router, monkeypatch):
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test-123")
    router = await start_router(providers={"openai": OPENAI_PROVIDER})
    with respx.mock(assert_all_called=True) as cloud:
        route = cloud.post("https://api.openai.com/v1/chat/completions").respond(
            json=data("openai/chat_completion.json")
        )
        answer = await router.post("/v1/chat/completions", json=CHAT | {"max_tokens": 30})
    assert answer.status_code == 200
    assert answer.json() == data("openai/chat_completion.json")
    assert answer.headers["X-Routed-To"] == "openai"
    sent = route.calls.last.request
    assert sent.headers["Authorization"] == "Bearer sk-test-123"
    assert json.loads(sent.content)["model"] == "gpt-4o-mini"
    await router.app.state.router.usage.flush()
    summary = (await router.get("/api/usage/summary", params={"window": "1h"})).json()
    usage = data("openai/chat_completion.json")["usage"]
    assert (summary["cloud_calls"], summary["local_calls"]) == (1, 0)
    expected = usage["prompt_tokens"] / 1000 * 0.15 + usage["completion_tokens"] / 1000 * 0.6
    assert summary["cost"] == pytest.approx(expected)


async def test_a_provider_without_its_key_is_never_called(start_router, monkeypatch):
    monkeypatch.delenv("TEST_OPENAI_KEY", raising=False)
    router = await start_router(providers={"openai": OPENAI_PROVIDER})
    with respx.mock(assert_all_called=False) as cloud:
        route = cloud.post("https://api.openai.com/v1/chat/completions")
        answer = await router.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 404  # nothing serves reasoning without the key
    assert not route.called


class BrokenStream(httpx.AsyncByteStream):
    """A provider's stream that breaks before its first chunk; it records being closed."""

    def __init__(self) -> None:
        self.closed = False

    async def __aiter__(self):
        raise httpx.ReadError("connection reset by peer")
        yield b""  # an async generator

    async def aclose(self) -> None:
        self.closed = True


async def test_a_provider_stream_broken_before_its_first_chunk_is_closed(start_router, monkeypatch):
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test-123")
    router = await start_router(providers={"openai": OPENAI_PROVIDER})
    broken = BrokenStream()
    with respx.mock(assert_all_called=True) as cloud:
        cloud.post("https://api.openai.com/v1/chat/completions").respond(
            stream=broken, headers={"Content-Type": "text/event-stream"}
        )
        failed = await router.post("/v1/chat/completions", json=CHAT | {"stream": True})
    assert failed.status_code == 503
    assert "ReadError" in failed.json()["error"]["message"]
    assert broken.closed  # its connection is not left open


async def test_anthropic_is_translated_both_ways(start_router, monkeypatch):
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-ant-test")
    router = await start_router(providers={"anthropic": ANTHROPIC})
    request = CHAT | {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "stop": "END",
        "temperature": 0.2,
    }
    with respx.mock(assert_all_called=True) as cloud:
        route = cloud.post("https://api.anthropic.com/v1/messages").respond(
            json=data("anthropic/messages_response.json")
        )
        answer = await router.post("/v1/chat/completions", json=request)
    sent = route.calls.last.request
    assert sent.headers["x-api-key"] == "sk-ant-test"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert json.loads(sent.content) == {
        "model": "claude-3-5-haiku-latest",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1024,
        "system": "Be brief.",
        "temperature": 0.2,
        "stop_sequences": ["END"],
    }
    completion = answer.json()
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hi! My name is Claude.",
    }
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"] == {
        "prompt_tokens": 2095,
        "completion_tokens": 503,
        "total_tokens": 2598,
    }


async def test_an_anthropic_stream_becomes_openai_chunks_with_usage(start_router, monkeypatch):
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-ant-test")
    router = await start_router(providers={"anthropic": ANTHROPIC})
    events = (DATA / "anthropic" / "messages_stream.txt").read_bytes()
    with respx.mock(assert_all_called=True) as cloud:
        cloud.post("https://api.anthropic.com/v1/messages").respond(
            content=events, headers={"Content-Type": "text/event-stream"}
        )
        answer = await router.post("/v1/chat/completions", json=CHAT | {"stream": True})
    lines = [line for line in answer.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello!"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"  # max_tokens
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 25, "completion_tokens": 15, "total_tokens": 40}
    await router.app.state.router.usage.flush()
    summary = (await router.get("/api/usage/summary", params={"window": "1h"})).json()
    assert (summary["prompt_tokens"], summary["completion_tokens"]) == (25, 15)
    assert summary["cost"] == pytest.approx(25 / 1000 * 0.8 + 15 / 1000 * 4.0)
    metrics = (await router.get("/metrics")).text
    assert 'router_cloud_tokens_total{direction="output",provider="anthropic"} 15.0' in metrics
    assert 'router_time_to_first_token_seconds_count{capability="reasoning",' in metrics
    assert "router_active_requests 0.0" in metrics


# --- Anthropic: tools and JSON output (respx at Anthropic's documented shapes) -------------

MESSAGES = "https://api.anthropic.com/v1/messages"
WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "The city and state"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": WEATHER,
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time now."}},
]
ANTHROPIC_TOOLS = [
    {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "input_schema": WEATHER,
    },
    {
        "name": "get_time",
        "description": "The time now.",
        "input_schema": {"type": "object", "properties": {}},
    },
]
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "population": {"type": "integer"},
        "landmarks": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["city", "population", "landmarks"],
}
ASK = [{"role": "user", "content": "The weather in San Francisco and Paris, and the time?"}]


async def anthropic_router(start_router, monkeypatch) -> httpx.AsyncClient:
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-ant-test")
    return await start_router(providers={"anthropic": ANTHROPIC})


def caller(router: httpx.AsyncClient) -> AsyncOpenAI:
    """The official client, calling the in-process router."""
    return AsyncOpenAI(
        base_url="http://router.test/v1", api_key="unused", http_client=router, max_retries=0
    )


def sent(route: respx.Route) -> dict:
    return json.loads(route.calls.last.request.content)


def tool_uses(message: dict) -> list[tuple[str, str, dict]]:
    return [(b["id"], b["name"], b["input"]) for b in message["content"] if b["type"] == "tool_use"]


def streamed(name: str) -> dict:
    """What an Anthropic stream fixture says when read whole: its text, and each tool_use
    block's id, name and input (its partial_json pieces joined)."""
    text, calls = "", {}
    for line in (DATA / "anthropic" / name).read_text().splitlines():
        if not line.startswith("data: "):
            continue
        event = json.loads(line[6:])
        if event["type"] == "content_block_start" and event["content_block"]["type"] == "tool_use":
            block = event["content_block"]
            calls[event["index"]] = [block["id"], block["name"], ""]
        elif event["type"] == "content_block_delta" and event["delta"]["type"] == "text_delta":
            text += event["delta"]["text"]
        elif event["type"] == "content_block_delta":
            calls[event["index"]][2] += event["delta"]["partial_json"]
    inputs = [(i, n, json.loads(j or "{}")) for i, n, j in calls.values()]
    return {"text": text, "calls": inputs}


async def test_tools_go_to_anthropic_as_its_tools_and_tool_use_comes_back_as_tool_calls(
    start_router, monkeypatch
):
    router = await anthropic_router(start_router, monkeypatch)
    answer = data("anthropic/messages_tool_use.json")
    with respx.mock(assert_all_called=True) as cloud:
        route = cloud.post(MESSAGES).respond(json=answer)
        completion = await caller(router).chat.completions.create(
            model="capability:reasoning", messages=ASK, tools=TOOLS, tool_choice="auto"
        )
    assert sent(route) == {
        "model": "claude-3-5-haiku-latest",
        "messages": ASK,
        "max_tokens": 1024,
        "tools": ANTHROPIC_TOOLS,
        "tool_choice": {"type": "auto"},
    }
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == answer["content"][0]["text"]  # the text beside the calls
    calls = choice.message.tool_calls
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == (
        tool_uses(answer)
    )
    assert {c.type for c in calls} == {"function"}
    assert calls[2].function.arguments == "{}"  # an empty input, as OpenAI gives no arguments
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (472, 131)


async def test_a_tool_round_trip_goes_to_anthropic_as_tool_use_and_merged_tool_results(
    start_router, monkeypatch
):
    router = await anthropic_router(start_router, monkeypatch)
    calls = [
        {
            "id": "toolu_01A09q90qw90lq917835lq9",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location": "San Francisco, CA"}'},
        },
        {
            "id": "toolu_01CjYj7q4wE9HHmNZzSsh3bF",
            "type": "function",
            "function": {"name": "get_time", "arguments": "{}"},
        },
    ]
    messages = [
        {"role": "system", "content": "Use the tools."},
        *ASK,
        {"role": "assistant", "content": "Let me look.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "15 degrees, fog"},
        {
            "role": "tool",
            "tool_call_id": calls[1]["id"],
            "content": [{"type": "text", "text": "9:41"}],
        },
        {"role": "user", "content": "In one line, please."},
    ]
    with respx.mock(assert_all_called=True) as cloud:
        route = cloud.post(MESSAGES).respond(json=data("anthropic/messages_response.json"))
        completion = await caller(router).chat.completions.create(
            model="capability:reasoning", messages=messages, tools=TOOLS
        )
    assert sent(route)["system"] == "Use the tools."
    assert sent(route)["messages"] == [
        *ASK,
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {
                    "type": "tool_use",
                    "id": calls[0]["id"],
                    "name": "get_weather",
                    "input": {"location": "San Francisco, CA"},
                },
                {"type": "tool_use", "id": calls[1]["id"], "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",  # the tool results and the user's next words: one user turn
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": calls[0]["id"],
                    "content": "15 degrees, fog",
                },
                {"type": "tool_result", "tool_use_id": calls[1]["id"], "content": "9:41"},
                {"type": "text", "text": "In one line, please."},
            ],
        },
    ]
    assert "tool_choice" not in sent(route)  # OpenAI's default and Anthropic's: auto
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.tool_calls is None


async def test_tool_call_arguments_that_are_not_an_object_are_the_callers_400(
    start_router, monkeypatch
):
    router = await anthropic_router(start_router, monkeypatch)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "[1"}}
    messages = [*ASK, {"role": "assistant", "tool_calls": [call]}]
    with respx.mock(assert_all_called=False) as cloud:
        route = cloud.post(MESSAGES)
        refused = await router.post("/v1/chat/completions", json=CHAT | {"messages": messages})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_tool_arguments"
    assert "call_1" in refused.json()["error"]["message"]
    assert not route.called


NAMED = {"type": "function", "function": {"name": "get_time"}}


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        (NAMED, None, {"type": "tool", "name": "get_time"}),
        (None, None, None),
        ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (NAMED, False, {"type": "tool", "name": "get_time", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),  # Anthropic's none takes no parallel flag
        ("auto", True, {"type": "auto"}),
    ],
)
def test_tool_choice_is_anthropics(tool_choice, parallel, expected):
    body = {"model": "claude", "messages": ASK, "tools": TOOLS}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert anthropic_request(body).get("tool_choice") == expected
    assert "tool_choice" not in anthropic_request(body | {"tools": []})  # nothing to choose


async def test_a_streamed_tool_use_becomes_openai_tool_call_deltas(start_router, monkeypatch):
    router = await anthropic_router(start_router, monkeypatch)
    events = (DATA / "anthropic" / "messages_stream_tool_use.txt").read_bytes()
    with respx.mock(assert_all_called=True) as cloud:
        route = cloud.post(MESSAGES).respond(
            content=events, headers={"Content-Type": "text/event-stream"}
        )
        stream = await caller(router).chat.completions.create(
            model="capability:reasoning",
            messages=ASK,
            tools=TOOLS,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert sent(route)["stream"] is True
    assert sent(route)["tools"] == ANTHROPIC_TOOLS
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    text = "".join(d.content or "" for d in deltas)
    pieces = [call for d in deltas for call in d.tool_calls or []]
    calls: dict[int, list] = {}
    for piece in pieces:
        if piece.index not in calls:  # OpenAI's first delta of a call: id, type, name, ""
            assert (piece.type, piece.function.arguments) == ("function", "")
            calls[piece.index] = [piece.id, piece.function.name, ""]
        else:  # then pieces of the arguments only
            assert (piece.id, piece.type, piece.function.name) == (None, None, None)
            calls[piece.index][2] += piece.function.arguments
    assert sorted(calls) == [0, 1]
    expected = streamed("messages_stream_tool_use.txt")
    assert text == expected["text"]
    assert [(i, n, json.loads(a)) for i, n, a in calls.values()] == expected["calls"]
    assert calls[1][2] == "{}"  # get_time streamed an empty input: no piece, "{}" made
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (472, 89)


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}


@pytest.mark.parametrize(
    ("response_format", "input_schema"),
    [(SCHEMA_FORMAT, CITY), ({"type": "json_object"}, {"type": "object"})],
)
async def test_json_output_from_anthropic_is_a_forced_tools_input_as_the_content(
    start_router, monkeypatch, response_format, input_schema
):
    router = await anthropic_router(start_router, monkeypatch)
    answer = data("anthropic/messages_json_answer.json")
    with respx.mock(assert_all_called=True) as cloud:
        route = cloud.post(MESSAGES).respond(json=answer)
        completion = await caller(router).chat.completions.create(
            model="capability:reasoning",
            messages=[{"role": "user", "content": "Paris, as JSON."}],
            response_format=response_format,
        )
    [tool] = sent(route)["tools"]
    assert (tool["name"], tool["input_schema"]) == ("json_answer", input_schema)
    assert sent(route)["tool_choice"] == {
        "type": "tool",
        "name": "json_answer",
        "disable_parallel_tool_use": True,
    }
    choice = completion.choices[0]
    assert json.loads(choice.message.content) == tool_uses(answer)[0][2]
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"


async def test_streamed_json_output_from_anthropic_is_content_that_parses(
    start_router, monkeypatch
):
    router = await anthropic_router(start_router, monkeypatch)
    events = (DATA / "anthropic" / "messages_stream_json_answer.txt").read_bytes()
    with respx.mock(assert_all_called=True) as cloud:
        cloud.post(MESSAGES).respond(content=events, headers={"Content-Type": "text/event-stream"})
        stream = await caller(router).chat.completions.create(
            model="capability:reasoning",
            messages=[{"role": "user", "content": "Paris, as JSON."}],
            response_format=SCHEMA_FORMAT,
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    assert json.loads(content) == streamed("messages_stream_json_answer.txt")["calls"][0][2]
    assert not any(d.tool_calls for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_json_output_beside_the_callers_tools_lets_the_model_call_or_answer():
    body = {"model": "claude", "messages": ASK, "tools": TOOLS, "response_format": SCHEMA_FORMAT}
    beside = anthropic_request(body | {"tool_choice": "auto"})
    assert [t["name"] for t in beside["tools"]] == ["get_weather", "get_time", "json_answer"]
    assert beside["tool_choice"] == {"type": "any"}  # answering is calling json_answer
    assert answers_in_json(beside)
    forced = anthropic_request(body | {"tool_choice": "none"})
    assert forced["tool_choice"]["name"] == "json_answer"
    # under required or a named function the answer is a call: no JSON tool
    required = anthropic_request(body | {"tool_choice": "required"})
    assert required["tools"] == ANTHROPIC_TOOLS
    assert not answers_in_json(required)
    assert not answers_in_json(anthropic_request({"model": "claude", "messages": ASK}))


def test_a_json_answer_beside_a_tool_call_is_the_content_and_the_call_stays():
    message = data("anthropic/messages_tool_use.json")
    message["content"].append(data("anthropic/messages_json_answer.json")["content"][0])
    choice = openai_completion(message, json_answer=True).choices[0]
    assert json.loads(choice.message.content)["city"] == "Paris"
    assert [c.function.name for c in choice.message.tool_calls] == [
        "get_weather",
        "get_weather",
        "get_time",
    ]
    assert choice.finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "body",
    [
        b"<html>502 Bad Gateway</html>",
        b'"a string"',
        json.dumps({"id": "msg_1", "content": "not a list of blocks"}).encode(),
        json.dumps({"content": [{"type": "tool_use", "name": "get_time", "input": {}}]}).encode(),
        json.dumps(
            {"content": [{"type": "tool_use", "id": "t", "name": "get_time", "input": "{}"}]}
        ).encode(),
        json.dumps({"content": [], "usage": "many"}).encode(),
    ],
    ids=["html", "string", "content", "no-id", "input-string", "usage"],
)
async def test_a_malformed_anthropic_answer_is_an_error_envelope_never_a_500(
    start_router, monkeypatch, body
):
    router = await anthropic_router(start_router, monkeypatch)
    with respx.mock(assert_all_called=True) as cloud:
        cloud.post(MESSAGES).respond(
            200, content=body, headers={"Content-Type": "application/json"}
        )
        failed = await router.post("/v1/chat/completions", json=CHAT)
    assert failed.status_code == 503  # the provider failed; no other candidate could serve
    error = failed.json()["error"]
    assert error["code"] == "no_candidate"
    assert "anthropic" in error["message"]
    assert "out of shape" in error["message"]
    metrics = (await router.get("/metrics")).text
    assert 'kind="malformed"' in metrics


@pytest.mark.parametrize("stream", [False, True])
async def test_a_malformed_openai_provider_answer_is_an_error_envelope_never_a_500(
    start_router, monkeypatch, stream
):
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test-123")
    router = await start_router(providers={"openai": OPENAI_PROVIDER})
    body = b'data: {"usage": [1, 2]}\n\n' if stream else b"[1, 2]"
    with respx.mock(assert_all_called=True) as cloud:
        cloud.post("https://api.openai.com/v1/chat/completions").respond(200, content=body)
        failed = await router.post("/v1/chat/completions", json=CHAT | {"stream": stream})
    assert failed.status_code == 503
    assert "out of shape" in failed.json()["error"]["message"]


async def test_a_malformed_anthropic_event_mid_stream_ends_it_with_an_error_event(
    start_router, monkeypatch
):
    router = await anthropic_router(start_router, monkeypatch)
    events = (DATA / "anthropic" / "messages_stream_tool_use.txt").read_text()
    broken = events.replace('"partial_json": " \\"San Fra"', '"partial_json": 7', 1)
    assert broken != events
    with respx.mock(assert_all_called=True) as cloud:
        cloud.post(MESSAGES).respond(content=broken, headers={"Content-Type": "text/event-stream"})
        answer = await router.post("/v1/chat/completions", json=CHAT | {"stream": True})
    assert answer.status_code == 200  # the stream had begun
    events = [e for e in answer.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert "out of shape" in error["message"]
    assert error["code"] == "upstream_failed"


async def test_an_anthropic_stream_cut_before_its_message_stop_ends_with_an_error_event(
    start_router, monkeypatch
):
    router = await anthropic_router(start_router, monkeypatch)
    events = (DATA / "anthropic" / "messages_stream_tool_use.txt").read_text()
    cut = events[: events.index("event: message_delta")]
    with respx.mock(assert_all_called=True) as cloud:
        cloud.post(MESSAGES).respond(content=cut, headers={"Content-Type": "text/event-stream"})
        answer = await router.post("/v1/chat/completions", json=CHAT | {"stream": True})
    events = [e for e in answer.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert "message_stop" in json.loads(events[-2].removeprefix("data: "))["error"]["message"]
    assert '"finish_reason"' not in answer.text  # never told as a whole answer


async def test_an_anthropic_error_event_mid_stream_ends_it_with_an_error_event(
    start_router, monkeypatch
):
    router = await anthropic_router(start_router, monkeypatch)
    events = (DATA / "anthropic" / "messages_stream_tool_use.txt").read_text()
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    cut = events.index("event: content_block_start")
    events = events[:cut] + f"event: error\ndata: {json.dumps(overloaded)}\n\n"
    with respx.mock(assert_all_called=True) as cloud:
        cloud.post(MESSAGES).respond(content=events, headers={"Content-Type": "text/event-stream"})
        answer = await router.post("/v1/chat/completions", json=CHAT | {"stream": True})
    events = [e for e in answer.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert "Overloaded" in error["message"]


async def test_an_anthropic_refusal_is_the_routers_error_envelope(start_router, monkeypatch):
    router = await anthropic_router(start_router, monkeypatch)
    refusal = data("anthropic/error_invalid_request.json")
    with respx.mock(assert_all_called=True) as cloud:
        cloud.post(MESSAGES).respond(400, json=refusal)
        with pytest.raises(BadRequestError) as raised:
            await caller(router).chat.completions.create(model="capability:reasoning", messages=ASK)
    assert raised.value.status_code == 400
    error = raised.value.body
    assert error["message"] == refusal["error"]["message"]
    assert error["type"] == "invalid_request_error"
    assert error["request_id"] == raised.value.response.headers["X-Request-ID"]


# --- OpenAI-compatible providers: tools and JSON output passed through ---------------------


async def test_tools_and_json_output_pass_through_an_openai_provider_unchanged(
    start_router, monkeypatch
):
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test-123")
    router = await start_router(providers={"openai": OPENAI_PROVIDER})
    answer = data("openai/chat_completion_tool_calls.json")
    asked = {
        "tools": TOOLS,
        "tool_choice": NAMED,
        "parallel_tool_calls": False,
        "response_format": SCHEMA_FORMAT,
    }
    with respx.mock(assert_all_called=True) as cloud:
        route = cloud.post("https://api.openai.com/v1/chat/completions").respond(json=answer)
        completion = await caller(router).chat.completions.create(
            model="capability:reasoning", messages=ASK, **asked
        )
    assert sent(route) == {"model": "gpt-4o-mini", "messages": ASK, **asked}
    assert completion.model_dump(exclude_unset=True) == answer


async def test_streamed_tool_calls_pass_through_an_openai_provider_unchanged(
    start_router, monkeypatch
):
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test-123")
    router = await start_router(providers={"openai": OPENAI_PROVIDER})
    chunks = data("openai/chat_completion_stream_tool_calls.json")
    events = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    with respx.mock(assert_all_called=True) as cloud:
        route = cloud.post("https://api.openai.com/v1/chat/completions").respond(
            content=events, headers={"Content-Type": "text/event-stream"}
        )
        answer = await router.post(
            "/v1/chat/completions",
            json=CHAT | {"tools": TOOLS, "tool_choice": "required", "stream": True},
        )
    assert sent(route)["tools"] == TOOLS
    assert sent(route)["tool_choice"] == "required"
    relayed = [e.removeprefix("data: ") for e in answer.text.split("\n\n") if e]
    assert relayed[-1] == "[DONE]"
    assert [json.loads(e) for e in relayed[:-1]] == chunks
