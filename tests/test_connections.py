"""Connection hygiene: every daemon's server (``services.common.server``) on a real socket.

Idle and half-sent connections are timed out, oversized headers refused, a stalled body
is a 408, a client that leaves is a 499 and one line of log, and half-sent requests do not
spend the router's rate-limit burst. The daemons run in uvicorn in a thread, as ``serve``
configures it, with limits short enough that each test takes a fraction of a second.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from registry.app import create_app as create_registry_app
from registry.settings import RegistrySettings
from router.app import create_app as create_router_app
from router.settings import RouterSettings
from schemas.config import ServerConfig
from services.common.http import install_plumbing, serve_lean
from services.common.server import server_config
from tests.conftest import forever, free_port

LIMITS = ServerConfig(
    keep_alive_seconds=0.3,
    header_timeout_seconds=0.3,
    body_timeout_seconds=0.3,
    max_header_bytes=8_192,
)
WAIT = 5.0  # the most any socket wait may take before the test fails


class _Server(uvicorn.Server):
    """uvicorn's server, telling the test when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = threading.Event()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        self.listening.set()


@contextlib.contextmanager
def serving(app: FastAPI, limits: ServerConfig = LIMITS) -> Iterator[int]:
    """Serve ``app`` as a daemon does, on a free port; yield the port."""
    port = free_port()
    config = server_config(app, host="127.0.0.1", port=port, log_level="info", limits=limits)
    server = _Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        assert server.listening.wait(WAIT), "the server did not start"
        yield port
    finally:
        server.should_exit = True
        thread.join(WAIT)


@pytest.fixture(scope="module")
def registry_port(tmp_path_factory) -> Iterator[int]:
    """One registry for the module (each test uses its own connections and counters)."""
    database = tmp_path_factory.mktemp("registry") / "registry.db"
    settings = RegistrySettings(database_url=f"sqlite:///{database}", reap_interval_seconds=86_400)
    with serving(create_registry_app(settings)) as port:
        yield port


def unreachable_registry(request: httpx.Request) -> httpx.Response:
    return httpx.Response(503)


@pytest.fixture
def router_port(tmp_path) -> Iterator[int]:
    """The router with no agents (its registry answers 503), a burst of 2 and no refill."""
    settings = RouterSettings(
        registry_url="http://registry.test",
        database_url=f"sqlite:///{tmp_path / 'usage.db'}",
        rate_limit_per_second=0.001,  # no refill within a test
        rate_limit_burst=2,
    )
    registry = httpx.AsyncClient(
        transport=httpx.MockTransport(unreachable_registry), base_url="http://registry.test"
    )
    with serving(create_router_app(settings, registry_client=registry, sleep=forever)) as port:
        yield port


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """All the server sends until it closes the connection (or WAIT passes: a failure)."""
    received = b""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        sock.settimeout(deadline - time.monotonic())
        try:
            chunk = sock.recv(65_536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the connection was still open after {WAIT} s; got {received!r}")


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length body, leaving the connection open."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65_536)
        assert chunk, f"closed mid-response: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65_536)
        assert chunk, "closed mid-body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def request_head(method: str, path: str, **headers: str) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def half_sent_post(port: int, path: str, body: bytes, *, sent: int) -> socket.socket:
    """A POST declaring ``body`` whole but sending only its first ``sent`` bytes."""
    sock = connect(port)
    head = request_head(
        "POST", path, **{"Content-Type": "application/json", "Content-Length": str(len(body))}
    )
    sock.sendall(head + body[:sent])
    return sock


def timed(action: Callable[[], bytes]) -> tuple[bytes, float]:
    started = time.monotonic()
    result = action()
    return result, time.monotonic() - started


def counted(port: int, method: str, route: str, status: int) -> float:
    """``http_requests_total`` of the daemon for one route and status (0 when absent)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=WAIT).text
    labels = f'method="{method}",route="{route}",status="{status}"'
    match = re.search(rf"^http_requests_total\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def wait_counted(port: int, method: str, route: str, status: int) -> float:
    """Until the daemon has counted such a request (it does so once the client is gone)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if (value := counted(port, method, route, status)) > 0:
            return value
    raise AssertionError(f"no {method} {route} {status} counted within {WAIT} s")


# --- idle connections and headers ----------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive_time(registry_port):
    with connect(registry_port) as sock:
        received, waited = timed(lambda: read_until_closed(sock))
    assert received == b""
    assert LIMITS.keep_alive_seconds * 0.9 <= waited < LIMITS.keep_alive_seconds + 1.0


def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_time(registry_port):
    with connect(registry_port) as sock:
        for _ in range(2):  # the timer restarts after each answer
            sock.sendall(request_head("GET", "/healthz"))
            status, headers, _ = read_response(sock)
            assert status == 200
            assert "close" not in headers.get("connection", "")
        received, waited = timed(lambda: read_until_closed(sock))
    assert received == b""
    assert LIMITS.keep_alive_seconds * 0.9 <= waited < LIMITS.keep_alive_seconds + 1.0


def assert_closing_error(received: bytes, status: int, code: str) -> None:
    """An answer of ``status`` in the envelope, closing the connection, with the request
    id every answer carries."""
    answered, headers, body = parse(received)
    assert answered == status
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == code
    assert error["request_id"] == headers["x-request-id"]


@pytest.mark.parametrize(
    "partial",
    [b"G", b"GET /healthz HTT", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: ab"],
    ids=["one-byte", "half-a-request-line", "half-the-headers"],
)
def test_half_sent_headers_get_408_and_a_close(registry_port, partial):
    with connect(registry_port) as sock:
        sock.sendall(partial)
        received, waited = timed(lambda: read_until_closed(sock))
    assert_closing_error(received, 408, "request_timeout")
    assert LIMITS.header_timeout_seconds * 0.9 <= waited < LIMITS.header_timeout_seconds + 1.0


def test_headers_over_the_limit_get_431_and_a_close(registry_port):
    huge = "a" * 16 * 1024 * 1024  # the 16 MB X-Request-ID of the report
    with connect(registry_port) as sock:
        head = request_head("GET", "/healthz", **{"X-Request-ID": huge})
        with contextlib.suppress(ConnectionError):  # refused before it is all sent
            sock.sendall(head)
        received = read_until_closed(sock)
    assert_closing_error(received, 431, "headers_too_large")


def test_headers_within_the_limit_are_served(registry_port):
    with connect(registry_port) as sock:
        sock.sendall(request_head("GET", "/healthz", **{"X-Padding": "a" * 6_000}))
        status, _, _ = read_response(sock)
    assert status == 200


# --- bodies ---------------------------------------------------------------------------------

DISCOVER = json.dumps({"capability": "reasoning", "padding": "x" * 400}).encode()


def test_a_stalled_body_gets_408_in_the_envelope(registry_port):
    with half_sent_post(registry_port, "/discover", DISCOVER, sent=100) as sock:
        received, waited = timed(lambda: read_until_closed(sock))
    assert_closing_error(received, 408, "request_timeout")
    assert LIMITS.body_timeout_seconds * 0.9 <= waited < LIMITS.body_timeout_seconds + 1.0
    assert counted(registry_port, "POST", "/discover", 408) == 1


def test_a_client_leaving_mid_upload_is_a_499_and_one_line_of_log(registry_port, caplog):
    caplog.set_level(logging.INFO)
    half_sent_post(registry_port, "/discover", DISCOVER, sent=100).close()
    assert wait_counted(registry_port, "POST", "/discover", 499) == 1
    assert counted(registry_port, "POST", "/discover", 500) == 0
    left = [r for r in caplog.records if "client left" in r.getMessage()]
    assert [(r.levelno, r.exc_info) for r in left] == [(logging.INFO, None)]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# --- the router -----------------------------------------------------------------------------

CHAT = json.dumps(
    {"model": "capability:reasoning", "messages": [{"role": "user", "content": "hi"}]}
).encode()


def chat(port: int) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        content=CHAT,
        headers={"Content-Type": "application/json"},
        timeout=WAIT,
    )


def test_half_sent_bodies_do_not_spend_the_rate_limit_burst(router_port):
    stalled = [half_sent_post(router_port, "/v1/chat/completions", CHAT, sent=20) for _ in range(5)]
    left = [half_sent_post(router_port, "/v1/chat/completions", CHAT, sent=20) for _ in range(5)]
    for sock in left:
        sock.close()
    for sock in stalled:
        with sock:
            status, headers, _ = parse(read_until_closed(sock))
        assert status == 408
        assert headers["x-ratelimit-remaining"] == "2"  # uncharged, still told where it stands
    served = [chat(router_port) for _ in range(2)]
    assert 429 not in [r.status_code for r in served]  # served (no agent answers: a 404)
    assert [r.headers["X-RateLimit-Remaining"] for r in served] == ["1", "0"]
    refused = chat(router_port)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert wait_counted(router_port, "POST", "/v1/chat/completions", 499) == 5


# --- the route label ------------------------------------------------------------------------


class Chat(BaseModel):
    model: str


def failing_app() -> FastAPI:
    """The shared plumbing and a chat route that fails, declared and served lean (as the
    wrappers serve /api/chat and /v1/chat/completions), on an Ollama path and an OpenAI one."""
    app = FastAPI()
    install_plumbing(app, max_body_bytes=1_024, readiness=lambda request: None)
    routes = APIRouter()

    @routes.post("/api/chat")
    @routes.post("/v1/chat/completions")
    async def fails(body: Chat, request: Request) -> None:
        raise RuntimeError("a bug")

    app.include_router(routes)
    serve_lean(app, [routes], ["/v1/chat/completions"])
    return app


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_handler_that_raises_is_counted_under_its_route(path):
    client = TestClient(failing_app(), raise_server_exceptions=False)
    assert client.post(path, content=b'{"model": "m"}').status_code == 500
    metrics = client.get("/metrics").text
    assert f'http_requests_total{{method="POST",route="{path}",status="500"}} 1.0' in metrics
    assert 'route="unmatched"' not in metrics
