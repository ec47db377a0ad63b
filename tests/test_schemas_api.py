"""The OpenAI and Ollama API schemas against documented payloads and the official clients."""

from __future__ import annotations

import base64
import json
import math
import typing
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import httpx2
import ollama
import openai
import pytest
from ollama._types import ChatRequest as OfficialChatRequest
from ollama._types import GenerateRequest as OfficialGenerateRequest
from openai.types.chat import ChatCompletion as OfficialChatCompletion
from openai.types.chat import ChatCompletionChunk as OfficialChatCompletionChunk
from openai.types.chat import ChatCompletionTokenLogprob as OfficialTokenLogprob
from pydantic import BaseModel, ValidationError

from schemas import ollama as ol
from schemas import openai as oa
from schemas.errors import OllamaError
from services.wrapper.app import create_app as create_wrapper_app
from tests.conftest import replaced, tlc_settings

DATA = Path(__file__).parent / "data"


def fixture(name: str) -> Any:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def fixture_lines(name: str) -> list[Any]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def wire(model: Any) -> dict:
    """What a daemon puts on the wire for ``model``."""
    return json.loads(json.dumps(model.model_dump(exclude_none=True)))


# --- OpenAI: requests ------------------------------------------------------------------------


def test_openai_basic_request_takes_defaults() -> None:
    request = oa.ChatCompletionRequest.model_validate(fixture("openai/chat_request_basic.json"))

    assert request.model == "gpt-4.1"
    assert [m.role for m in request.messages] == ["developer", "user"]
    assert request.messages[1].text == "Hello!"
    assert request.stream is False
    assert request.logprobs is False
    assert request.n is None
    assert request.max_output_tokens is None
    assert request.stop_sequences == []
    assert request.include_usage is False


def test_openai_full_request_keeps_values_and_drops_vendor_fields() -> None:
    request = oa.ChatCompletionRequest.model_validate(fixture("openai/chat_request_full.json"))

    assert (request.temperature, request.top_p, request.seed) == (0.2, 0.9, 42)
    assert request.max_output_tokens == 128
    assert request.stop_sequences == ["\n\n", "END"]
    assert request.include_usage is True
    assert (request.logprobs, request.top_logprobs) == (True, 2)
    assert (request.presence_penalty, request.frequency_penalty) == (0.5, -0.5)
    assert request.user == "user-1234"
    user = request.messages[1]
    assert user.name == "alice"
    assert user.text == "What is in this image?\nBe brief."
    assert isinstance(user.content, list)
    image = user.content[1]
    assert isinstance(image, oa.ImageContentPart)
    assert (image.image_url.url, image.image_url.detail) == (
        "https://example.com/boardwalk.jpg",
        "low",
    )
    response_format = request.response_format
    assert response_format is not None
    assert response_format.json_schema is not None
    assert response_format.json_schema.name == "image_description"
    assert response_format.json_schema.strict is True
    assert (
        response_format.json_schema.schema_
        == fixture("openai/chat_request_full.json")["response_format"]["json_schema"]["schema"]
    )

    dumped = request.model_dump(exclude_none=True)
    for vendor_field in ("logit_bias", "metadata", "top_k", "repetition_penalty"):
        assert vendor_field not in dumped
    assert dumped["response_format"]["json_schema"]["schema"]["required"] == ["objects"]


def test_openai_tool_request_keeps_tool_calls() -> None:
    request = oa.ChatCompletionRequest.model_validate(fixture("openai/chat_request_tools.json"))

    assistant, tool = request.messages[1], request.messages[2]
    assert assistant.content is None
    assert assistant.text == ""
    assert assistant.tool_calls is not None
    call = assistant.tool_calls[0]
    assert (call.id, call.type, call.function.name) == (
        "call_abc123",
        "function",
        "get_current_weather",
    )
    assert json.loads(call.function.arguments) == {"location": "Boston, MA"}
    assert (tool.role, tool.tool_call_id) == ("tool", "call_abc123")
    assert json.loads(tool.text) == {"temperature": 22, "unit": "celsius"}
    assert request.tools is not None
    assert request.tools[0].function.parameters is not None
    assert request.tools[0].function.parameters["required"] == ["location"]
    assert request.tool_choice == "auto"


BASIC_OPENAI = fixture("openai/chat_request_basic.json")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param(("n",), 2, id="n=2"),
        pytest.param(("temperature",), 3, id="temperature-too-high"),
        pytest.param(("temperature",), "0.7", id="temperature-string"),
        pytest.param(("top_p",), 1.5, id="top_p-too-high"),
        pytest.param(("max_tokens",), 0, id="max_tokens-zero"),
        pytest.param(("max_completion_tokens",), 1.5, id="max_completion_tokens-float"),
        pytest.param(("stream",), "yes", id="stream-string"),
        pytest.param(("stream",), 1, id="stream-int"),
        pytest.param(("seed",), "42", id="seed-string"),
        pytest.param(("top_logprobs",), 21, id="top_logprobs-too-high"),
        pytest.param(("presence_penalty",), -2.5, id="presence_penalty-too-low"),
        pytest.param(("stop",), ["a", "b", "c", "d", "e"], id="five-stops"),
        pytest.param(("stop",), 7, id="stop-int"),
        pytest.param(("model",), "", id="empty-model"),
        pytest.param(("messages",), [], id="no-messages"),
        pytest.param(("messages",), "Hello!", id="messages-string"),
        pytest.param(("messages",), [{"role": "user", "content": "x"}] * 1025, id="too-many"),
        pytest.param(("messages", 1, "role"), "bot", id="unknown-role"),
        pytest.param(("messages", 1, "content"), None, id="user-without-content"),
        pytest.param(("messages", 1, "content"), [], id="empty-parts"),
        pytest.param(
            ("messages", 1, "content"),
            [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
            id="unsupported-part",
        ),
        pytest.param(("response_format",), {"type": "json_schema"}, id="json_schema-missing"),
        pytest.param(("response_format",), {"type": "yaml"}, id="unknown-format"),
        pytest.param(("stream_options",), {"include_usage": "yes"}, id="include_usage-string"),
    ],
)
def test_openai_request_rejects(path: tuple, value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        oa.ChatCompletionRequest.model_validate(replaced(BASIC_OPENAI, path, value))

    assert all(error["loc"][0] == path[0] for error in caught.value.errors())


def test_openai_request_explains_n() -> None:
    with pytest.raises(ValidationError, match="only n=1 is supported"):
        oa.ChatCompletionRequest.model_validate({**BASIC_OPENAI, "n": 2})

    assert oa.ChatCompletionRequest.model_validate({**BASIC_OPENAI, "n": 1}).n == 1


def test_openai_request_null_flags_mean_defaults() -> None:
    request = oa.ChatCompletionRequest.model_validate(
        {**BASIC_OPENAI, "stream": None, "logprobs": None, "temperature": None}
    )

    assert (request.stream, request.logprobs, request.temperature) == (False, False, None)


def test_include_usage_needs_a_stream() -> None:
    options = {"stream_options": {"include_usage": True}}

    assert (
        oa.ChatCompletionRequest.model_validate({**BASIC_OPENAI, **options}).include_usage is False
    )
    streamed = oa.ChatCompletionRequest.model_validate({**BASIC_OPENAI, **options, "stream": True})
    assert streamed.include_usage is True


def test_max_tokens_is_the_fallback() -> None:
    legacy = oa.ChatCompletionRequest.model_validate({**BASIC_OPENAI, "max_tokens": 50})

    assert legacy.max_output_tokens == 50
    assert oa.ChatCompletionRequest.model_validate(
        {**BASIC_OPENAI, "stop": "END"}
    ).stop_sequences == ["END"]


def test_json_schema_format_is_built_by_name_and_sent_by_alias() -> None:
    built = oa.JSONSchemaFormat(name="answer", schema_={"type": "object"}, strict=True)

    assert wire(built) == {"name": "answer", "schema": {"type": "object"}, "strict": True}


def test_content_text() -> None:
    parts = [
        oa.TextContentPart(type="text", text="a"),
        oa.ImageContentPart(type="image_url", image_url=oa.ImageURL(url="data:image/png;base64,x")),
        oa.TextContentPart(type="text", text="b"),
    ]

    assert oa.content_text(None) == ""
    assert oa.content_text("plain") == "plain"
    assert oa.content_text(parts) == "a\nb"


# --- OpenAI: responses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "openai/chat_completion.json",
        "openai/chat_completion_logprobs.json",
        "openai/chat_completion_tool_calls.json",
    ],
)
def test_chat_completion_round_trips_through_the_official_types(name: str) -> None:
    documented = fixture(name)

    ours = oa.ChatCompletion.model_validate(documented)
    official = OfficialChatCompletion.model_validate(wire(ours))

    assert (official.id, official.object, official.created, official.model) == (
        documented["id"],
        "chat.completion",
        documented["created"],
        documented["model"],
    )
    choice, expected = official.choices[0], documented["choices"][0]
    assert choice.finish_reason == expected["finish_reason"]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected["message"]["content"]
    expected_calls = expected["message"].get("tool_calls") or []
    assert [c.model_dump() for c in choice.message.tool_calls or []] == expected_calls
    expected_logprobs = expected["logprobs"]["content"] if expected["logprobs"] else None
    if expected_logprobs is None:
        assert choice.logprobs is None
    else:
        assert choice.logprobs is not None
        assert choice.logprobs.content is not None
        assert [lp.model_dump() for lp in choice.logprobs.content] == expected_logprobs
    assert official.usage is not None
    assert official.usage.total_tokens == documented["usage"]["total_tokens"]
    assert official.system_fingerprint == documented.get("system_fingerprint")


def test_chat_completion_needs_a_choice() -> None:
    with pytest.raises(ValidationError, match="choices"):
        oa.ChatCompletion(id="x", created=1, model="m", choices=[])


def test_token_logprob_always_carries_top_logprobs() -> None:
    # The official type requires the list even when no alternatives were asked for.
    on_wire = wire(oa.TokenLogprob(token="Hi", logprob=-0.1))

    assert on_wire == {"token": "Hi", "logprob": -0.1, "top_logprobs": []}
    assert OfficialTokenLogprob.model_validate(on_wire).top_logprobs == []


def test_usage_of_fills_the_total() -> None:
    assert oa.Usage.of(19, 10).model_dump() == {
        "prompt_tokens": 19,
        "completion_tokens": 10,
        "total_tokens": 29,
    }


@pytest.mark.parametrize(
    "name",
    ["openai/chat_completion_stream.json", "openai/chat_completion_stream_tool_calls.json"],
)
def test_chunks_round_trip_through_the_official_types(name: str) -> None:
    documented = fixture(name)

    chunks = [oa.ChatCompletionChunk.model_validate(chunk) for chunk in documented]
    official = [OfficialChatCompletionChunk.model_validate(wire(chunk)) for chunk in chunks]

    assert [c.object for c in official] == ["chat.completion.chunk"] * len(documented)
    assert {c.id for c in official} == {documented[0]["id"]}
    with_choices = [c for c in official if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    last_documented = [chunk for chunk in documented if chunk["choices"]][-1]
    assert (
        with_choices[-1].choices[0].finish_reason == last_documented["choices"][0]["finish_reason"]
    )
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    expected_text = "".join(
        chunk["choices"][0]["delta"].get("content") or ""
        for chunk in documented
        if chunk["choices"]
    )
    assert text == expected_text


def test_final_usage_chunk_has_no_choices() -> None:
    documented = fixture("openai/chat_completion_stream.json")
    chunks = [oa.ChatCompletionChunk.model_validate(chunk) for chunk in documented]

    final = OfficialChatCompletionChunk.model_validate(wire(chunks[-1]))
    assert final.choices == []
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens) == (
        9,
        2,
        11,
    )
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert "usage" not in wire(chunks[0])


def test_chunk_without_choices_must_carry_usage() -> None:
    with pytest.raises(ValidationError, match="final usage chunk"):
        oa.ChatCompletionChunk(id="c", created=1, model="m", choices=[])


def test_tool_call_deltas_round_trip() -> None:
    chunks = [
        oa.ChatCompletionChunk.model_validate(chunk)
        for chunk in fixture("openai/chat_completion_stream_tool_calls.json")
    ]
    official = [OfficialChatCompletionChunk.model_validate(wire(chunk)) for chunk in chunks]

    first = official[0].choices[0].delta.tool_calls
    assert first is not None
    assert first[0].function is not None
    assert (first[0].index, first[0].id, first[0].function.name) == (
        0,
        "call_abc123",
        "get_current_weather",
    )
    arguments = "".join(
        (call.function.arguments or "") if call.function else ""
        for chunk in official
        for call in chunk.choices[0].delta.tool_calls or []
    )
    assert json.loads(arguments) == {"location": "Boston, MA"}
    assert official[-1].choices[0].finish_reason == "tool_calls"


def test_models_fixture_validates() -> None:
    models = oa.ModelList.model_validate(fixture("openai/models.json"))

    assert models.object == "list"
    assert [m.id for m in models.data] == ["model-id-0", "model-id-1", "model-id-2"]
    assert models.data[2].owned_by == "openai"
    assert wire(models) == fixture("openai/models.json")


# --- OpenAI: the official client against our models ------------------------------------------


def openai_client(handler: Callable[[httpx2.Request], httpx2.Response]) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="test-key",
        base_url="http://wrapper.test/v1",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
        _strict_response_validation=True,
    )


def test_official_openai_client_round_trip() -> None:
    seen: list[oa.ChatCompletionRequest] = []
    answer = oa.ChatCompletion(
        id="chatcmpl-local-1",
        created=1_700_000_000,
        model="local-model",
        choices=[
            oa.Choice(
                message=oa.AssistantMessage(content='{"ok": true}'),
                finish_reason="length",
                logprobs=oa.ChoiceLogprobs(
                    content=[
                        oa.TokenLogprob(
                            token='{"',
                            logprob=-0.5,
                            bytes=[123, 34],
                            top_logprobs=[oa.TopLogprob(token='{"', logprob=-0.5)],
                        )
                    ]
                ),
            )
        ],
        usage=oa.Usage.of(12, 5),
        system_fingerprint="fp_local",
    )

    def handler(request: httpx2.Request) -> httpx2.Response:
        assert (request.method, request.url.path) == ("POST", "/v1/chat/completions")
        seen.append(oa.ChatCompletionRequest.model_validate_json(request.content))
        return httpx2.Response(200, json=wire(answer))

    result = openai_client(handler).chat.completions.create(
        model="local-model",
        messages=[
            {"role": "developer", "content": "Answer in JSON."},
            {"role": "user", "content": [{"type": "text", "text": "Are you ok?"}]},
        ],
        temperature=0.3,
        top_p=0.8,
        max_completion_tokens=5,
        stop=["END"],
        seed=7,
        logprobs=True,
        top_logprobs=1,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        n=1,
        user="u-1",
        response_format={"type": "json_object"},
    )

    (request,) = seen
    assert request.model == "local-model"
    assert [m.text for m in request.messages] == ["Answer in JSON.", "Are you ok?"]
    assert (request.temperature, request.top_p, request.seed) == (0.3, 0.8, 7)
    assert (request.max_output_tokens, request.stop_sequences) == (5, ["END"])
    assert (request.logprobs, request.top_logprobs, request.n) == (True, 1, 1)
    assert request.response_format is not None
    assert request.response_format.type == "json_object"
    assert request.stream is False
    assert result.id == "chatcmpl-local-1"
    assert result.choices[0].message.content == '{"ok": true}'
    assert result.choices[0].finish_reason == "length"
    assert result.choices[0].logprobs is not None
    assert result.choices[0].logprobs.content is not None
    assert result.choices[0].logprobs.content[0].bytes == [123, 34]
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (12, 17)
    assert result.system_fingerprint == "fp_local"


def test_official_openai_client_streams_our_chunks() -> None:
    seen: list[oa.ChatCompletionRequest] = []
    base = {"id": "chatcmpl-local-2", "created": 1_700_000_001, "model": "local-model"}
    chunks = [
        oa.ChatCompletionChunk(
            **base, choices=[oa.ChunkChoice(delta=oa.ChunkDelta(role="assistant", content=""))]
        ),
        oa.ChatCompletionChunk(**base, choices=[oa.ChunkChoice(delta=oa.ChunkDelta(content="Hi"))]),
        oa.ChatCompletionChunk(
            **base, choices=[oa.ChunkChoice(delta=oa.ChunkDelta(content=" there"))]
        ),
        oa.ChatCompletionChunk(**base, choices=[oa.ChunkChoice(finish_reason="stop")]),
        oa.ChatCompletionChunk(**base, choices=[], usage=oa.Usage.of(4, 2)),
    ]
    events = "".join(f"data: {json.dumps(wire(chunk))}\n\n" for chunk in chunks)

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(oa.ChatCompletionRequest.model_validate_json(request.content))
        return httpx2.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=(events + "data: [DONE]\n\n").encode(),
        )

    stream = openai_client(handler).chat.completions.create(
        model="local-model",
        messages=[{"role": "user", "content": "Hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    received = list(stream)

    (request,) = seen
    assert (request.stream, request.include_usage) == (True, True)
    assert len(received) == 5
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == "Hi there"
    assert received[3].choices[0].finish_reason == "stop"
    assert received[-1].choices == []
    assert received[-1].usage is not None
    assert received[-1].usage.total_tokens == 6
    assert all(c.usage is None for c in received[:-1])


def test_official_openai_client_lists_our_models() -> None:
    models = oa.ModelList(
        data=[oa.Model(id="qwen2.5:7b", created=1_700_000_000, owned_by="local-llm-swarm")]
    )

    def handler(request: httpx2.Request) -> httpx2.Response:
        assert (request.method, request.url.path) == ("GET", "/v1/models")
        return httpx2.Response(200, json=wire(models))

    listed = list(openai_client(handler).models.list())

    assert [(m.id, m.object, m.created, m.owned_by) for m in listed] == [
        ("qwen2.5:7b", "model", 1_700_000_000, "local-llm-swarm")
    ]


# --- Ollama: requests ------------------------------------------------------------------------


def test_ollama_basic_requests_take_ollama_defaults() -> None:
    generate = ol.GenerateRequest.model_validate(fixture("ollama/generate_request.json"))
    chat = ol.ChatRequest.model_validate(fixture("ollama/chat_request.json"))

    assert (generate.model, generate.prompt) == ("llama3.2", "Why is the sky blue?")
    assert (generate.stream, generate.raw, generate.logprobs) == (True, False, False)
    assert (generate.format, generate.options, generate.keep_alive) == (None, None, None)
    assert chat.stream is True
    assert [(m.role, m.content) for m in chat.messages] == [("user", "why is the sky blue?")]


def test_ollama_full_generate_request() -> None:
    documented = fixture("ollama/generate_request_full.json")

    request = ol.GenerateRequest.model_validate(documented)

    assert request.stream is False
    assert request.context == [1, 2, 3]
    assert request.format == documented["format"]
    assert request.images == documented["images"]
    assert (request.think, request.logprobs, request.top_logprobs) == (False, True, 2)
    assert ol.keep_alive_seconds(request.keep_alive) == 300
    options = request.options
    assert options is not None
    assert (options.num_ctx, options.num_predict, options.seed) == (1024, 100, 42)
    assert (options.temperature, options.top_k, options.min_p) == (0.8, 20, 0.0)
    assert options.stop == ["\n", "user:"]
    assert options.use_mmap is True
    dumped = request.model_dump(exclude_none=True)
    assert "some_future_option" not in dumped["options"]
    assert "truncate" not in dumped
    assert "shift" not in dumped
    assert dumped["options"]["repeat_penalty"] == 1.2


def test_ollama_tool_chat_request() -> None:
    request = ol.ChatRequest.model_validate(fixture("ollama/chat_request_tools.json"))

    assert [m.role for m in request.messages] == ["system", "user", "assistant", "tool"]
    assert request.messages[1].images is None
    call = request.messages[2].tool_calls
    assert call is not None
    assert (call[0].function.name, call[0].function.index) == ("get_current_weather", 0)
    assert call[0].function.arguments == {"location": "Paris, FR", "format": "celsius"}
    assert (request.messages[3].tool_name, request.messages[3].content) == (
        "get_current_weather",
        "22",
    )
    assert request.tools is not None
    assert request.tools[0].function.name == "get_current_weather"
    assert request.format == "json"
    assert request.think == "low"
    assert ol.keep_alive_seconds(request.keep_alive) == math.inf
    assert request.options is not None
    assert request.options.num_ctx == 4096
    assert isinstance(request.options.num_ctx, int)
    assert request.options.temperature == 0


BASIC_GENERATE = fixture("ollama/generate_request.json")
BASIC_CHAT = fixture("ollama/chat_request.json")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param(("model",), "", id="empty-model"),
        pytest.param(("stream",), "true", id="stream-string"),
        pytest.param(("raw",), 1, id="raw-int"),
        pytest.param(("prompt",), 42, id="prompt-int"),
        pytest.param(("context",), ["a"], id="context-strings"),
        pytest.param(("images",), "iVBORw0KGgo=", id="images-not-a-list"),
        pytest.param(("format",), "yaml", id="unknown-format"),
        pytest.param(("think",), "extreme", id="unknown-think-level"),
        pytest.param(("top_logprobs",), 21, id="top_logprobs-too-high"),
        pytest.param(("logprobs",), "yes", id="logprobs-string"),
        pytest.param(("keep_alive",), "5 minutes", id="keep_alive-not-a-duration"),
        pytest.param(("keep_alive",), True, id="keep_alive-bool"),
        pytest.param(("options",), {"temperature": "hot"}, id="temperature-string"),
        pytest.param(("options",), {"num_ctx": 4096.5}, id="num_ctx-fraction"),
        pytest.param(("options",), {"num_ctx": "4096"}, id="num_ctx-string"),
        pytest.param(("options",), {"stop": "END"}, id="stop-not-a-list"),
        pytest.param(("options",), {"use_mmap": "yes"}, id="use_mmap-string"),
    ],
)
def test_ollama_generate_request_rejects(path: tuple, value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        ol.GenerateRequest.model_validate(replaced(BASIC_GENERATE, path, value))

    assert all(error["loc"][0] == path[0] for error in caught.value.errors())


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param(("messages",), "why?", id="messages-string"),
        pytest.param(("messages", 0, "role"), "robot", id="unknown-role"),
        pytest.param(("messages", 0, "content"), ["why?"], id="content-list"),
        pytest.param(("messages", 0, "images"), [1, 2], id="images-ints"),
        pytest.param(("messages",), [{"role": "user", "content": "x"}] * 1025, id="too-many"),
        pytest.param(("tools",), [{"type": "function", "function": {}}], id="tool-without-name"),
    ],
)
def test_ollama_chat_request_rejects(path: tuple, value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        ol.ChatRequest.model_validate(replaced(BASIC_CHAT, path, value))

    assert all(error["loc"][0] == path[0] for error in caught.value.errors())


def test_ollama_request_normalizes_like_ollama() -> None:
    request = ol.ChatRequest.model_validate(
        {
            "model": "llama3.2",
            "messages": [{"role": "USER", "content": None}],
            "format": "",
            "stream": None,
            "logprobs": None,
        }
    )

    assert request.messages[0].role == "user"
    assert request.messages[0].content == ""
    assert (request.format, request.stream, request.logprobs) == (None, True, False)
    assert ol.ChatRequest.model_validate({"model": "m", "messages": None}).messages == []


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (0, 0.0),
        (300, 300.0),
        (2.5, 2.5),
        (-1, math.inf),
        ("0", 0.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("-1m", math.inf),
    ],
)
def test_keep_alive_seconds(value: Any, seconds: float | None) -> None:
    request = ol.GenerateRequest.model_validate({"model": "m", "keep_alive": value})

    assert ol.keep_alive_seconds(request.keep_alive) == seconds


def test_show_request_accepts_the_legacy_name() -> None:
    assert ol.ShowRequest.model_validate(fixture("ollama/show_request.json")).model == "llava"
    assert ol.ShowRequest.model_validate({"name": "llava:7b"}).model == "llava:7b"
    with pytest.raises(ValidationError):
        ol.ShowRequest.model_validate({"verbose": True})


def get_current_weather(location: str, unit: str) -> str:
    """Get the current weather for a location.

    Args:
      location: The city, e.g. Paris, FR
      unit: celsius or fahrenheit

    Returns:
      str: The weather
    """
    return f"22 {unit} in {location}"


def test_payloads_built_like_the_ollama_client_validate() -> None:
    # ollama.Client builds its bodies so: its own request model, dumped without None.
    payloads = [
        OfficialChatRequest(
            model="llama3.2",
            messages=[ollama.Message(role="user", content="hi")],
            tools=[],
            stream=True,
            format="",
            options={"seed": 1, "stop": ["x"]},
            keep_alive=0,
        ).model_dump(exclude_none=True),
        OfficialGenerateRequest(
            model="llama3.2",
            prompt="hi",
            stream=False,
            raw=True,
            think="high",
            options=ollama.Options(num_predict=-1, temperature=0.0),
            keep_alive="-1m",
        ).model_dump(exclude_none=True),
    ]

    chat = ol.ChatRequest.model_validate(payloads[0])
    generate = ol.GenerateRequest.model_validate(payloads[1])

    assert (chat.format, chat.tools, chat.stream, chat.keep_alive) == (None, [], True, 0)
    assert chat.options is not None
    assert (chat.options.seed, chat.options.stop) == (1, ["x"])
    assert (generate.raw, generate.think, generate.stream) == (True, "high", False)
    assert generate.options is not None
    assert generate.options.num_predict == -1
    assert ol.keep_alive_seconds(generate.keep_alive) == math.inf


# --- Ollama: responses -----------------------------------------------------------------------

METRICS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


@pytest.mark.parametrize(
    "name",
    [
        "ollama/generate_response.json",
        "ollama/generate_response_cached.json",
        "ollama/generate_response_length.json",
        "ollama/generate_response_logprobs.json",
    ],
)
def test_generate_response_round_trips_through_the_ollama_types(name: str) -> None:
    documented = fixture(name)

    ours = ol.GenerateResponse.model_validate(documented)
    on_wire = wire(ours)
    official = ollama.GenerateResponse.model_validate(on_wire)

    assert on_wire == documented
    assert (official.model, official.created_at, official.response) == (
        documented["model"],
        documented["created_at"],
        documented["response"],
    )
    assert (official.done, official.done_reason) == (True, documented["done_reason"])
    for metric in METRICS:
        assert getattr(official, metric) == documented.get(metric)
    assert official.context == documented.get("context")


def test_omitted_metrics_stay_omitted() -> None:
    cached = ol.GenerateResponse.model_validate(fixture("ollama/generate_response_cached.json"))

    assert cached.prompt_eval_count is None
    assert cached.prompt_eval_duration is None
    assert cached.eval_count == 12
    assert "prompt_eval_count" not in wire(cached)


def test_done_reason_length() -> None:
    response = ol.GenerateResponse.model_validate(fixture("ollama/generate_response_length.json"))

    assert (response.done, response.done_reason) == (True, "length")
    assert (
        ol.GenerateResponse.model_validate(
            {**fixture("ollama/generate_response_length.json"), "done_reason": "unload"}
        ).done_reason
        == "unload"
    )


def test_logprobs_match_the_ollama_types() -> None:
    ours = ol.GenerateResponse.model_validate(fixture("ollama/generate_response_logprobs.json"))
    official = ollama.GenerateResponse.model_validate(wire(ours))

    assert ours.logprobs is not None
    assert official.logprobs is not None
    assert [(lp.token, lp.logprob) for lp in official.logprobs] == [("Hi", -0.12), ("!", -0.01)]
    top = official.logprobs[0].top_logprobs
    assert top is not None
    assert [(t.token, t.logprob) for t in top] == [("Hi", -0.12), ("Hello", -2.3)]
    assert ours.logprobs[0].bytes == [72, 105]
    assert ours.logprobs[1].bytes is None
    assert official.created_at == "2025-11-13T10:15:00.123456789Z"


@pytest.mark.parametrize(
    "name", ["ollama/chat_response.json", "ollama/chat_response_tool_calls.json"]
)
def test_chat_response_round_trips_through_the_ollama_types(name: str) -> None:
    documented = fixture(name)

    ours = ol.ChatResponse.model_validate(documented)
    official = ollama.ChatResponse.model_validate(wire(ours))

    assert official.message.role == "assistant"
    assert official.message.content == documented["message"]["content"]
    expected_calls = documented["message"].get("tool_calls") or []
    assert [
        {"function": {"name": c.function.name, "arguments": dict(c.function.arguments)}}
        for c in official.message.tool_calls or []
    ] == expected_calls
    assert (official.done, official.done_reason) == (True, "stop")
    for metric in METRICS:
        assert getattr(official, metric) == documented.get(metric)


@pytest.mark.parametrize(
    ("name", "model", "text_of"),
    [
        ("ollama/generate_stream.ndjson", ol.GenerateResponse, lambda line: line.response),
        ("ollama/chat_stream.ndjson", ol.ChatResponse, lambda line: line.message.content),
    ],
)
def test_stream_lines_are_the_response_models(name: str, model: type, text_of: Callable) -> None:
    lines = [model.model_validate(line) for line in fixture_lines(name)]

    assert [line.done for line in lines] == [False, False, True]
    assert all(line.done_reason is None and line.eval_count is None for line in lines[:-1])
    assert "".join(text_of(line) for line in lines) == "The sky"
    assert (lines[-1].done_reason, lines[-1].prompt_eval_count) == ("stop", 26)
    assert "done_reason" not in wire(lines[0])
    assert wire(lines[0])["done"] is False


def test_error_line_is_not_a_response() -> None:
    *parts, error_line = fixture_lines("ollama/chat_stream_error.ndjson")

    assert ol.ChatResponse.model_validate(parts[0]).message.content == "The"
    with pytest.raises(ValidationError):
        ol.ChatResponse.model_validate(error_line)
    with pytest.raises(ValidationError):
        ol.GenerateResponse.model_validate(error_line)
    assert OllamaError.model_validate(error_line).error.startswith("an error was encountered")


@pytest.mark.parametrize(
    "value", ["yesterday", "2023-08-04T19:22:45", "2023-08-04", "", "2023-13-04T19:22:45Z"]
)
def test_created_at_must_be_rfc3339(value: str) -> None:
    with pytest.raises(ValidationError, match="RFC 3339"):
        ol.GenerateResponse(model="m", created_at=value, done=False)


def test_timestamp_now_is_rfc3339_utc() -> None:
    stamp = ol.timestamp_now()

    assert stamp.endswith("Z")
    assert datetime.fromisoformat(stamp).utcoffset() is not None
    assert ol.GenerateResponse(model="m", created_at=stamp, done=False).created_at == stamp


def test_tags_parse_with_the_ollama_types() -> None:
    documented = fixture("ollama/tags.json")

    ours = ol.ListResponse.model_validate(documented)
    official = ollama.ListResponse.model_validate(wire(ours))

    assert wire(ours) == documented
    assert [m.model for m in official.models] == ["deepseek-r1:latest", "llama3.2:latest"]
    first = official.models[0]
    assert first.size == 4683075271
    assert first.modified_at is not None
    assert first.modified_at.year == 2025
    assert first.details is not None
    assert (first.details.family, first.details.quantization_level) == ("qwen2", "Q4_K_M")
    assert ours.models[1].name == "llama3.2:latest"


def test_show_parses_with_the_ollama_types() -> None:
    documented = fixture("ollama/show.json")

    ours = ol.ShowResponse.model_validate(documented)
    official = ollama.ShowResponse.model_validate(wire(ours))

    assert official.modelinfo is not None
    assert official.modelinfo["llama.context_length"] == 8192
    assert official.capabilities == ["completion", "vision"]
    assert official.details is not None
    assert official.details.parameter_size == "8.0B"
    assert official.parameters == documented["parameters"]
    assert official.template == documented["template"]
    assert ours.model_info["general.architecture"] == "llama"


def test_minimal_show_still_parses_with_the_ollama_types() -> None:
    on_wire = wire(ol.ShowResponse())

    assert on_wire["model_info"] == {}
    assert ollama.ShowResponse.model_validate(on_wire).modelinfo == {}


def test_ps_parses_with_the_ollama_types() -> None:
    ours = ol.ProcessResponse.model_validate(fixture("ollama/ps.json"))
    official = ollama.ProcessResponse.model_validate(wire(ours))

    (model,) = official.models
    assert (model.name, model.size_vram, model.context_length) == (
        "mistral:latest",
        5137025024,
        4096,
    )
    assert model.expires_at is not None
    assert model.expires_at.hour == 14
    assert ours.models[0].expires_at == "2024-06-04T14:38:31.83753-07:00"


def test_version_fixture() -> None:
    assert ol.VersionResponse.model_validate(fixture("ollama/version.json")).version == "0.5.1"


# --- Ollama: the official client against our models ------------------------------------------


def ollama_client(handler: Callable[[httpx.Request], httpx.Response]) -> ollama.Client:
    return ollama.Client(host="http://wrapper.test", transport=httpx.MockTransport(handler))


def ndjson(lines: list[Any]) -> bytes:
    return b"".join(json.dumps(wire(line)).encode() + b"\n" for line in lines)


def test_official_ollama_client_chat_round_trip() -> None:
    seen: list[ol.ChatRequest] = []
    raw_image = b"\x89PNG\r\n\x1a\nnot-really-a-png"
    answer = ol.ChatResponse(
        model="llama3.2",
        created_at=ol.timestamp_now(),
        message=ol.Message(role="assistant", content='{"weather": "sunny"}', thinking="hmm"),
        done=True,
        done_reason="stop",
        total_duration=1_000,
        prompt_eval_count=10,
        eval_count=4,
        eval_duration=500,
        logprobs=[ol.Logprob(token="{", logprob=-0.1)],
    )

    def handler(request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.path) == ("POST", "/api/chat")
        seen.append(ol.ChatRequest.model_validate_json(request.content))
        return httpx.Response(200, json=wire(answer))

    result = ollama_client(handler).chat(
        model="llama3.2",
        messages=[
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": "Weather in Paris?", "images": [raw_image]},
        ],
        tools=[get_current_weather],
        format={"type": "object", "properties": {"weather": {"type": "string"}}},
        options=ollama.Options(temperature=0.1, num_ctx=2048, stop=["</s>"]),
        keep_alive="10m",
        think=True,
        logprobs=True,
        top_logprobs=3,
    )

    (request,) = seen
    assert request.stream is False
    assert [m.role for m in request.messages] == ["system", "user"]
    assert request.messages[1].images == [base64.b64encode(raw_image).decode()]
    assert request.tools is not None
    tool = request.tools[0].function
    assert tool.name == "get_current_weather"
    assert tool.parameters is not None
    assert set(tool.parameters["properties"]) == {"location", "unit"}
    assert request.format == {"type": "object", "properties": {"weather": {"type": "string"}}}
    assert request.options is not None
    assert (request.options.temperature, request.options.num_ctx) == (0.1, 2048)
    assert request.options.stop == ["</s>"]
    assert ol.keep_alive_seconds(request.keep_alive) == 600
    assert (request.think, request.logprobs, request.top_logprobs) == (True, True, 3)
    assert result.message.content == '{"weather": "sunny"}'
    assert result.message.thinking == "hmm"
    assert (result.done, result.done_reason, result.eval_count) == (True, "stop", 4)
    assert result.prompt_eval_duration is None
    assert result.logprobs is not None
    assert result.logprobs[0].token == "{"


def test_official_ollama_client_streams_our_chat_lines() -> None:
    seen: list[ol.ChatRequest] = []
    created = ol.timestamp_now()
    lines = [
        ol.ChatResponse(
            model="llama3.2",
            created_at=created,
            message=ol.Message(role="assistant", content=piece),
            done=False,
        )
        for piece in ("The", " sky")
    ] + [
        ol.ChatResponse(
            model="llama3.2",
            created_at=created,
            message=ol.Message(role="assistant"),
            done=True,
            done_reason="length",
            prompt_eval_count=26,
            eval_count=2,
        )
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(ol.ChatRequest.model_validate_json(request.read()))
        return httpx.Response(200, content=ndjson(lines))

    parts = list(
        ollama_client(handler).chat(
            model="llama3.2", messages=[{"role": "user", "content": "why?"}], stream=True
        )
    )

    assert seen[0].stream is True
    assert "".join(part.message.content or "" for part in parts) == "The sky"
    assert [part.done for part in parts] == [False, False, True]
    assert (parts[-1].done_reason, parts[-1].eval_count) == ("length", 2)


def test_official_ollama_client_generate_round_trip() -> None:
    seen: list[ol.GenerateRequest] = []
    answer = ol.GenerateResponse.model_validate(fixture("ollama/generate_response.json"))

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/generate"
        seen.append(ol.GenerateRequest.model_validate_json(request.content))
        return httpx.Response(200, json=wire(answer))

    result = ollama_client(handler).generate(
        model="llama3.2",
        prompt="Why is the sky blue?",
        system="Be terse.",
        context=[1, 2, 3],
        raw=False,
        images=[b"GIF89a"],
        options={"num_predict": 64, "seed": 3},
        keep_alive=0,
    )

    (request,) = seen
    assert (request.prompt, request.system, request.context) == (
        "Why is the sky blue?",
        "Be terse.",
        [1, 2, 3],
    )
    assert (request.stream, request.raw) == (False, False)
    assert request.images == [base64.b64encode(b"GIF89a").decode()]
    assert request.options is not None
    assert (request.options.num_predict, request.options.seed) == (64, 3)
    assert ol.keep_alive_seconds(request.keep_alive) == 0
    assert result.response == "The sky is blue because it is the color of the sky."
    assert (result.context, result.eval_count) == ([1, 2, 3], 290)


def test_official_ollama_client_raises_on_our_error_line() -> None:
    body = (DATA / "ollama/chat_stream_error.ndjson").read_bytes()
    client = ollama_client(lambda request: httpx.Response(200, content=body))

    stream = client.chat(model="llama3.2", messages=[{"role": "user", "content": "x"}], stream=True)
    first = next(stream)
    with pytest.raises(ollama.ResponseError, match="unexpected EOF"):
        next(stream)

    assert first.message.content == "The"


def test_official_ollama_client_reads_tags_show_ps() -> None:
    answers = {
        "/api/tags": ol.ListResponse.model_validate(fixture("ollama/tags.json")),
        "/api/show": ol.ShowResponse.model_validate(fixture("ollama/show.json")),
        "/api/ps": ol.ProcessResponse.model_validate(fixture("ollama/ps.json")),
    }
    shown: list[ol.ShowRequest] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/show":
            shown.append(ol.ShowRequest.model_validate_json(request.content))
        return httpx.Response(200, json=wire(answers[request.url.path]))

    client = ollama_client(handler)
    tags, show, ps = client.list(), client.show("llava"), client.ps()

    assert [m.model for m in tags.models] == ["deepseek-r1:latest", "llama3.2:latest"]
    assert show.modelinfo is not None
    assert show.modelinfo["general.parameter_count"] == 8030261248
    assert shown[0].model == "llava"
    assert [m.model for m in ps.models] == ["mistral:latest"]


# --- the published OpenAPI schemas -----------------------------------------------------------


def api_models() -> list[type]:
    return [
        model
        for module in (ol, oa)
        for model in vars(module).values()
        if isinstance(model, type)
        and issubclass(model, BaseModel)
        and model.__module__ == module.__name__
    ]


@pytest.mark.parametrize("model", api_models(), ids=lambda model: model.__name__)
def test_api_shapes_mark_no_field_they_may_leave_out_required(model) -> None:
    # They are served as Ollama and OpenAI serve them, without absent fields (exclude_none):
    # a field that can be None must not be one the schema requires.
    required_nullable = [
        name
        for name, field in model.model_fields.items()
        if field.is_required() and type(None) in typing.get_args(field.annotation)
    ]
    assert required_nullable == []


def wrapper_schema() -> dict:
    return create_wrapper_app(tlc_settings()).openapi()


def test_streaming_routes_publish_their_media_types() -> None:
    # Issue 13: NDJSON and SSE answers were served under a schema that said JSON only.
    paths = wrapper_schema()["paths"]
    media = {
        path: set(paths[path]["post"]["responses"]["200"]["content"])
        for path in paths
        if path in ("/api/chat", "/api/generate", "/v1/chat/completions")
    }
    assert media == {
        "/api/chat": {"application/json", "application/x-ndjson"},
        "/api/generate": {"application/json", "application/x-ndjson"},
        "/v1/chat/completions": {"application/json", "text/event-stream"},
    }


def test_errors_are_published_in_the_envelope_of_their_path() -> None:
    # Issue 13: 400 and 413 were not documented, and 422 had FastAPI's shape, not ours.
    schema = wrapper_schema()
    envelope = {
        path: {
            status: answer["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
            for status, answer in schema["paths"][path]["post"]["responses"].items()
            if status != "200"
        }
        for path in ("/api/chat", "/v1/chat/completions", "/validate_domain")
    }
    assert envelope == {
        # 502: an answer that ignored the JSON format asked (tests/test_tools.py)
        "/api/chat": dict.fromkeys(("400", "413", "422", "502", "503"), "OllamaError"),
        "/v1/chat/completions": dict.fromkeys(("400", "413", "422", "502", "503"), "ErrorEnvelope"),
        "/validate_domain": dict.fromkeys(("400", "413", "422", "503"), "ErrorEnvelope"),
    }
    assert "HTTPValidationError" not in schema["components"]["schemas"]
