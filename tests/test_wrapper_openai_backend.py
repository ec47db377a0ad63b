"""A wrapper in front of a ``kind: openai`` backend: a real llama-cpp-python server process
serving SmolLM2, reached through the wrapper with the official openai and ollama clients."""

from __future__ import annotations

import json
import uuid
from http.server import BaseHTTPRequestHandler

import httpx
import openai
import pytest

from schemas.config import ConfigError, load_settings
from services.wrapper.settings import WrapperSettings
from tests.conftest import (
    OPENAI_SERVER_KEY,
    SMOLLM,
    SMOLLM_CONTEXT,
    OpenAIServer,
    Sleeper,
    data,
    free_port,
    make_settings,
    serving,
)

HELLO = [{"role": "user", "content": "Say hello."}]


def openai_settings(url: str, **changes):
    values = {
        "model": SMOLLM,
        "backend": "server",
        "backend_url": url,
        "backend_kind": "openai",
        "backend_api_key": OPENAI_SERVER_KEY,
        "context_length": SMOLLM_CONTEXT,
        "max_tokens_limit": 8,
    }
    return make_settings(**values | changes)


pytestmark = [pytest.mark.anyio, pytest.mark.process]


@pytest.fixture
async def served(start_wrapper, openai_server: OpenAIServer):
    # backend=None: the wrapper makes its own client for the kind, as in production.
    return await start_wrapper(openai_settings(openai_server.url), backend=None)


async def test_openai_client_chat(served):
    completion = await served.openai.chat.completions.create(
        model="any", messages=HELLO, max_tokens=4
    )
    choice = completion.choices[0]
    assert completion.model == SMOLLM
    assert isinstance(choice.message.content, str)
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    # The server's own counts: 4 tokens asked, never more.
    assert 0 < completion.usage.completion_tokens <= 4
    assert completion.usage.prompt_tokens > 0


async def test_openai_client_stream(served):
    stream = await served.openai.chat.completions.create(
        model="any",
        messages=HELLO,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert 1 <= len(texts) <= 4
    assert finishes[-1] in ("stop", "length")
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(texts)


async def test_ollama_client_chat_and_generate(served):
    answer = await served.ollama.chat(SMOLLM, HELLO, options={"num_predict": 4})
    assert answer.done
    assert answer.message.role == "assistant"
    assert answer.message.content
    assert 0 < answer.eval_count <= 4

    parts = [
        part
        async for part in await served.ollama.chat(
            SMOLLM, HELLO, stream=True, options={"num_predict": 4}
        )
    ]
    assert parts[-1].done
    assert not any(part.done for part in parts[:-1])
    assert "".join(part.message.content for part in parts)

    generated = await served.ollama.generate(SMOLLM, "Say hello.", options={"num_predict": 4})
    assert generated.done
    assert generated.response
    assert generated.done_reason in ("stop", "length")

    raw = await served.ollama.generate(
        SMOLLM, "Once upon a time", raw=True, options={"num_predict": 3}
    )
    assert raw.done
    assert 0 < raw.eval_count <= 3


async def test_ollama_metadata_from_the_server(served):
    listing = await served.ollama.list()
    assert [model.model for model in listing.models] == [SMOLLM]
    assert (await served.http.get("/api/version")).status_code == 200
    shown = await served.http.post("/api/show", json={"model": SMOLLM})
    assert shown.status_code == 200
    models = (await served.http.get("/v1/models")).json()
    assert [model["id"] for model in models["data"]] == [SMOLLM]


async def test_health_is_healthy_only_after_a_decode(start_wrapper, openai_server):
    # A registry that refuses keeps registration retrying (asleep): no heartbeat probes.
    refusing = httpx.AsyncClient(transport=httpx.MockTransport(lambda _: httpx.Response(503)))
    wrapper = await start_wrapper(
        openai_settings(openai_server.url),
        backend=None,
        registry_client=refusing,
        sleeper=Sleeper(),
    )
    await wrapper.sleeper.asleep()
    before = openai_server.served("/v1/chat/completions")
    health = await wrapper.http.get("/health")
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "healthy"
    # The probe decoded once, itself; a healthy backend is not asked again.
    assert openai_server.served("/v1/chat/completions") == before + 1
    assert (await wrapper.http.get("/health")).status_code == 200
    assert openai_server.served("/v1/chat/completions") == before + 1


async def test_a_model_the_server_lacks_is_unhealthy(start_wrapper, openai_server):
    settings = openai_settings(openai_server.url, model="not-served:1b")
    wrapper = await start_wrapper(settings, backend=None)
    before = openai_server.served("/v1/chat/completions")
    health = await wrapper.http.get("/health")
    assert health.status_code == 503
    assert "not-served:1b" in health.json()["reason"]
    assert openai_server.served("/v1/chat/completions") == before  # no decode tried


async def test_server_down_is_a_503_envelope(start_wrapper):
    down = f"http://127.0.0.1:{free_port()}/v1"
    wrapper = await start_wrapper(openai_settings(down), backend=None)
    with pytest.raises(openai.APIStatusError) as raised:
        await wrapper.openai.chat.completions.create(model="any", messages=HELLO)
    assert raised.value.status_code == 503
    error = raised.value.body
    assert error["code"] == "backend_unavailable"
    assert error["type"] == "service_unavailable"
    assert down in error["message"]
    assert raised.value.response.headers["retry-after"]
    health = await wrapper.http.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "unhealthy"


async def test_a_wrong_key_is_a_503_that_does_not_tell_it(start_wrapper, openai_server):
    settings = openai_settings(openai_server.url, backend_api_key="sk-wrong-key")
    wrapper = await start_wrapper(settings, backend=None)
    response = await wrapper.http.post(
        "/v1/chat/completions", json={"model": "any", "messages": HELLO}
    )
    assert response.status_code == 503
    assert "API key" in response.json()["error"]["message"]
    assert "sk-" not in response.text


async def test_openai_calls_are_forwarded_as_they_are(served):
    # The server's own completion ids (a uuid) come back: the answer is the server's, not
    # the wrapper's translation (whose ids are chatcmpl-<hex counter>).
    completion = await served.openai.chat.completions.create(
        model="any", messages=HELLO, max_tokens=2, extra_body={"top_k": 1}
    )
    uuid.UUID(completion.id.removeprefix("chatcmpl-"))
    stream = await served.openai.chat.completions.create(
        model="any", messages=HELLO, max_tokens=2, stream=True
    )
    ids = {chunk.id async for chunk in stream}
    assert len(ids) == 1
    uuid.UUID(ids.pop().removeprefix("chatcmpl-"))


async def test_a_prompt_over_the_context_is_refused_before_the_server(served, openai_server):
    before = openai_server.served("/v1/chat/completions")
    long = [{"role": "user", "content": "word " * (SMOLLM_CONTEXT * 4)}]
    with pytest.raises(openai.BadRequestError) as raised:
        await served.openai.chat.completions.create(model="any", messages=long)
    assert raised.value.body["code"] == "context_length_exceeded"
    assert openai_server.served("/v1/chat/completions") == before


def test_a_profile_names_an_openai_server(tmp_path, monkeypatch):
    profile = tmp_path / "swarm.yaml"
    profile.write_text(
        "backends:\n"
        "  vllm: {kind: openai, url: 'http://gpu-box:8000/v1/', api_key_env: VLLM_KEY}\n"
        "  lmstudio: {kind: openai, port: 1234}\n"
        "wrappers:\n"
        "  big: {agent_id: big, name: Big, port: 8101, model: qwen, backend: vllm,\n"
        "        capabilities: [reasoning], role: reasoner}\n"
        "  small: {agent_id: small, name: Small, port: 8102, model: phi, backend: lmstudio,\n"
        "          capabilities: [reasoning], role: reasoner}\n"
    )
    monkeypatch.setenv("VLLM_KEY", "sk-from-the-environment")
    swarm = load_settings(profile)
    big = WrapperSettings.from_swarm(swarm, "big")
    assert (big.backend_kind, big.backend_url) == ("openai", "http://gpu-box:8000/v1")
    assert big.backend_api_key.get_secret_value() == "sk-from-the-environment"
    assert "sk-from" not in repr(big)
    small = WrapperSettings.from_swarm(swarm, "small")
    assert (small.backend_url, small.backend_api_key) == ("http://127.0.0.1:1234/v1", None)


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        (
            "{kind: openai}",
            "backends.a: an openai backend needs a url (http://host:port/v1) or a port",
        ),
        (
            "{kind: openai, port: 1, url: 'http://x/v1'}",
            "backends.a: an openai backend takes a url or a port, not both",
        ),
        ("{kind: openai, port: 1, model: m}", "backends.a: an openai backend takes no model"),
        (
            "{kind: ollama, port: 1, url: 'http://x'}",
            "backends.a: an Ollama backend takes no url or api_key_env: an openai one does",
        ),
        ("{kind: ollama}", "backends.a: an Ollama backend needs a port"),
    ],
)
def test_openai_backend_config_errors(tmp_path, backend, expected):
    profile = tmp_path / "swarm.yaml"
    profile.write_text(f"backends: {{a: {backend}}}\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(profile)
    assert expected in str(raised.value)


# --- JSON output: a server that ignores response_format ---------------------------------------


class _IgnoresFormat(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that answers OpenAI's documented example, whatever
    ``response_format`` asks: "Hello! ..." as text, whole or streamed."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        listing = data("openai/models.json")
        listing["data"][0]["id"] = SMOLLM
        self._send("application/json", json.dumps(listing).encode())

    def do_POST(self) -> None:
        asked = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if not asked.get("stream"):
            self._send("application/json", json.dumps(data("openai/chat_completion.json")).encode())
            return
        events = [f"data: {json.dumps(c)}\n\n" for c in data("openai/chat_completion_stream.json")]
        self._send("text/event-stream", "".join([*events, "data: [DONE]\n\n"]).encode())

    def _send(self, media_type: str, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
async def ignores_format(start_wrapper):
    with serving(_IgnoresFormat) as port:
        url = f"http://127.0.0.1:{port}/v1"
        yield await start_wrapper(openai_settings(url, max_tokens_limit=64), backend=None)


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}},
    ],
)
async def test_an_answer_that_ignored_the_json_format_is_a_502(ignores_format, response_format):
    client = ignores_format.openai
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.create(
            model="any", messages=HELLO, response_format=response_format
        )
    assert raised.value.status_code == 502
    assert raised.value.body["code"] == "upstream_invalid_json"
    # Asked for text, the same answer passes: the format is what it failed.
    plain = await client.chat.completions.create(model="any", messages=HELLO)
    assert plain.choices[0].message.content == "Hello! How can I assist you today?"


async def test_a_stream_that_ignored_the_json_format_ends_with_the_error_event(ignores_format):
    stream = await ignores_format.openai.chat.completions.create(
        model="any", messages=HELLO, response_format={"type": "json_object"}, stream=True
    )
    texts: list[str] = []

    async def read_all() -> None:
        async for chunk in stream:
            assert not any(choice.finish_reason for choice in chunk.choices)  # never "stop"
            texts.extend(choice.delta.content or "" for choice in chunk.choices)

    with pytest.raises(openai.APIError) as raised:
        await read_all()
    assert "".join(texts) == "Hello!"
    assert "ignored the format" in raised.value.message
