"""The wrapper's OpenAI side, driven by the official ``openai`` client.

Only the Ollama backend is mocked (respx, with bodies as Ollama documents them); the
wrapper runs in-process with its lifespan, registering with the real registry app.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from schemas.ollama import Message
from services.wrapper.backend import RETRY_AFTER_SECONDS
from services.wrapper.translate import (
    CompletionTemplate,
    estimate_tokens,
    render_completion_prompt,
)
from tests.conftest import (
    BACKEND,
    CONTEXT,
    LIMIT,
    MODEL,
    BackendStream,
    make_settings,
    post_and_leave,
    read,
    read_lines,
    replaced,
    sent_json,
    streamed,
)


def sse_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line]


MESSAGES = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Why is the sky blue?"}]},
    {"role": "assistant", "content": "Scattering."},
    {"role": "user", "content": "Say more."},
]


# --- non-streamed ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_completion_comes_back_in_openai_shape_with_the_backend_counts(wrapper, backend):
    answer = read("chat_response.json")
    route = backend.post("/api/chat").respond(json=answer)
    completion = await wrapper.openai.chat.completions.create(model="any", messages=MESSAGES)

    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == answer["model"]
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == answer["message"]["content"]
    assert choice.finish_reason == "stop"
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        answer["prompt_eval_count"],
        answer["eval_count"],
    )
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    sent = sent_json(route)
    assert sent["model"] == MODEL  # the wrapper serves its model whatever the name asked
    assert sent["stream"] is False
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
    assert [m["content"] for m in sent["messages"]] == [
        "Be brief.",
        "Why is the sky blue?",
        "Scattering.",
        "Say more.",
    ]
    # Unset max_tokens: the wrapper's own limit bounds the answer.
    assert sent["options"] == {"num_predict": LIMIT}


@pytest.mark.anyio
async def test_sampling_parameters_become_ollama_options(wrapper, backend):
    route = backend.post("/api/chat").respond(json=read("chat_response.json"))
    await wrapper.openai.chat.completions.create(
        model="any",
        messages=MESSAGES,
        temperature=0.3,
        top_p=0.8,
        max_tokens=LIMIT // 2,
        max_completion_tokens=LIMIT // 4,  # wins over the deprecated max_tokens
        stop=["\n\n", "END"],
        seed=42,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
    )
    assert sent_json(route)["options"] == {
        "temperature": 0.3,
        "top_p": 0.8,
        "num_predict": LIMIT // 4,
        "stop": ["\n\n", "END"],
        "seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
    }
    await wrapper.openai.chat.completions.create(
        model="any", messages=MESSAGES, max_tokens=7, stop="END"
    )
    assert sent_json(route)["options"] == {"num_predict": 7, "stop": ["END"]}


@pytest.mark.anyio
async def test_response_format_becomes_the_ollama_format(wrapper, backend):
    # An answer in the format asked: the wrapper checks it (a 502 else).
    answer = replaced(read("chat_response.json"), ("message", "content"), '{"colour": "blue"}')
    route = backend.post("/api/chat").respond(json=answer)
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string"}},
        "required": ["colour"],
        "additionalProperties": False,
    }
    await wrapper.openai.chat.completions.create(
        model="any",
        messages=MESSAGES,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "colour", "schema": schema, "strict": True},
        },
    )
    assert sent_json(route)["format"] == schema
    await wrapper.openai.chat.completions.create(
        model="any", messages=MESSAGES, response_format={"type": "json_object"}
    )
    assert sent_json(route)["format"] == "json"
    await wrapper.openai.chat.completions.create(
        model="any", messages=MESSAGES, response_format={"type": "text"}
    )
    assert "format" not in sent_json(route)


@pytest.mark.anyio
async def test_logprobs_pass_through_both_ways(wrapper, backend):
    answer = read("chat_response_logprobs.json")
    route = backend.post("/api/chat").respond(json=answer)
    completion = await wrapper.openai.chat.completions.create(
        model="any", messages=MESSAGES, logprobs=True, top_logprobs=2
    )
    sent = sent_json(route)
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 2)
    got = completion.choices[0].logprobs.content
    # (the official ollama client keeps token and logprob, not Ollama's "bytes")
    assert [(t.token, t.logprob) for t in got] == [
        (t["token"], t["logprob"]) for t in answer["logprobs"]
    ]
    assert [[(top.token, top.logprob) for top in t.top_logprobs] for t in got] == [
        [(top["token"], top["logprob"]) for top in t["top_logprobs"]] for t in answer["logprobs"]
    ]


@pytest.mark.anyio
async def test_an_answer_cut_by_the_token_limit_finishes_with_length(wrapper, backend):
    answer = read("chat_response_length.json")
    backend.post("/api/chat").respond(json=answer)
    completion = await wrapper.openai.chat.completions.create(
        model="any", messages=MESSAGES, max_tokens=answer["eval_count"]
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == answer["eval_count"]


@pytest.mark.anyio
async def test_counts_the_backend_omits_are_estimated_never_zero(wrapper, backend):
    answer = read("chat_response_no_counts.json")
    assert "eval_count" not in answer
    assert "prompt_eval_count" not in answer
    backend.post("/api/chat").respond(json=answer)
    completion = await wrapper.openai.chat.completions.create(model="any", messages=MESSAGES)
    prompt = "\n".join(["Be brief.", "Why is the sky blue?", "Scattering.", "Say more."])
    assert completion.usage.prompt_tokens == estimate_tokens(prompt) > 0
    assert completion.usage.completion_tokens == estimate_tokens(answer["message"]["content"]) > 0


@pytest.mark.anyio
async def test_tool_calls_come_back_as_openai_tool_calls(wrapper, backend):
    answer = read("chat_response_tool_calls.json")
    route = backend.post("/api/chat").respond(json=answer)
    tool = {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        },
    }
    completion = await wrapper.openai.chat.completions.create(
        model="any", messages=MESSAGES, tools=[tool]
    )
    assert sent_json(route)["tools"][0]["function"]["name"] == "get_current_weather"
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    expected = answer["message"]["tool_calls"][0]["function"]
    assert call.function.name == expected["name"]
    assert json.loads(call.function.arguments) == expected["arguments"]
    assert call.id


# --- streamed ----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_stream_is_openai_chunks_ending_with_usage_when_asked(
    wrapper, backend, include_usage
):
    lines = read_lines("chat_stream.ndjson")
    route = backend.post("/api/chat").mock(side_effect=lambda _: streamed(lines))
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = await wrapper.openai.chat.completions.create(
        model="any", messages=MESSAGES, stream=True, **options
    )
    chunks = [chunk async for chunk in stream]

    assert sent_json(route)["stream"] is True
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(line["message"]["content"] for line in lines)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == ["stop"]
    assert finishes[-1] == "stop"
    final = lines[-1]
    if include_usage:
        assert chunks[-1].choices == []
        usage = chunks[-1].usage
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
            final["prompt_eval_count"],
            final["eval_count"],
            final["prompt_eval_count"] + final["eval_count"],
        )
        assert all(c.usage is None for c in chunks[:-1])
    else:
        assert all(c.usage is None and c.choices for c in chunks)


@pytest.mark.anyio
async def test_the_sse_stream_ends_with_done(wrapper, backend):
    backend.post("/api/chat").mock(side_effect=lambda _: streamed(read_lines("chat_stream.ndjson")))
    body = {"model": "any", "messages": MESSAGES, "stream": True}
    response = await wrapper.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    assert all(json.loads(event)["object"] == "chat.completion.chunk" for event in events[:-1])


@pytest.mark.anyio
async def test_a_stream_without_counts_counts_its_chunks(wrapper, backend):
    lines = read_lines("chat_stream_no_counts.ndjson")
    backend.post("/api/chat").mock(side_effect=lambda _: streamed(lines))
    stream = await wrapper.openai.chat.completions.create(
        model="any", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    content_chunks = [line for line in lines if line["message"]["content"]]
    prompt = "\n".join(["Be brief.", "Why is the sky blue?", "Scattering.", "Say more."])
    assert chunks[-1].usage.completion_tokens == len(content_chunks) > 0
    assert chunks[-1].usage.prompt_tokens == estimate_tokens(prompt)


@pytest.mark.anyio
async def test_a_stream_cut_by_the_limit_finishes_with_length(wrapper, backend):
    backend.post("/api/chat").mock(
        side_effect=lambda _: streamed(read_lines("chat_stream_length.ndjson"))
    )
    stream = await wrapper.openai.chat.completions.create(
        model="any", messages=MESSAGES, stream=True, max_tokens=2
    )
    finishes = [c.choices[0].finish_reason async for c in stream if c.choices]
    assert [f for f in finishes if f] == ["length"]


@pytest.mark.anyio
async def test_a_backend_failure_mid_stream_ends_with_an_error_event(wrapper, backend):
    lines = read_lines("chat_stream_error.ndjson")
    backend.post("/api/chat").mock(side_effect=lambda _: streamed(lines))
    body = {"model": "any", "messages": MESSAGES, "stream": True}
    response = await wrapper.http.post("/v1/chat/completions", json=body)
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert lines[-1]["error"] in error["message"]
    assert error["type"] == "service_unavailable"
    assert error["request_id"] == response.headers["x-request-id"]
    # the text before the failure was delivered, and no finish reason claims success
    chunks = [json.loads(event) for event in events[:-2]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "The"
    assert not any(c["choices"][0].get("finish_reason") for c in chunks)

    stream = await wrapper.openai.chat.completions.create(
        model="any", messages=MESSAGES, stream=True
    )
    with pytest.raises(openai.APIError, match="unexpected EOF"):
        _ = [chunk async for chunk in stream]


@pytest.mark.anyio
async def test_a_stream_the_backend_cuts_short_is_an_error_not_a_truncation(wrapper, backend):
    lines = [line for line in read_lines("chat_stream.ndjson") if not line["done"]]
    backend.post("/api/chat").mock(side_effect=lambda _: streamed(lines))
    body = {"model": "any", "messages": MESSAGES, "stream": True}
    events = sse_events((await wrapper.http.post("/v1/chat/completions", json=body)).text)
    assert events[-1] == "[DONE]"
    assert "ended the stream" in json.loads(events[-2])["error"]["message"]


@pytest.mark.anyio
@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_a_client_that_goes_away_stops_the_backend_stream(wrapper, backend, spec_version):
    """ASGI 2.3 servers (uvicorn) report the disconnect to ``receive``; from 2.4 ``send``
    fails (at the next token). Either way the wrapper closes the backend's stream."""
    tokens = [line for line in read_lines("chat_stream.ndjson") if not line["done"]]
    body = BackendStream(tokens, hang=True)  # then the model is still "generating"
    backend.post("/api/chat").respond(stream=body)
    request = {"model": "any", "messages": MESSAGES, "stream": True}
    records = []
    wrapper.app.state.wrapper.stats.report = records.append
    sent = await post_and_leave(wrapper.app, "/v1/chat/completions", request, spec_version)

    assert sent[0]["status"] == 200
    assert body.closed
    assert wrapper.app.state.wrapper.stats.in_flight == 0
    metrics = (await wrapper.http.get("/metrics")).text
    assert 'llm_errors_total{model="llama3.2",type="client_disconnected"} 1.0' in metrics
    # Not an error of the model: the call is recorded as cancelled, with what it used.
    (record,) = records
    assert record.status == "cancelled"
    assert 1 <= record.completion_tokens <= len(tokens)  # the tokens read before it stopped
    texts = "\n".join(["Be brief.", "Why is the sky blue?", "Scattering.", "Say more."])
    assert record.prompt_tokens == estimate_tokens(texts)  # Ollama reports it only at the end


# --- prompt style ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_completion_model_gets_a_rendered_raw_prompt(start_wrapper, backend):
    wrapper = await start_wrapper(make_settings(prompt_style="completion"))
    answer = read("generate_response.json")
    route = backend.post("/api/generate").respond(json=answer)
    completion = await wrapper.openai.chat.completions.create(
        model="any", messages=MESSAGES, stop="END"
    )
    sent = sent_json(route)
    assert sent["raw"] is True
    # the default template, as documented in translate.CompletionTemplate
    assert sent["prompt"] == (
        "Be brief.\n\nUser: Why is the sky blue?\nAssistant: Scattering.\nUser: Say more.\n"
        "Assistant:"
    )
    assert sent["options"]["stop"] == ["END", *CompletionTemplate().stop]
    assert completion.choices[0].message.content == answer["response"]
    assert completion.usage.completion_tokens == answer["eval_count"]


@pytest.mark.anyio
async def test_the_completion_template_comes_from_the_profile(start_wrapper, backend):
    template = {
        "system": "<s>{content}</s>",
        "user": "Q: {content}\n",
        "assistant": "A: {content}\n",
        "generation": "A:",
        "stop": ["\nQ:"],
    }
    settings = make_settings(prompt_style="completion", prompts={"completion": template})
    wrapper = await start_wrapper(settings)
    route = backend.post("/api/generate").respond(json=read("generate_response.json"))
    await wrapper.openai.chat.completions.create(model="any", messages=MESSAGES)
    messages = [
        Message(role="system", content="Be brief."),
        Message(role="user", content="Why is the sky blue?"),
        Message(role="assistant", content="Scattering."),
        Message(role="user", content="Say more."),
    ]
    expected = render_completion_prompt(messages, CompletionTemplate(**template))
    assert sent_json(route)["prompt"] == expected
    assert expected.startswith("<s>Be brief.</s>Q: Why")
    assert expected.endswith("\nA:")
    assert sent_json(route)["options"]["stop"] == ["\nQ:"]


def test_a_bad_completion_template_stops_the_start():
    with pytest.raises(ValueError, match="content"):
        make_settings(prompts={"completion": {"user": "Q: no placeholder"}})


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_over_the_limit_is_served_up_to_the_limit(wrapper, backend, field):
    route = backend.post("/api/chat").respond(json=read("chat_response.json"))
    await wrapper.openai.chat.completions.create(
        model="any", messages=MESSAGES, **{field: LIMIT + 1}
    )
    assert sent_json(route)["options"]["num_predict"] == LIMIT


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_an_image_whose_base64_is_not_ascii_is_a_400_not_a_500(wrapper, backend, stream):
    # Issue 13: this made the wrapper answer 500, which opened the router's circuit.
    route = backend.post("/api/chat").respond(json=read("chat_response.json"))
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,é"}}
    message = {"role": "user", "content": [{"type": "text", "text": "what is it?"}, image]}
    body = {"model": "any", "messages": [message], "stream": stream}
    response = await wrapper.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert "base64" in response.json()["error"]["message"]
    assert not route.called


@pytest.mark.anyio
async def test_a_prompt_over_the_context_is_refused(wrapper, backend):
    route = backend.post("/api/chat").respond(json=read("chat_response.json"))
    # the smaller of the configured (4096) and the measured (show.json: 8192) context
    long = "x" * ((CONTEXT + 1) * 4)
    with pytest.raises(openai.BadRequestError) as refused:
        await wrapper.openai.chat.completions.create(
            model="any", messages=[{"role": "user", "content": long}]
        )
    assert refused.value.body["code"] == "context_length_exceeded"
    assert str(CONTEXT) in refused.value.body["message"]
    assert not route.called


@pytest.mark.anyio
async def test_the_backends_own_context_error_is_a_400(wrapper, backend):
    backend.post("/api/chat").respond(400, json=read("error_context_length.json"))
    with pytest.raises(openai.BadRequestError) as refused:
        await wrapper.openai.chat.completions.create(model="any", messages=MESSAGES)
    assert refused.value.body["code"] == "context_length_exceeded"


@pytest.mark.anyio
async def test_a_body_over_the_limit_is_413(start_wrapper):
    wrapper = await start_wrapper(make_settings(max_body_bytes=2_048))
    messages = [{"role": "user", "content": "x" * 4_096}]
    with pytest.raises(openai.APIStatusError) as refused:
        await wrapper.openai.chat.completions.create(model="any", messages=messages)
    assert refused.value.status_code == 413
    assert refused.value.body["code"] == "payload_too_large"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"messages": []}, "messages"),
        ({"temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ],
)
async def test_invalid_input_is_a_422_envelope(wrapper, change, param):
    body = {"model": "any", "messages": MESSAGES} | change
    response = await wrapper.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith(param)
    assert error["request_id"] == response.headers["x-request-id"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("content", "status"), [(b"", 400), (b"{not json", 400), (b"[]", 422), (b'"hi"', 422)]
)
async def test_a_body_that_is_not_json_is_a_400_and_json_not_an_object_a_422(
    wrapper, backend, content, status
):
    # One status per kind on every daemon (issue 13): 400 as OpenAI answers a body that
    # does not parse; 422 for JSON that fails validation.
    route = backend.post("/api/chat")
    headers = {"Content-Type": "application/json"}
    response = await wrapper.http.post("/v1/chat/completions", content=content, headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert not route.called


@pytest.mark.anyio
async def test_a_down_backend_is_a_503_and_the_wrapper_stays_up(wrapper, backend):
    backend.post("/api/chat").mock(side_effect=httpx.ConnectError("connection refused"))
    with pytest.raises(openai.APIStatusError) as failed:
        await wrapper.openai.chat.completions.create(model="any", messages=MESSAGES)
    assert failed.value.status_code == 503
    assert BACKEND in failed.value.body["message"]
    assert failed.value.body["code"] == "backend_unavailable"
    assert failed.value.response.headers["retry-after"]
    with pytest.raises(openai.APIStatusError) as streamed_failure:
        await wrapper.openai.chat.completions.create(model="any", messages=MESSAGES, stream=True)
    assert streamed_failure.value.status_code == 503
    assert (await wrapper.http.get("/info")).status_code == 200


@pytest.mark.anyio
async def test_a_missing_model_is_a_503_that_says_so(wrapper, backend):
    backend.post("/api/chat").respond(404, json=read("error_model_not_found.json"))
    with pytest.raises(openai.APIStatusError) as failed:
        await wrapper.openai.chat.completions.create(model="any", messages=MESSAGES, stream=True)
    assert failed.value.status_code == 503
    assert failed.value.body["code"] == "model_not_found"
    assert MODEL in failed.value.body["message"]


@pytest.mark.anyio
async def test_a_busy_backend_is_a_503_to_retry(wrapper, backend):
    busy = read("error_busy.json")
    backend.post("/api/chat").respond(503, json=busy)
    with pytest.raises(openai.APIStatusError) as failed:
        await wrapper.openai.chat.completions.create(model="any", messages=MESSAGES)
    assert failed.value.status_code == 503
    assert failed.value.body["code"] == "backend_busy"
    assert busy["error"] in failed.value.body["message"]
    assert failed.value.response.headers["retry-after"]


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_a_busy_backends_retry_after_is_passed_on(wrapper, backend, stream):
    busy = read("error_busy.json")
    route = backend.post("/api/chat").respond(503, json=busy, headers={"Retry-After": "7"})
    with pytest.raises(openai.APIStatusError) as failed:
        await wrapper.openai.chat.completions.create(model="any", messages=MESSAGES, stream=stream)
    assert failed.value.status_code == 503
    assert failed.value.response.headers["retry-after"] == "7"
    assert failed.value.body["code"] == "backend_busy"
    route.respond(503, json=busy)  # Ollama's own 503 says nothing: the wrapper's constant
    with pytest.raises(openai.APIStatusError) as failed:
        await wrapper.openai.chat.completions.create(model="any", messages=MESSAGES, stream=stream)
    assert failed.value.response.headers["retry-after"] == RETRY_AFTER_SECONDS


@pytest.mark.anyio
async def test_the_request_id_goes_to_the_backend_and_back(wrapper, backend):
    route = backend.post("/api/chat").respond(json=read("chat_response.json"))
    raw = await wrapper.openai.chat.completions.with_raw_response.create(
        model="any", messages=MESSAGES, extra_headers={"X-Request-ID": "trace-42"}
    )
    assert raw.headers["x-request-id"] == "trace-42"
    assert route.calls.last.request.headers["x-request-id"] == "trace-42"
    # without one, the wrapper makes one and still passes it on
    response = await wrapper.http.post(
        "/v1/chat/completions", json={"model": "any", "messages": MESSAGES}
    )
    made = response.headers["x-request-id"]
    assert made
    assert route.calls.last.request.headers["x-request-id"] == made


@pytest.mark.anyio
async def test_the_models_list_names_the_model_served(wrapper):
    models = await wrapper.openai.models.list()
    assert [model.id for model in models.data] == [MODEL]
