"""Cloud providers behind the router: keyed OpenAI-compatible APIs passed through, and
Anthropic's Messages API translated both ways (respx at the providers' documented shapes)."""

from __future__ import annotations

import json

import httpx
import pytest
import respx

from schemas.config import ProviderConfig
from tests.conftest import DATA

pytestmark = pytest.mark.anyio

CHAT = {"model": "capability:reasoning", "messages": [{"role": "user", "content": "Hi"}]}
OPENAI = ProviderConfig(
    kind="openai",
    base_url="https://api.openai.com/v1",
    api_key_env="TEST_OPENAI_KEY",
    models={"reasoning": "gpt-4o-mini"},
    price_per_1k_input=0.15,
    price_per_1k_output=0.6,
)
ANTHROPIC = ProviderConfig(
    kind="anthropic",
    base_url="https://api.anthropic.com",
    api_key_env="TEST_ANTHROPIC_KEY",
    models={"reasoning": "claude-3-5-haiku-latest"},
    price_per_1k_input=0.8,
    price_per_1k_output=4.0,
)


def data(name: str):
    return json.loads((DATA / name).read_text())


async def test_a_keyed_openai_compatible_provider_serves_and_is_priced(start_router, monkeypatch):
    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-test-123")
    router = await start_router(providers={"openai": OPENAI})
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
    router = await start_router(providers={"openai": OPENAI})
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
    router = await start_router(providers={"openai": OPENAI})
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
