"""Property-based fuzzing of every daemon's published OpenAPI schema (issue 13).

Schemathesis generates requests from each daemon's own ``/openapi.json``, valid ones and
ones that break the schema, and sends them to the app in-process over ASGI (its lifespan
running, as under uvicorn). Only the edges are fakes: a wrapper's Ollama backend (respx) and
the registry the wrapper and the router read. Every answer must be no server error, and
conform to the schema: a documented status, a documented content type, a body of the
documented shape.

Bounded for CI: a fixed number of examples per operation and generation mode, derandomized
(the same requests on every run) and without Hypothesis' example database.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import ollama
import pytest
import respx
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks
from schemathesis.python.asgi import shutdown_lifespans

from registry.app import create_app as create_registry_app
from registry.settings import RegistrySettings
from router.app import create_app as create_router_app
from router.settings import RouterSettings
from services.modelhost.app import create_app as create_modelhost_app
from services.modelhost.settings import ModelHostSettings
from services.wrapper.app import create_app as create_wrapper_app
from tests.conftest import (
    BACKEND,
    NOW,
    SMOLLM,
    FakeClock,
    forever,
    read,
    read_lines,
    recorded_answer,
    streamed,
    tlc_settings,
)

EXAMPLES = 25  # per operation and mode: ~1,300 requests over the four daemons
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@dataclass
class Findings:
    """What a daemon's fuzz run sent and what failed, one line per distinct failure."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: dict[tuple[str, str], str] = field(default_factory=dict)

    def report(self) -> str:
        found = self.failures.items()
        return "\n\n".join(f"{label}: {title}\n{repro}" for (label, title), repro in found)


def fuzz(app: FastAPI, prepare: Callable[[schemathesis.Case], None] | None = None) -> Findings:
    """Every operation of ``app``'s schema, in positive and negative mode; ``prepare`` may
    adjust each case before it is sent."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    findings = Findings()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)

            @FUZZ
            @given(case=strategy)
            def run(case: schemathesis.Case) -> None:
                findings.requests += 1
                if prepare is not None:
                    prepare(case)
                response = case.call()
                findings.statuses[response.status_code] += 1
                try:
                    case.validate_response(response, checks=CHECKS)
                except (AssertionError, BaseExceptionGroup) as failed:
                    for failure in getattr(failed, "exceptions", [failed]):
                        title = getattr(failure, "title", type(failure).__name__)
                        repro = f"{failure}\n{case.as_curl_command()}"
                        findings.failures.setdefault((case.operation.label, title), repro[:2_000])

            try:
                run()
            except Exception as exc:  # e.g. a negative mode an operation has no room for
                if "Unsatisfiable" not in type(exc).__name__:
                    raise
    return findings


# --- the daemons, with fakes at their edges ------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def lifespans() -> Iterator[None]:
    """Schemathesis starts each app's lifespan on first use; end them with the module."""
    yield
    shutdown_lifespans()


def fake_registry(agents: list[dict]) -> httpx.AsyncClient:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            return httpx.Response(204)
        if request.url.path == "/agents":
            return httpx.Response(200, json={"agents": agents})
        return httpx.Response(200, json={})  # a registration or a heartbeat: taken

    return httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://registry.test")


def answer_as_asked(whole: str, lines: str) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content).get("stream"):
            return streamed(read_lines(lines))
        return httpx.Response(200, json=read(whole))

    return answer


def generate(request: httpx.Request) -> httpx.Response:
    """A classifier's prompt gets its recorded answer; any other, the generate fixture."""
    try:
        return recorded_answer(request)
    except (ValueError, KeyError):
        return answer_as_asked("generate_response.json", "generate_stream.ndjson")(request)


def embed(request: httpx.Request) -> httpx.Response:
    """Ollama's /api/embed answer, with one vector per input."""
    given = json.loads(request.content).get("input")
    texts = [given] if isinstance(given, str) else given or []
    answer = read("embed_response.json")
    return httpx.Response(200, json=answer | {"embeddings": answer["embeddings"][:1] * len(texts)})


@pytest.fixture(scope="module")
def ollama_backend() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BACKEND, assert_all_called=False) as mock:
        mock.post("/api/show").respond(json=read("show.json"))
        mock.get("/api/tags").respond(json=read("tags.json"))
        mock.get("/api/version").respond(json=read("version.json"))
        mock.get("/api/ps").respond(json=read("ps.json"))
        mock.post("/api/generate").mock(side_effect=generate)
        mock.post("/api/chat").mock(
            side_effect=answer_as_asked("chat_response.json", "chat_stream.ndjson")
        )
        mock.post("/api/embed").mock(side_effect=embed)
        mock.post("/api/embeddings").respond(json=read("embeddings_response.json"))
        mock.post("/v1/embeddings").respond(json=read("openai_embeddings_response.json"))
        yield mock


def report(name: str, findings: Findings, started: float) -> None:
    elapsed = time.monotonic() - started
    statuses = ", ".join(f"{status}: {n}" for status, n in sorted(findings.statuses.items()))
    print(f"\n{name}: {findings.requests} requests in {elapsed:.1f} s: {statuses}")
    assert not findings.failures, findings.report()


def test_the_registry_serves_what_its_schema_says(tmp_path_factory):
    database = tmp_path_factory.mktemp("fuzz-registry") / "registry.db"
    settings = RegistrySettings(database_url=f"sqlite:///{database}", reap_interval_seconds=86_400)
    started = time.monotonic()
    report("registry", fuzz(create_registry_app(settings)), started)


def test_the_router_serves_what_its_schema_says(tmp_path_factory):
    database = tmp_path_factory.mktemp("fuzz-router") / "usage.db"
    settings = RouterSettings(
        registry_url="http://registry.test", database_url=f"sqlite:///{database}"
    )
    app = create_router_app(
        settings,
        registry_client=fake_registry([]),
        sleep=forever,
        wall_clock=FakeClock(NOW.timestamp()),
    )
    started = time.monotonic()
    report("router", fuzz(app), started)


def asking_no_format(case: schemathesis.Case) -> None:
    """The fake backend ignores formats, and the wrapper answers an answer that ignored one
    with its documented 502 (tests/test_tools.py): fuzzed bodies ask for none (a forced
    tool call is one too)."""
    if isinstance(case.body, dict):
        for name in ("format", "response_format", "tool_choice"):
            case.body.pop(name, None)


def test_a_wrapper_serves_what_its_schema_says(ollama_backend):
    """The TLC classifier: every wrapper route, and the classifier's own."""
    app = create_wrapper_app(
        tlc_settings(),
        backend=ollama.AsyncClient(BACKEND, timeout=httpx.Timeout(5.0)),
        registry_client=fake_registry([]),
        clock=FakeClock(1_000.0),
        sleep=forever,
    )
    started = time.monotonic()
    report("wrapper", fuzz(app, prepare=asking_no_format), started)


def served_model_one_token(case: schemathesis.Case) -> None:
    """Ask for the model served (any other name is a quick 404), for one token: a real
    model decodes what passes the checks, and an unbounded num_predict could fill the
    whole context."""
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = SMOLLM
    generates = case.operation.path in ("/api/generate", "/api/chat")
    options = body.get("options")
    if generates and (options is None or isinstance(options, dict)):  # null: unbounded too
        body["options"] = {**(options or {}), "num_predict": 1}


def test_the_model_host_serves_what_its_schema_says(engine, tmp_path):
    """The embedded host on a real SmolLM2."""
    app = create_modelhost_app(ModelHostSettings(model=SMOLLM, models_dir=tmp_path), engine=engine)
    started = time.monotonic()
    report("model host", fuzz(app, prepare=served_model_one_token), started)
