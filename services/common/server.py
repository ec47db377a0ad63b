"""Running a daemon: settings or one clear line, logging, uvicorn with connection limits."""

from __future__ import annotations

import asyncio
import gc
import http
import ipaddress
import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from schemas.config import ConfigError, ServerConfig, SwarmSettings, load_settings
from services.common.context import (
    current_request_id,
    new_id,
    reset_request_id,
    set_request_id,
)
from services.common.errors import HeadersTooLarge, RequestTimeout, SwarmError, error_response
from services.common.middleware import BodyTimeoutMiddleware

log = logging.getLogger(__name__)

STARTUP_FAILURE = 3  # uvicorn's exit code when the server could not start
EXPOSED_WITHOUT_TOKEN = 2  # as for any other profile a daemon cannot run with


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id() or "-"
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def settings_or_exit(service: str, path: Path | None = None) -> SwarmSettings:
    """Load the profile; on a bad value print one line naming the key and exit 2."""
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits it lacks.

    uvicorn times only the idle gap after an answer: a connection that sends nothing, or
    half a request line, stays open for ever, and httptools buffers headers of any size.
    Here a connection silent since it opened is closed after the keep-alive time as well;
    a request's line and headers must arrive within ``header_timeout_seconds`` of its first
    byte (else 408) and stay within ``max_header_bytes`` (else 431). Body reads are timed
    in the app (:class:`BodyTimeoutMiddleware`), where a 408 gets the request's envelope.
    """

    def __init__(self, *args: Any, limits: ServerConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.header_timer: asyncio.TimerHandle | None = None
        # Bytes of the request line and headers read so far; None while a body is read.
        self.header_bytes: int | None = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Feed the parser no more header bytes than the limit allows: it would buffer them.
        while data and not self.transport.is_closing():
            if self.header_bytes is None:
                chunk, data = data, b""
            else:
                room = self.limits.max_header_bytes - self.header_bytes
                if room <= 0:
                    limit = self.limits.max_header_bytes
                    self._refuse(HeadersTooLarge(f"request headers exceed {limit} bytes"))
                    return
                chunk, data = data[:room], data[room:]
                self.header_bytes += len(chunk)
            super().data_received(chunk)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._stop_header_timer()
        self.header_timer = self.loop.call_later(
            self.limits.header_timeout_seconds, self._headers_too_slow
        )

    def on_headers_complete(self) -> None:
        self._stop_header_timer()
        self.header_bytes = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.header_bytes = 0

    def _stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_too_slow(self) -> None:
        self.header_timer = None
        seconds = self.limits.header_timeout_seconds
        self._refuse(RequestTimeout(f"request headers not received within {seconds:g} s"))

    def _refuse(self, error: SwarmError) -> None:
        """Answer ``error`` and close; only close if an answer to an earlier (pipelined)
        request is still being written, as the two would interleave."""
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        # No request was read, so no id was given: a new one, as for any request without.
        token = set_request_id(new_id())
        try:
            log.info("closing the connection of %s: %s", client, error.message)
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(raw_response(error))
            self.transport.close()
        finally:
            reset_request_id(token)


def raw_response(error: SwarmError) -> bytes:
    """``error`` in the envelope as bytes on the wire, with the current request id and
    ``Connection: close``. Sent before a request's path is known: never in Ollama's shape."""
    response = error_response("", error)
    phrase = http.HTTPStatus(error.status_code).phrase
    lines = [f"HTTP/1.1 {error.status_code} {phrase}".encode()]
    lines += [name + b": " + value for name, value in response.raw_headers]
    lines += [b"connection: close", b"", response.body]
    return b"\r\n".join(lines)


def server_config(
    app: Any, *, host: str, port: int, log_level: str, limits: ServerConfig
) -> uvicorn.Config:
    """uvicorn's configuration for a daemon's ``app`` under ``limits``."""
    return uvicorn.Config(
        BodyTimeoutMiddleware(app, seconds=limits.body_timeout_seconds),
        host=host,
        port=port,
        log_level=log_level,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=10,
        http=partial(LimitedHttpProtocol, limits=limits),
        timeout_keep_alive=limits.keep_alive_seconds,  # type: ignore[arg-type]
    )


class Server(uvicorn.Server):
    """uvicorn's server, whose start leaves the collector only what requests make.

    A full collection walks every object the process holds, and most of a daemon's are
    made at start (its modules, its app, its caches) and live as long as it does: in the
    router under load, full collections came every few hundred calls and held every call
    for 55-90 ms (its p99). Frozen once started, they are never walked again.
    """

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        gc.collect()
        gc.freeze()


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host``: a loopback address or ``localhost``.
    Any other name counts as reachable from elsewhere (no DNS lookup to argue otherwise)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(host: str, swarm: SwarmSettings) -> str | None:
    """Why a daemon must not bind ``host`` with this profile, or None: off loopback, other
    machines can reach it, and without a registry token anyone there could register an
    agent or report usage."""
    if swarm.registry_token is not None or is_loopback(host):
        return None
    return (
        f"refusing to listen on {host}, reachable from other machines, without a registry "
        "token: set SWARM_REGISTRY_TOKEN (the same on every host), or bind a loopback address"
    )


def serve(app: Any, swarm: SwarmSettings, *, host: str, port: int) -> None:
    """Run ``app`` on ``host:port`` with the profile's log level and server limits; a
    non-loopback ``host`` without a registry token is one line on stderr and exit 2."""
    if problem := exposure_problem(host, swarm):
        print(problem, file=sys.stderr)
        raise SystemExit(EXPOSED_WITHOUT_TOKEN)
    configure_logging(swarm.log_level)
    config = server_config(
        app, host=host, port=port, log_level=swarm.log_level, limits=swarm.server
    )
    server = Server(config)
    server.run()
    if not server.started:  # e.g. the port is taken: as uvicorn.run does
        raise SystemExit(STARTUP_FAILURE)
