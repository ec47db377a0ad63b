"""The wrapper's Ollama side (driven by the official ``ollama`` client), health, info and
metrics. Only the Ollama backend is mocked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re

import httpx
import httpx2
import ollama
import openai
import pytest

from schemas import ollama as api
from services.common.errors import BadRequest, ServiceUnavailable
from services.wrapper.aiohttp_client import ollama_client
from services.wrapper.app import create_app
from services.wrapper.backend import RETRY_AFTER_CAP, RETRY_AFTER_SECONDS, Backend
from services.wrapper.translate import estimate_tokens
from tests.conftest import (
    BACKEND,
    CONTEXT,
    LIMIT,
    MODEL,
    make_settings,
    read,
    read_lines,
    replaced,
    sent_json,
    streamed,
    streamed_or_whole,
)

pytestmark = pytest.mark.anyio

PROMPT = [{"role": "user", "content": "why is the sky blue?"}]


def ndjson(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line]


async def read_all(parts):
    return [part async for part in parts]


def without_none(data):
    """What the wrapper writes: Ollama's answer without its nulls."""
    if isinstance(data, dict):
        return {k: without_none(v) for k, v in data.items() if v is not None}
    return data


# --- model calls -----------------------------------------------------------------------------


async def test_chat_through_the_official_client_is_the_backends_answer(wrapper, backend):
    answer = read("chat_response.json")
    route = backend.post("/api/chat").respond(json=answer)
    got = await wrapper.ollama.chat(model="whatever", messages=PROMPT, options={"seed": 7})
    assert without_none(got.model_dump(exclude={"message"})) == {
        k: v for k, v in answer.items() if k != "message"
    }
    assert got.message.content == answer["message"]["content"]
    sent = sent_json(route)
    assert sent["model"] == MODEL
    assert sent["messages"] == PROMPT
    assert sent["options"] == {"seed": 7, "num_predict": LIMIT}


async def test_chat_streams_ndjson_by_default_as_ollama_does(wrapper, backend):
    lines = read_lines("chat_stream.ndjson")
    route = backend.post("/api/chat").mock(side_effect=lambda _: streamed(lines))
    response = await wrapper.http.post("/api/chat", json={"model": MODEL, "messages": PROMPT})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert sent_json(route)["stream"] is True
    assert ndjson(response.text) == [without_none(line) for line in lines]

    parts = [part async for part in await wrapper.ollama.chat(MODEL, PROMPT, stream=True)]
    assert [p.message.content for p in parts] == [line["message"]["content"] for line in lines]
    assert parts[-1].done
    assert parts[-1].eval_count == lines[-1]["eval_count"]


@pytest.mark.parametrize("path", ["/api/generate", "/generate"])
async def test_generate_streams_and_answers_whole(wrapper, backend, path):
    lines = read_lines("generate_stream.ndjson")
    answer = read("generate_response.json")
    route = backend.post("/api/generate").mock(side_effect=streamed_or_whole(lines, answer))
    response = await wrapper.http.post(path, json={"model": MODEL, "prompt": "Why?"})
    assert ndjson(response.text) == lines
    whole = await wrapper.http.post(path, json={"model": MODEL, "prompt": "Why?", "stream": False})
    assert whole.json() == answer
    assert sent_json(route) | {"prompt": "Why?"} == sent_json(route)

    got = await wrapper.ollama.generate(MODEL, "Why?", options={"num_predict": 3})
    assert got.response == answer["response"]
    assert sent_json(route)["options"] == {"num_predict": 3}


async def test_generate_passes_raw_format_and_logprobs_on(wrapper, backend):
    # An answer in the format asked: the wrapper checks it (a 502 else).
    answer = replaced(read("generate_response_logprobs.json"), ("response",), '{"age": 22}')
    route = backend.post("/api/generate").respond(json=answer)
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
    got = await wrapper.ollama.generate(
        MODEL, "[INST] hi [/INST]", raw=True, format=schema, logprobs=True, top_logprobs=2
    )
    sent = sent_json(route)
    assert (sent["raw"], sent["format"], sent["logprobs"], sent["top_logprobs"]) == (
        True,
        schema,
        True,
        2,
    )
    assert [(lp.token, lp.logprob) for lp in got.logprobs] == [
        (lp["token"], lp["logprob"]) for lp in answer["logprobs"]
    ]


async def test_a_completion_model_answers_chat_in_chat_shape(start_wrapper, backend):
    wrapper = await start_wrapper(make_settings(prompt_style="completion"))
    lines = read_lines("generate_stream.ndjson")
    route = backend.post("/api/generate").mock(side_effect=lambda _: streamed(lines))
    parts = [part async for part in await wrapper.ollama.chat(MODEL, PROMPT, stream=True)]
    sent = sent_json(route)
    assert sent["raw"] is True
    assert sent["prompt"] == f"User: {PROMPT[0]['content']}\nAssistant:"
    assert [p.message.content for p in parts] == [line["response"] for line in lines]
    assert all(p.message.role == "assistant" for p in parts)
    assert parts[-1].eval_count == lines[-1]["eval_count"]


async def test_a_backend_failure_mid_stream_ends_with_an_error_line(wrapper, backend):
    lines = read_lines("generate_stream_error.ndjson")
    backend.post("/api/generate").mock(side_effect=lambda _: streamed(lines))
    response = await wrapper.http.post("/api/generate", json={"model": MODEL, "prompt": "Why?"})
    got = ndjson(response.text)
    assert got[0] == lines[0]
    assert got[-1].keys() == {"error"}
    assert lines[-1]["error"] in got[-1]["error"]

    with pytest.raises(ollama.ResponseError, match="unexpected EOF"):
        async for _ in await wrapper.ollama.generate(MODEL, "Why?", stream=True):
            pass


async def test_a_request_the_client_refuses_to_send_is_the_callers_400_not_the_backends_503():
    backend = Backend(ollama.AsyncClient(BACKEND), url=BACKEND, model=MODEL)
    # ollama-python validates a request before it sends it; what it refuses never reached
    # the backend, so a router must not count it against the backend (issue 13)
    with pytest.raises(BadRequest) as refused:
        await backend._call(backend.client.generate(model=MODEL, prompt="hi", keep_alive=10**400))
    assert refused.value.status_code == 400
    assert "keep_alive" in refused.value.message


async def test_a_down_backend_is_a_503_ollama_error(wrapper, backend):
    backend.post("/api/chat").mock(side_effect=httpx.ConnectError("connection refused"))
    with pytest.raises(ollama.ResponseError) as failed:
        await wrapper.ollama.chat(MODEL, PROMPT)
    assert failed.value.status_code == 503
    assert BACKEND in failed.value.error
    response = await wrapper.http.post("/api/chat", json={"model": MODEL, "messages": PROMPT})
    assert response.status_code == 503
    assert response.json().keys() == {"error"}


async def test_a_busy_backend_is_a_503_ollama_error(wrapper, backend):
    backend.post("/api/generate").respond(503, json=read("error_busy.json"))
    with pytest.raises(ollama.ResponseError) as failed:
        await wrapper.ollama.generate(MODEL, "Why?")
    assert failed.value.status_code == 503
    assert "server busy" in failed.value.error


@pytest.mark.parametrize("stream", [False, True])
async def test_a_busy_backends_retry_after_is_passed_on(wrapper, backend, stream):
    busy = read("error_busy.json")
    route = backend.post("/api/chat").respond(503, json=busy, headers={"Retry-After": "7"})
    body = {"model": MODEL, "messages": PROMPT, "stream": stream}
    response = await wrapper.http.post("/api/chat", json=body)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert response.json() == {"error": response.json()["error"]}
    assert busy["error"] in response.json()["error"]
    route.respond(503, json=busy)  # Ollama's own 503 says nothing: the wrapper's constant
    response = await wrapper.http.post("/api/chat", json=body)
    assert response.headers["retry-after"] == RETRY_AFTER_SECONDS


@pytest.mark.parametrize(
    ("asked", "passed"),
    [("12", "12"), (" 0 ", "0"), ("99999", str(RETRY_AFTER_CAP)), ("-3", None), ("soon", None)],
)
async def test_only_a_whole_number_of_seconds_is_passed_on_capped(wrapper, backend, asked, passed):
    backend.post("/api/generate").respond(
        503, json={"error": "busy"}, headers={"Retry-After": asked}
    )
    response = await wrapper.http.post("/api/generate", json={"model": MODEL, "prompt": "Why?"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == (passed or RETRY_AFTER_SECONDS)


async def test_a_missing_model_is_a_503_naming_it(wrapper, backend):
    backend.post("/api/generate").respond(404, json=read("error_model_not_found.json"))
    with pytest.raises(ollama.ResponseError) as failed:
        async for _ in await wrapper.ollama.generate(MODEL, "Why?", stream=True):
            pass
    assert failed.value.status_code == 503
    assert MODEL in failed.value.error
    assert "not found" in failed.value.error


async def test_num_predict_over_the_limit_or_unbounded_is_served_up_to_the_limit(wrapper, backend):
    route = backend.post("/api/generate").respond(json=read("generate_response.json"))
    for asked in (LIMIT + 1, -1, -2):  # over it, "no limit", "fill the context"
        body = {
            "model": MODEL,
            "prompt": "Why?",
            "stream": False,
            "options": {"num_predict": asked},
        }
        assert (await wrapper.http.post("/api/generate", json=body)).is_success
        assert sent_json(route)["options"]["num_predict"] == LIMIT
    body["options"]["num_predict"] = LIMIT - 1
    assert (await wrapper.http.post("/api/generate", json=body)).is_success
    assert sent_json(route)["options"]["num_predict"] == LIMIT - 1


async def test_invalid_input_is_a_422_ollama_error(wrapper):
    response = await wrapper.http.post("/api/chat", json={"model": MODEL, "stream": "yes"})
    assert response.status_code == 422
    assert isinstance(response.json()["error"], str)
    assert "stream" in response.json()["error"]


async def test_a_body_that_is_not_json_is_a_400_ollama_error(wrapper):
    # As Ollama answers it (shared/ollama-samples/error_bad_json.txt), on every path.
    for path in ("/api/chat", "/api/generate", "/api/show"):
        response = await wrapper.http.post(path, content=b"{bad")
        assert response.status_code == 400
        assert response.json()["error"].startswith("the body is not valid JSON")


async def test_images_go_to_the_backend_as_base64_never_as_paths(wrapper, backend):
    route = backend.post("/api/chat").respond(json=read("chat_response.json"))
    image = read("generate_request_full.json")["images"][0]
    message = {"role": "user", "content": "what is it?", "images": [image]}
    response = await wrapper.http.post(
        "/api/chat", json={"model": MODEL, "messages": [message], "stream": False}
    )
    assert response.is_success
    assert sent_json(route)["messages"][0]["images"] == [image]
    # a string naming a local file is sent as the base64 it is, never read from disk
    message["images"] = ["/etc//passwd"]
    response = await wrapper.http.post(
        "/api/chat", json={"model": MODEL, "messages": [message], "stream": False}
    )
    assert response.is_success
    assert sent_json(route)["messages"][0]["images"] == ["/etc//passwd"]
    # and what is not base64 is refused
    message["images"] = ["not base64!"]
    response = await wrapper.http.post(
        "/api/chat", json={"model": MODEL, "messages": [message], "stream": False}
    )
    assert response.status_code == 400
    assert "base64" in response.json()["error"]
    assert route.call_count == 2


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_image_that_is_not_ascii_is_a_400_not_a_500(wrapper, backend, path, stream):
    # Issue 13: "é" in the base64 made the wrapper answer 500, which opened the router's
    # circuit for every caller.
    routes = [backend.post(p).respond(json={}) for p in ("/api/chat", "/api/generate")]
    body = {"model": MODEL, "stream": stream, "images": ["é"], "prompt": "what is it?"}
    if path == "/api/chat":
        message = {"role": "user", "content": "what is it?", "images": ["é"]}
        body = {"model": MODEL, "stream": stream, "messages": [message]}
    response = await wrapper.http.post(path, json=body)
    assert response.status_code == 400
    assert "base64" in response.json()["error"]
    assert not any(route.called for route in routes)


# --- metadata ------------------------------------------------------------------------------


async def test_tags_list_the_model_served(wrapper):
    listing = await wrapper.ollama.list()
    assert [m.model for m in listing.models] == [f"{MODEL}:latest"]
    served = next(m for m in read("tags.json")["models"] if m["model"] == f"{MODEL}:latest")
    assert listing.models[0].digest == served["digest"]
    raw = (await wrapper.http.get("/api/tags")).json()["models"][0]
    assert raw["name"] == served["name"]
    assert raw["size"] == served["size"]


async def test_version_show_and_ps_pass_through(wrapper, backend):
    assert (await wrapper.http.get("/api/version")).json() == read("version.json")
    shown = await wrapper.ollama.show(MODEL)
    assert sent_json(backend.routes["show"])["model"] == MODEL
    assert shown.modelinfo == read("show.json")["model_info"]
    assert shown.details.quantization_level == read("show.json")["details"]["quantization_level"]
    running = await wrapper.ollama.ps()
    assert running.models[0].context_length == read("ps.json")["models"][0]["context_length"]


# --- health and info -----------------------------------------------------------------------


async def test_health_is_healthy_when_the_backend_has_the_model(wrapper):
    response = await wrapper.http.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert (body["service"], body["port"], body["model"]) == ("reasoner", 8050, MODEL)
    assert body["ollama_backend"] == BACKEND
    assert body["model_loaded"] is True
    wrapper.clock.advance(12.5)
    later = (await wrapper.http.get("/health")).json()["uptime_seconds"]
    assert later == pytest.approx(body["uptime_seconds"] + 12.5)


async def test_health_is_unhealthy_when_the_backend_is_down(wrapper, backend):
    backend.routes["tags"].mock(side_effect=httpx.ConnectError("connection refused"))
    response = await wrapper.http.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["model_loaded"] is False
    assert BACKEND in body["reason"]
    assert "unreachable" in body["reason"]


async def test_health_is_unhealthy_when_the_model_is_missing(wrapper, backend):
    others = [m for m in read("tags.json")["models"] if not m["model"].startswith(MODEL)]
    backend.routes["tags"].respond(json={"models": others})
    response = await wrapper.http.get("/health")
    assert response.status_code == 503
    assert response.json()["model_loaded"] is False
    assert MODEL in response.json()["reason"]


async def test_info_reports_the_models_facts_from_the_backend(wrapper):
    shown = read("show.json")
    info = (await wrapper.http.get("/info")).json()
    architecture = shown["model_info"]["general.architecture"]
    assert info["model"] == {
        "name": MODEL,
        "parameters": shown["details"]["parameter_size"],
        "quantization": shown["details"]["quantization_level"],
        "context_length": shown["model_info"][f"{architecture}.context_length"],
        "embedding_dim": shown["model_info"][f"{architecture}.embedding_length"],
    }
    assert info["capabilities"] == ["reasoning", "planning"]
    assert {"/v1/chat/completions", "/api/chat", "/api/generate", "/health"} <= set(
        info["endpoints"]
    )
    assert info["performance"] == {
        "avg_throughput_tok_s": None,
        "avg_latency_ms": None,
        "p95_latency_ms": None,
    }


async def test_info_falls_back_to_the_profile_while_the_backend_is_down(wrapper, backend):
    backend.routes["show"].mock(side_effect=httpx.ConnectError("connection refused"))
    wrapper.app.state.wrapper.backend.facts = None
    info = await wrapper.http.get("/info")
    assert info.status_code == 200
    assert info.json()["model"] == {
        "name": MODEL,
        "parameters": None,
        "quantization": None,
        "context_length": CONTEXT,
        "embedding_dim": None,
    }


async def test_info_performance_is_measured_from_the_calls(wrapper, backend):
    answer = read("chat_response.json")
    latencies = [0.2, 0.6, 1.0]
    pending = list(latencies)

    def slow_backend(_: httpx.Request) -> httpx.Response:
        wrapper.clock.advance(pending.pop(0))  # the backend takes its time
        return httpx.Response(200, json=answer)

    backend.post("/api/chat").mock(side_effect=slow_backend)
    seen = []
    for _ in latencies:
        await wrapper.ollama.chat(MODEL, PROMPT)
        seen.append((await wrapper.http.get("/info")).json()["performance"])

    for count, performance in enumerate(seen, start=1):
        window = sorted(latencies[:count])
        assert performance["avg_latency_ms"] == pytest.approx(sum(window) / count * 1000)
        assert performance["p95_latency_ms"] == pytest.approx(window[-1] * 1000)
        assert performance["avg_throughput_tok_s"] == pytest.approx(
            answer["eval_count"] * count / sum(window), rel=1e-3
        )
    assert len({p["avg_latency_ms"] for p in seen}) == len(latencies)


# --- metrics -------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    wanted = {"model": MODEL} | labels
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            if all(found.get(k) == v for k, v in wanted.items()):
                return float(match.group(2))
    return 0.0


async def test_metrics_count_requests_tokens_and_errors(wrapper, backend):
    whole = read("chat_response.json")
    lines = read_lines("chat_stream_no_counts.ndjson")
    backend.post("/api/chat").mock(side_effect=streamed_or_whole(lines, whole))
    await wrapper.ollama.chat(MODEL, PROMPT)
    stream = await wrapper.openai.chat.completions.create(model="x", messages=PROMPT, stream=True)
    _ = [chunk async for chunk in stream]
    backend.post("/api/chat").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(ollama.ResponseError):
        await wrapper.ollama.chat(MODEL, PROMPT)

    text = (await wrapper.http.get("/metrics")).text
    streamed_tokens = len([line for line in lines if line["message"]["content"]])
    prompt_estimate = estimate_tokens(PROMPT[0]["content"])
    assert metric(text, "llm_input_tokens_total") == whole["prompt_eval_count"] + prompt_estimate
    assert metric(text, "llm_output_tokens_total") == whole["eval_count"] + streamed_tokens
    assert metric(text, "llm_requests_total", api="ollama_chat", status="ok") == 1
    assert metric(text, "llm_requests_total", api="openai", stream="true", status="ok") == 1
    assert metric(text, "llm_requests_total", api="ollama_chat", status="error") == 1
    assert metric(text, "llm_errors_total", type="backend_unavailable") == 1
    assert metric(text, "llm_request_duration_seconds_count", api="ollama_chat") == 1
    assert metric(text, "llm_time_to_first_token_seconds_count", api="openai") == 1
    assert metric(text, "llm_active_requests") == 0
    assert metric(text, "llm_cost_total") == 0  # a local model costs nothing
    # buckets reach minutes: LLM calls are not web requests
    assert 'llm_request_duration_seconds_bucket{api="openai",le="300.0"' in text.replace(
        'model="llama3.2",', ""
    )


async def test_prompt_cache_use_is_reported_per_backend_in_info_and_metrics(wrapper, backend):
    """What the backend read from its prompt cache (Ollama's prompt_eval_cached_count),
    passed on to the caller and summed; a backend that does not say is counted apart."""
    whole = read("chat_response.json") | {"prompt_eval_count": 40, "prompt_eval_cached_count": 30}
    lines = read_lines("chat_stream.ndjson")
    lines[-1] |= {"prompt_eval_count": 40, "prompt_eval_cached_count": 10}
    backend.post("/api/chat").mock(side_effect=streamed_or_whole(lines, whole))
    answer = (
        await wrapper.http.post(
            "/api/chat", json={"model": MODEL, "messages": PROMPT, "stream": False}
        )
    ).json()
    assert (answer["prompt_eval_count"], answer["prompt_eval_cached_count"]) == (40, 30)
    streamed_answer = ndjson(
        (await wrapper.http.post("/api/chat", json={"model": MODEL, "messages": PROMPT})).text
    )
    assert streamed_answer[-1]["prompt_eval_cached_count"] == 10
    silent = read("chat_response.json") | {"prompt_eval_count": 20}  # an Ollama that does not say
    backend.post("/api/chat").mock(return_value=httpx.Response(200, json=silent))
    await wrapper.ollama.chat(MODEL, PROMPT)

    info = (await wrapper.http.get("/info")).json()["prompt_cache"]
    assert info == {
        "backend": BACKEND,
        "calls": 3,
        "calls_reporting": 2,
        "prompt_tokens": 80,
        "cached_tokens": 40,
        "cached_share": 0.5,
    }
    text = (await wrapper.http.get("/metrics")).text
    tokens = {
        result: metric(text, "llm_prompt_cache_tokens_total", backend=BACKEND, result=result)
        for result in ("cached", "evaluated", "unreported")
    }
    assert tokens == {"cached": 40, "evaluated": 40, "unreported": 20}


async def test_cost_follows_the_configured_price(start_wrapper, backend):
    wrapper = await start_wrapper(make_settings(cost_per_1k_tokens=0.5))
    answer = read("chat_response.json")
    backend.post("/api/chat").respond(json=answer)
    await wrapper.ollama.chat(MODEL, PROMPT)
    text = (await wrapper.http.get("/metrics")).text
    tokens = answer["prompt_eval_count"] + answer["eval_count"]
    assert metric(text, "llm_cost_total") == pytest.approx(tokens / 1000 * 0.5)


# --- the wrapper's own backend client (aiohttp pool) against a real server --------------


class OllamaServer:
    """A small real Ollama-API server on a loopback port: canned answers, NDJSON streams
    paced by the test, and a record of connections and requests."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.release = asyncio.Event()  # a paced stream waits for it after its first line
        self.pace = False
        self.close_after_answer = False
        self.silent = False
        self.busy_retry_after: str | None = None  # /api/chat answers 503 with it when set
        self.stream_lines = read_lines("chat_stream.ndjson")
        self.handlers: set[asyncio.Task] = set()

    async def __aenter__(self) -> OllamaServer:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        # Python 3.11's server leaves its connection handlers running: end them here.
        for handler in self.handlers:
            handler.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 1)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.handlers.add(asyncio.current_task())
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *fields = head.decode().split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (f.partition(":") for f in fields)
                    if k
                }
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                method, path, _ = line.split(" ")
                self.requests.append((path, headers, body))
                if self.silent:
                    await asyncio.Event().wait()
                await self.answer(writer, method, path, json.loads(body) if body else {})
                if self.close_after_answer:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def answer(self, writer, method: str, path: str, body: dict) -> None:
        if path == "/api/tags":
            return self.send_json(writer, read("tags.json"))
        if path == "/api/show":
            return self.send_json(writer, read("show.json"))
        if path != "/api/chat":
            return self.send_json(writer, {"error": "not found"}, status=404)
        if self.busy_retry_after is not None:
            headers = {"Retry-After": self.busy_retry_after}
            return self.send_json(writer, read("error_busy.json"), status=503, headers=headers)
        if not body.get("stream", True):
            return self.send_json(writer, read("chat_response.json"))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for index, line in enumerate(self.stream_lines):
            data = json.dumps(line).encode() + b"\n"
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            if index == 0 and self.pace:
                await self.release.wait()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    @staticmethod
    def send_json(writer, data: dict, status: int = 200, headers: dict | None = None) -> None:
        body = json.dumps(data).encode()
        reason = b"OK" if status == 200 else b"Not Found"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
        writer.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, reason, len(body), extra, body)
        )


def backend_client(url: str, read_timeout: float = 5.0) -> ollama.AsyncClient:
    return ollama_client(url, connect_timeout=1.0, read_timeout=read_timeout)


async def test_the_backend_client_keeps_connections_alive():
    async with OllamaServer() as server:
        client = backend_client(server.url)
        answers = [await client.chat(MODEL, PROMPT) for _ in range(3)]
        await client.close()
    assert [a.message.content for a in answers] == [
        read("chat_response.json")["message"]["content"]
    ] * 3
    assert server.connections == 1
    path, headers, body = server.requests[0]
    assert path == "/api/chat"
    assert json.loads(body)["messages"] == PROMPT
    assert headers["content-type"] == "application/json"


async def test_the_backend_client_streams_chunks_as_they_come():
    async with OllamaServer() as server:
        server.pace = True  # the server sends the rest only once the first chunk arrived
        client = backend_client(server.url)
        parts = []
        async with asyncio.timeout(5):  # a transport that buffered would wait for ever
            async for part in await client.chat(MODEL, PROMPT, stream=True):
                parts.append(part)
                server.release.set()
        await client.chat(MODEL, PROMPT)  # and the connection is reused after a stream
        await client.close()
    assert [p.message.content for p in parts] == [
        line["message"]["content"] for line in read_lines("chat_stream.ndjson")
    ]
    assert server.connections == 1


async def test_the_backend_client_replaces_a_connection_the_server_closed():
    async with OllamaServer() as server:
        server.close_after_answer = True
        client = backend_client(server.url)
        for _ in range(3):
            await client.chat(MODEL, PROMPT)
            await asyncio.sleep(0.01)
        await client.close()
    assert server.connections == 3


async def test_the_backend_client_reads_ndjson_lines_of_any_length():
    async with OllamaServer() as server:
        *parts, final = read_lines("chat_stream.ndjson")
        long_piece = "word " * 40_000  # 200 kB on one line
        server.stream_lines = [
            *parts,
            parts[0] | {"message": {"role": "assistant", "content": long_piece}},
            final,
        ]
        client = backend_client(server.url)
        received = [part async for part in await client.chat(MODEL, PROMPT, stream=True)]
        await client.close()
    assert received[-2].message.content == long_piece
    assert len(received) == len(server.stream_lines)


async def test_the_backend_client_drops_the_connection_of_a_stream_left_early():
    async with OllamaServer() as server:
        server.pace = True  # the server holds the rest of the stream
        client = backend_client(server.url)
        parts = await client.chat(MODEL, PROMPT, stream=True)
        await anext(parts)
        await parts.aclose()  # the caller went away: the backend must see it
        server.release.set()
        await client.chat(MODEL, PROMPT)
        await client.close()
    assert server.connections == 2


async def test_the_backend_client_reports_error_answers_as_ollama_does():
    async with OllamaServer() as server:
        client = backend_client(server.url)  # the server answers 404 {"error"} on /api/pull
        with pytest.raises(ollama.ResponseError) as whole:
            await client.pull(MODEL)
        with pytest.raises(ollama.ResponseError) as streamed:
            async for _ in await client.pull(MODEL, stream=True):
                pass
        await client.close()
    for raised in (whole.value, streamed.value):
        assert (raised.status_code, raised.error) == (404, "not found")


async def test_the_backend_client_fails_as_httpx_does():
    async with OllamaServer() as server:
        url = server.url
        server.silent = True
        slow = Backend(backend_client(url, read_timeout=0.2), url=url, model=MODEL)
        with pytest.raises(ServiceUnavailable) as timed_out:
            await slow.chat(api.ChatRequest(model=MODEL, messages=PROMPT, stream=False))
        assert timed_out.value.code == "backend_timeout"
        await slow.client.close()
    down = Backend(backend_client(url), url=url, model=MODEL)  # nothing listens there now
    with pytest.raises(ServiceUnavailable) as refused:
        await down.chat(api.ChatRequest(model=MODEL, messages=PROMPT, stream=False))
    assert refused.value.code == "backend_unavailable"
    assert (await down.probe()).reachable is False
    await down.client.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_the_backend_client_keeps_a_busy_answers_retry_after(stream):
    async with OllamaServer() as server:
        server.busy_retry_after = "7"
        busy = Backend(backend_client(server.url), url=server.url, model=MODEL)
        request = api.ChatRequest(model=MODEL, messages=PROMPT, stream=stream)
        call = read_all(busy.chat_stream(request)) if stream else busy.chat(request)
        with pytest.raises(ServiceUnavailable) as refused:
            await call
        await busy.client.close()
    assert refused.value.code == "backend_busy"
    assert refused.value.headers["Retry-After"] == "7"


async def test_the_wrapper_on_its_own_client_end_to_end(registry_http):
    async with OllamaServer() as server:
        settings = make_settings(backend_url=server.url)
        app = create_app(settings, registry_client=registry_http)  # the client it makes itself
        async with app.router.lifespan_context(app):
            running = openai.AsyncOpenAI(
                base_url="http://wrapper.test/v1",
                api_key="unused",
                max_retries=0,
                http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app)),
            )
            whole = await running.chat.completions.create(
                model="x", messages=PROMPT, extra_headers={"X-Request-ID": "own-client-1"}
            )
            stream = await running.chat.completions.create(model="x", messages=PROMPT, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert whole.choices[0].message.content == read("chat_response.json")["message"]["content"]
    assert text == "".join(line["message"]["content"] for line in read_lines("chat_stream.ndjson"))
    chats = [headers for path, headers, _ in server.requests if path == "/api/chat"]
    assert chats[0]["x-request-id"] == "own-client-1"
