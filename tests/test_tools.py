"""Tool calls and JSON output: the embedded host, the wrapper and the router.

Real SmolLM2-135M behind the real host, wrapper and router (processes), driven by the
official ``openai`` and ``ollama`` clients: what is asserted is the shape of an answer and
that its calls validate against the tools' schemas, never the words the model chose. The
Ollama edge we do not own is respx: Ollama's exact tool-call shapes, and an Ollama that
ignores ``format``.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from schemas import openai as openai_schema
from schemas.ollama import Message
from services.common.tool_calls import (
    Call,
    CallWatch,
    ToolSpec,
    call_schema,
    calls_text,
    parse_calls,
    tools_prompt,
)
from services.modelhost.app import create_app
from services.modelhost.settings import ModelHostSettings
from services.modelhost.tools import prompt_messages
from tests.conftest import (
    SMOLLM,
    make_settings,
    read,
    read_lines,
    reasoner_swarm,
    replaced,
    sent_json,
    streamed,
)
from tests.test_hostile_input import in_process, sender, sweep
from tests.test_wrapper_openai_backend import openai_settings

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city, e.g. Paris, FR"},
                "format": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location", "format"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
SPECS = [ToolSpec.of(openai_schema.Tool.model_validate(tool)) for tool in TOOLS]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris? Use celsius."}]
GREEDY = {"temperature": 0, "seed": 7, "max_tokens": 64}


def assert_valid_openai_calls(calls: list[Any], names: set[str] | None = None) -> None:
    names = set(SCHEMAS) if names is None else names
    assert calls
    for call in calls:
        assert call.type == "function"
        assert call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def assert_valid_ollama_calls(calls: list[Any] | None) -> None:
    for call in calls or ():
        assert call.function.name in SCHEMAS
        jsonschema.validate(dict(call.function.arguments), SCHEMAS[call.function.name])


def streamed_calls(chunks: list[Any]) -> tuple[list[dict], str | None, str]:
    """The calls of a stream's deltas put together by index, its finish and its text."""
    calls: dict[int, dict] = {}
    finish, text = None, ""
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        text += choice.delta.content or ""
        for piece in choice.delta.tool_calls or ():
            call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += piece.id or ""
            call["name"] += (piece.function and piece.function.name) or ""
            call["arguments"] += (piece.function and piece.function.arguments) or ""
    return [calls[index] for index in sorted(calls)], finish, text


# --- the real swarm -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    daemons = reasoner_swarm(tmp_path_factory.mktemp("tools"))
    yield daemons
    daemons.kill_all()


@pytest.fixture(scope="module")
def client(swarm) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{swarm.urls['reasoner']}/v1", api_key="x", max_retries=0)


@pytest.mark.process
def test_required_returns_calls_whose_arguments_validate(client):
    answer = client.chat.completions.create(
        model=SMOLLM, messages=ASK, tools=TOOLS, tool_choice="required", **GREEDY
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert_valid_openai_calls(choice.message.tool_calls)
    assert answer.usage.completion_tokens > 0


@pytest.mark.process
def test_required_streamed_gives_the_calls_in_deltas(client):
    chunks = list(
        client.chat.completions.create(
            model=SMOLLM, messages=ASK, tools=TOOLS, tool_choice="required", stream=True, **GREEDY
        )
    )
    calls, finish, text = streamed_calls(chunks)
    assert finish == "tool_calls"
    assert text == ""
    assert calls
    for call in calls:
        assert call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


@pytest.mark.process
@pytest.mark.parametrize("stream", [False, True])
def test_a_named_function_is_the_one_called(client, stream):
    choice = {"type": "function", "function": {"name": "add"}}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]  # not about adding
    options = {"model": SMOLLM, "messages": ask, "tools": TOOLS, "tool_choice": choice}
    if stream:
        calls, finish, _ = streamed_calls(
            list(client.chat.completions.create(**options, stream=True, **GREEDY))
        )
        names = [call["name"] for call in calls]
        for call in calls:
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS["add"])
    else:
        answer = client.chat.completions.create(**options, **GREEDY)
        finish = answer.choices[0].finish_reason
        assert_valid_openai_calls(answer.choices[0].message.tool_calls, {"add"})
        names = [call.function.name for call in answer.choices[0].message.tool_calls]
    assert finish == "tool_calls"
    assert names
    assert set(names) == {"add"}


@pytest.mark.process
def test_a_full_round_trip_ends_in_an_assistant_message(client):
    first = client.chat.completions.create(
        model=SMOLLM, messages=ASK, tools=TOOLS, tool_choice="required", **GREEDY
    )
    message = first.choices[0].message
    assert_valid_openai_calls(message.tool_calls)
    history = [*ASK, message.model_dump(exclude_none=True)]
    history += [
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'}
        for call in message.tool_calls
    ]
    final = client.chat.completions.create(model=SMOLLM, messages=history, tools=TOOLS, **GREEDY)
    choice = final.choices[0]
    assert choice.message.role == "assistant"
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        assert_valid_openai_calls(choice.message.tool_calls)
    else:
        assert choice.finish_reason in ("stop", "length")
        assert choice.message.content is not None


@pytest.mark.process
@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_none_never_calls(client, stream):
    # The model is asked for exactly a call's JSON: with "none" it stays text.
    ask = [{"role": "user", "content": 'Reply with {"name": "add", "arguments": {"a": 1, "b": 2}}'}]
    options = {"model": SMOLLM, "messages": ask, "tools": TOOLS, "tool_choice": "none"}
    if stream:
        chunks = list(client.chat.completions.create(**options, stream=True, **GREEDY))
        calls, finish, _ = streamed_calls(chunks)
        assert calls == []
    else:
        choice = client.chat.completions.create(**options, **GREEDY).choices[0]
        assert choice.message.tool_calls is None
        finish = choice.finish_reason
    assert finish in ("stop", "length")


@pytest.mark.process
@pytest.mark.parametrize("stream", [False, True])
def test_auto_answers_with_text_or_valid_calls(client, stream):
    options = {"model": SMOLLM, "messages": ASK, "tools": TOOLS, "tool_choice": "auto"}
    if stream:
        chunks = list(client.chat.completions.create(**options, stream=True, **GREEDY))
        calls, finish, text = streamed_calls(chunks)
        if calls:
            assert (finish, text) == ("tool_calls", "")
            for call in calls:
                jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
        else:
            assert finish in ("stop", "length")
            assert parse_calls(text, SPECS) is None
        return
    choice = client.chat.completions.create(**options, **GREEDY).choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        assert_valid_openai_calls(choice.message.tool_calls)
    else:
        assert choice.finish_reason in ("stop", "length")
        assert parse_calls(choice.message.content, SPECS) is None


@pytest.mark.process
def test_a_json_schema_answer_from_the_host_validates(client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }
    answer = client.chat.completions.create(
        model=SMOLLM,
        messages=[{"role": "user", "content": "A big city and its population, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        **GREEDY,
    )
    choice = answer.choices[0]
    if choice.finish_reason == "stop":
        jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.process
def test_the_router_serves_a_required_call(swarm):
    router = openai.OpenAI(base_url=f"{swarm.urls['router']}/v1", api_key="x", max_retries=0)
    answer = router.chat.completions.create(
        model="capability:reasoning", messages=ASK, tools=TOOLS, tool_choice="required", **GREEDY
    )
    assert answer.choices[0].finish_reason == "tool_calls"
    assert_valid_openai_calls(answer.choices[0].message.tool_calls)


@pytest.mark.process
@pytest.mark.parametrize("where", ["host", "reasoner"])
@pytest.mark.parametrize("stream", [False, True])
def test_the_ollama_client_chats_with_tools(swarm, where, stream):
    ollama_client = ollama.Client(swarm.urls[where])
    options = {"temperature": 0, "seed": 7, "num_predict": 48}
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_current_weather", "arguments": {"location": "Paris"}}}
            ],
        },
        {"role": "tool", "content": '{"temperature": 18}', "tool_name": "get_current_weather"},
    ]
    for messages in (ASK, history):
        if stream:
            parts = list(
                ollama_client.chat(
                    model=SMOLLM, messages=messages, tools=TOOLS, options=options, stream=True
                )
            )
            assert parts[-1].done
            assert parts[-1].done_reason in ("stop", "length")
            assert all(not part.done for part in parts[:-1])
            calls = [call for part in parts for call in part.message.tool_calls or ()]
            text = "".join(part.message.content or "" for part in parts)
            assert not (calls and text)
        else:
            answer = ollama_client.chat(
                model=SMOLLM, messages=messages, tools=TOOLS, options=options
            )
            assert isinstance(answer, ollama.ChatResponse)
            assert answer.done
            assert answer.done_reason in ("stop", "length")
            calls = answer.message.tool_calls
            assert not (calls and answer.message.content)
        assert_valid_ollama_calls(calls)


@pytest.mark.process
@pytest.mark.parametrize("stream", [False, True])
def test_a_call_schema_as_format_makes_the_host_answer_a_call(swarm, stream):
    """In Ollama's shapes (read raw: the official client drops ``index``): the calls, each
    function with its index, content empty; streamed, one chunk of calls then the done one."""
    body = {
        "model": SMOLLM,
        "messages": ASK,
        "tools": TOOLS,
        "format": call_schema(SPECS),
        "options": {"temperature": 0, "num_predict": 64},
        "stream": stream,
    }
    response = httpx.post(f"{swarm.urls['host']}/api/chat", json=body, timeout=60)
    assert response.status_code == 200
    lines = [json.loads(line) for line in response.text.splitlines()]
    if stream:
        assert [line["done"] for line in lines] == [False, True]
        assert lines[1]["message"]["content"] == ""
    (called,) = lines[:1]
    message = called["message"]
    assert message["content"] == ""
    calls = message["tool_calls"]
    assert [call["function"]["index"] for call in calls] == list(range(len(calls)))
    for call in calls:
        jsonschema.validate(call["function"]["arguments"], SCHEMAS[call["function"]["name"]])
    assert lines[-1]["done_reason"] == "stop"


# --- invalid tools: 400 naming the problem, on both APIs, at the host and the wrapper ------

BAD_TOOLS = [
    pytest.param(
        [WEATHER, WEATHER], None, "duplicate tool name", "tools.1.function.name", id="duplicate"
    ),
    pytest.param(
        [replaced(ADD, ("function", "parameters"), {"type": "object", "properties": 3})],
        None,
        "not a valid JSON schema",
        "tools.0.function.parameters",
        id="not-a-schema",
    ),
    pytest.param(
        [replaced(ADD, ("function", "parameters"), {"type": "array"})],
        None,
        '"type": "object"',
        "tools.0.function.parameters",
        id="not-an-object",
    ),
]
BAD_CHOICES = [
    pytest.param(
        TOOLS,
        {"type": "function", "function": {"name": "nope"}},
        "not in tools",
        "tool_choice",
        id="unknown-named",
    ),
    pytest.param(None, "required", "needs tools", "tool_choice", id="required-without-tools"),
]


@pytest.mark.process
@pytest.mark.parametrize(("tools", "choice", "says", "param"), BAD_TOOLS + BAD_CHOICES)
def test_invalid_tools_are_400_on_the_openai_api(swarm, tools, choice, says, param):
    body = {"model": SMOLLM, "messages": ASK, "tools": tools}
    if choice is not None:
        body["tool_choice"] = choice
    for stream in (False, True):
        response = httpx.post(
            f"{swarm.urls['reasoner']}/v1/chat/completions", json=body | {"stream": stream}
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert says in error["message"]
        assert error["param"] == param


@pytest.mark.process
@pytest.mark.parametrize("where", ["host", "reasoner"])
@pytest.mark.parametrize(("tools", "choice", "says", "param"), BAD_TOOLS)
def test_invalid_tools_are_400_on_the_ollama_api(swarm, where, tools, choice, says, param):
    body = {"model": SMOLLM, "messages": ASK, "tools": tools, "stream": False}
    response = httpx.post(f"{swarm.urls[where]}/api/chat", json=body)
    assert response.status_code == 400, response.text
    assert says in response.json()["error"]


@pytest.mark.process
def test_a_schema_the_grammar_builder_cannot_take_is_400_at_the_host(swarm):
    unbuildable = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
    body = {
        "model": SMOLLM,
        "messages": ASK,
        "tools": [replaced(ADD, ("function", "parameters"), unbuildable)],
        "stream": False,
    }
    response = httpx.post(f"{swarm.urls['host']}/api/chat", json=body)
    assert response.status_code == 400, response.text
    assert "tool 'add'" in response.json()["error"]


@pytest.mark.anyio
async def test_hostile_tools_never_make_the_host_fail(engine, tmp_path):
    app = create_app(ModelHostSettings(model=SMOLLM, models_dir=tmp_path), engine=engine)
    # A prompt over the context: the tools are checked, made grammars and rendered, then
    # the call is refused (400) before any decoding, so the sweep runs fast.
    chat = {
        "model": SMOLLM,
        "messages": [{"role": "user", "content": "Hi " * 2_000}],
        "tools": [ADD],
        "options": {"num_predict": 1},
        "stream": False,
    }
    async with app.router.lifespan_context(app), in_process(app) as http:
        problems = await sweep(sender(http), "POST", "/api/chat", chat)
    assert problems == [], "\n".join(problems)


# --- respx: Ollama's exact shapes, and an Ollama that ignores the format --------------------


@pytest.mark.anyio
async def test_ollamas_tool_call_becomes_openais(wrapper, backend):
    answer = read("chat_response_tool_call_index.json")
    route = backend.post("/api/chat").respond(json=answer)
    completion = await wrapper.openai.chat.completions.create(
        model="any", messages=ASK, tools=TOOLS
    )
    assert [tool["function"]["name"] for tool in sent_json(route)["tools"]] == list(SCHEMAS)
    assert "format" not in sent_json(route)  # auto: no constraint
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    expected = answer["message"]["tool_calls"][0]
    (call,) = choice.message.tool_calls
    # The official ollama client the wrapper reads Ollama with keeps no call ids: the
    # wrapper gives its own.
    assert call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == (
        expected["function"]["name"],
        expected["function"]["arguments"],
    )


@pytest.mark.anyio
async def test_ollamas_streamed_calls_become_openai_deltas(wrapper, backend):
    lines = read_lines("chat_stream_tool_calls.ndjson")
    backend.post("/api/chat").mock(side_effect=lambda _: streamed(lines))
    stream = await wrapper.openai.chat.completions.create(
        model="any", messages=ASK, tools=TOOLS, stream=True
    )
    calls, finish, text = streamed_calls([chunk async for chunk in stream])
    assert (finish, text) == ("tool_calls", "")
    expected = lines[0]["message"]["tool_calls"]
    assert all(call["id"].startswith("call_") for call in calls)
    assert len({call["id"] for call in calls}) == len(calls)
    assert [(call["name"], json.loads(call["arguments"])) for call in calls] == [
        (call["function"]["name"], call["function"]["arguments"]) for call in expected
    ]


@pytest.mark.anyio
async def test_required_is_a_call_format_and_json_content_becomes_tool_calls(wrapper, backend):
    # A real Ollama whose template marks calls otherwise gives the forced call as content.
    content = json.dumps(
        {"name": "get_current_weather", "arguments": {"location": "Paris, FR", "format": "celsius"}}
    )
    answer = replaced(read("chat_response.json"), ("message", "content"), content)
    route = backend.post("/api/chat").respond(json=answer)
    completion = await wrapper.openai.chat.completions.create(
        model="any", messages=ASK, tools=TOOLS, tool_choice="required"
    )
    sent = sent_json(route)
    assert sent["format"] == call_schema(SPECS)
    assert len(sent["tools"]) == 2
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert_valid_openai_calls(choice.message.tool_calls, {"get_current_weather"})

    named = {"type": "function", "function": {"name": "add"}}
    backend.post("/api/chat").respond(
        json=replaced(
            answer, ("message", "content"), '{"name": "add", "arguments": {"a": 1, "b": 2}}'
        )
    )
    await wrapper.openai.chat.completions.create(
        model="any", messages=ASK, tools=TOOLS, tool_choice=named
    )
    assert sent_json(route)["format"]["properties"]["name"] == {"const": "add"}


@pytest.mark.anyio
async def test_a_streamed_call_in_content_becomes_one_tool_call_chunk(wrapper, backend):
    lines = read_lines("chat_stream_json_content.ndjson")
    backend.post("/api/chat").mock(side_effect=lambda _: streamed(lines))
    stream = await wrapper.openai.chat.completions.create(
        model="any", messages=ASK, tools=TOOLS, tool_choice="required", stream=True
    )
    chunks = [chunk async for chunk in stream]
    calls, finish, text = streamed_calls(chunks)
    assert (finish, text) == ("tool_calls", "")
    assert [call["name"] for call in calls] == ["get_current_weather"]
    assert json.loads(calls[0]["arguments"]) == {"location": "Paris, FR", "format": "celsius"}
    with_calls = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(with_calls) == 1  # whole, in one chunk, as Ollama streams a call


@pytest.mark.anyio
async def test_the_ollama_api_reads_a_call_in_content_too(wrapper, backend):
    content = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    backend.post("/api/chat").respond(
        json=replaced(read("chat_response.json"), ("message", "content"), content)
    )
    answer = await wrapper.ollama.chat(model="any", messages=ASK, tools=TOOLS, stream=False)
    assert answer.message.content == ""
    assert [(c.function.name, dict(c.function.arguments)) for c in answer.message.tool_calls] == [
        ("add", {"a": 1, "b": 2})
    ]


@pytest.mark.anyio
async def test_a_completion_style_model_is_taught_the_tools_and_its_call_is_read(
    start_wrapper, backend
):
    wrapper = await start_wrapper(make_settings(prompt_style="completion"))
    content = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    route = backend.post("/api/generate").respond(
        json=replaced(read("generate_response.json"), ("response",), content)
    )
    called = {"role": "assistant", "content": None, "tool_calls": [_openai_call("add", a=3, b=4)]}
    history = [*ASK, called, {"role": "tool", "tool_call_id": "call_1", "content": "7"}]
    completion = await wrapper.openai.chat.completions.create(
        model="any", messages=history, tools=TOOLS, tool_choice="required"
    )
    sent = sent_json(route)
    assert sent["raw"] is True
    assert sent["format"] == call_schema(SPECS)
    assert sent["prompt"].startswith(tools_prompt(SPECS))
    assert calls_text([Call("add", {"a": 3, "b": 4})]) in sent["prompt"]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert_valid_openai_calls(completion.choices[0].message.tool_calls, {"add"})


def _openai_call(name: str, **arguments: Any) -> dict:
    return {
        "id": "call_1",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


@pytest.mark.anyio
async def test_a_backend_that_ignores_the_format_is_a_502(wrapper, backend):
    backend.post("/api/chat").respond(json=read("chat_response.json"))  # plain text
    for response_format in (
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    ):
        with pytest.raises(openai.APIStatusError) as caught:
            await wrapper.openai.chat.completions.create(
                model="any", messages=ASK, response_format=response_format
            )
        assert caught.value.status_code == 502
        assert caught.value.body["code"] == "upstream_invalid_json"
    response = await wrapper.http.post(
        "/api/chat", json={"model": "any", "messages": ASK, "format": "json", "stream": False}
    )
    assert response.status_code == 502
    assert "ignored the format" in response.json()["error"]


@pytest.mark.anyio
async def test_json_that_fails_the_schema_is_a_502_and_a_cut_answer_passes(wrapper, backend):
    schema = {"type": "object", "required": ["city"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    answer = replaced(read("chat_response.json"), ("message", "content"), '{"town": "Paris"}')
    backend.post("/api/chat").respond(json=answer)
    with pytest.raises(openai.APIStatusError) as caught:
        await wrapper.openai.chat.completions.create(
            model="any", messages=ASK, response_format=response_format
        )
    assert caught.value.status_code == 502
    backend.post("/api/chat").respond(json=read("chat_response_length.json"))
    cut = await wrapper.openai.chat.completions.create(
        model="any", messages=ASK, response_format=response_format
    )
    assert cut.choices[0].finish_reason == "length"  # cut short: passed on as it is


@pytest.mark.anyio
async def test_a_stream_that_ignores_the_format_ends_with_an_error_event(wrapper, backend):
    lines = read_lines("chat_stream.ndjson")
    backend.post("/api/chat").mock(side_effect=lambda _: streamed(lines))
    body = {
        "model": "any",
        "messages": ASK,
        "stream": True,
        "response_format": {"type": "json_object"},
    }
    response = await wrapper.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "upstream_invalid_json"
    assert not any('"finish_reason":"stop"' in event for event in events)


# --- the pure parts -------------------------------------------------------------------------


def test_a_call_is_all_the_text_or_none_of_it():
    tools = SPECS
    call = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    assert [c.name for c in parse_calls(f"  {call}\n", tools)] == ["add"]
    assert [c.name for c in parse_calls(f"[{call}, {call}]", tools)] == ["add", "add"]
    for not_a_call in (
        f"Sure: {call}",
        '{"name": "add", "arguments": {"a": "one", "b": 2}}',  # fails the schema
        '{"name": "sub", "arguments": {}}',  # no such tool
        '{"name": "add", "arguments": {"a": 1, "b": 2}, "x": 1}',
        "[]",
        "{",
    ):
        assert parse_calls(not_a_call, tools) is None, not_a_call


def test_a_watch_holds_back_only_what_may_be_a_call():
    tools = SPECS
    text = CallWatch(tools)
    assert [text.feed(p) for p in (" ", "\n", "Hel", "lo")] == ["", "", " \nHel", "lo"]
    assert text.finish() == ("", None)
    call = CallWatch(tools)
    assert [call.feed(p) for p in (" {", '"name": "add", ', '"arguments": {"a": 1, "b": 2}}')] == [
        "",
        "",
        "",
    ]
    held, calls = call.finish()
    assert held == ""
    assert [c.arguments for c in calls] == [{"a": 1, "b": 2}]
    json_text = CallWatch(tools)
    json_text.feed('{"a": 1}')
    assert json_text.finish() == ('{"a": 1}', None)


# --- a kind: openai backend: the call forwarded as it is, tool_choice included ---------------


@pytest.mark.anyio
@pytest.mark.process
async def test_a_kind_openai_backend_gets_tool_choice_as_it_is(start_wrapper, openai_server):
    # llama-cpp-python's server constrains a named function itself: its call comes back only
    # if tool_choice reached it.
    settings = openai_settings(openai_server.url, max_tokens_limit=64)
    served = await start_wrapper(settings, backend=None)
    completion = await served.openai.chat.completions.create(
        model="any",
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        temperature=0,
    )
    calls = completion.choices[0].message.tool_calls
    assert [call.function.name for call in calls] == ["add"]
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS["add"])


@pytest.mark.anyio
async def test_the_ollama_api_streams_a_call_in_content_as_one_chunk(wrapper, backend):
    lines = read_lines("chat_stream_json_content.ndjson")
    backend.post("/api/chat").mock(side_effect=lambda _: streamed(lines))
    parts = [
        part
        async for part in await wrapper.ollama.chat(
            model="any", messages=ASK, tools=TOOLS, stream=True
        )
    ]
    assert [part.done for part in parts] == [False, True]
    (call,) = parts[0].message.tool_calls
    assert (call.function.name, dict(call.function.arguments)) == (
        "get_current_weather",
        {"location": "Paris, FR", "format": "celsius"},
    )
    assert parts[0].message.content == parts[1].message.content == ""
    assert parts[1].done_reason == "stop"


@pytest.mark.anyio
async def test_an_ollama_stream_that_ignores_the_format_ends_with_an_error_line(wrapper, backend):
    backend.post("/api/chat").mock(side_effect=lambda _: streamed(read_lines("chat_stream.ndjson")))
    body = {"model": "any", "messages": ASK, "format": "json", "stream": True}
    response = await wrapper.http.post("/api/chat", json=body)
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert "ignored the format" in lines[-1]["error"]
    assert not any(line.get("done") for line in lines[:-1])


def test_a_template_that_renders_tools_gets_them_and_the_history_in_its_shape():
    # The tool parts of a Hugging Face template (Qwen 2.5's, shortened).
    template = (
        "{% for tool in tools %}<tool>{{ tool.function.name }}: "
        "{{ tool.function.parameters | tojson }}</tool>\n{% endfor %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
        "{% for call in m.tool_calls or [] %}<call>{{ call.function.name }} "
        "{{ call.function.arguments | tojson }}</call>{% endfor %}\n{% endfor %}"
    )
    engine = SimpleNamespace(
        model=SimpleNamespace(chat_format=None),
        llama=SimpleNamespace(metadata={"tokenizer.chat_template": template}),
    )
    history = [
        Message(role="user", content="Add 1 and 2."),
        Message.model_validate(
            {
                "role": "assistant",
                "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}],
            }
        ),
        Message(role="tool", content="3", tool_name="add"),
    ]
    messages, tools = prompt_messages(engine, history, SPECS)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]  # no system text
    prompt = Jinja2ChatFormatter(template, eos_token="", bos_token="")(
        messages=messages, tools=tools
    ).prompt
    assert f"<tool>add: {json.dumps(SCHEMAS['add'] | {'type': 'object'})}</tool>" in prompt
    assert '<call>add {"a": 1, "b": 2}</call>' in prompt
    assert "<tool>3" in prompt


def test_a_template_without_tools_is_taught_them_and_shown_calls_as_json():
    engine = SimpleNamespace(model=SimpleNamespace(chat_format="gemma"), llama=None)
    call = {"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    history = [
        Message(role="system", content="Be brief."),
        Message(role="user", content="Add 1 and 2."),
        Message.model_validate({"role": "assistant", "tool_calls": [call]}),
        Message(role="tool", content="3", tool_name="add"),
    ]
    messages, tools = prompt_messages(engine, history, SPECS)
    assert tools is None
    assert messages[0] == {"role": "system", "content": f"Be brief.\n\n{tools_prompt(SPECS)}"}
    assert messages[2] == {
        "role": "assistant",
        "content": calls_text([Call("add", {"a": 1, "b": 2})]),
    }
    assert messages[3] == {"role": "user", "content": "Result of add: 3"}
