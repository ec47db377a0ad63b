"""What the connection limits of issue 13 cost a request, measured in one process.

Feeds the same small chat request, again and again, into uvicorn's httptools protocol as
every daemon runs it (``LimitedHttpProtocol``: idle, header and size limits) and as uvicorn
ships it, each with and without ``BodyTimeoutMiddleware``, over a do-nothing app and a
transport that discards what it is given. No sockets: what is left is the protocol's
and the middleware's own work, which socket and scheduling noise would hide in the hop
benchmarks (``bench_wrapper.py``, ``bench_router.py``).

    .venv/bin/python scripts/bench/bench_server_guards.py [--requests 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from functools import partial
from typing import Any

import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from schemas.config import ServerConfig
from services.common.middleware import BodyTimeoutMiddleware
from services.common.server import LimitedHttpProtocol

BODY = b'{"model":"capability:reasoning","messages":[{"role":"user","content":"hi"}]}'
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)
) + BODY


class Discarding:
    """A transport that takes every write and never closes on its own."""

    def __init__(self) -> None:
        self.closing = False

    def get_extra_info(self, name: str) -> Any:
        return {"sockname": ("127.0.0.1", 6103), "peername": ("127.0.0.1", 50000)}.get(name)

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def answer(scope: dict, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def per_request_us(protocol: Any, app: Any, requests: int) -> float:
    config = Config(app, log_level="warning")
    config.load()
    connection = protocol(config=config, server_state=ServerState(), app_state={})
    connection.connection_made(Discarding())
    started = time.perf_counter()
    for _ in range(requests):
        connection.data_received(REQUEST)
        await asyncio.sleep(0)  # the request's task runs
        await asyncio.sleep(0)  # and ends
    return (time.perf_counter() - started) / requests * 1e6


async def measure(requests: int, rounds: int) -> dict[str, float]:
    limits = ServerConfig()
    limited = partial(LimitedHttpProtocol, limits=limits)
    timed = BodyTimeoutMiddleware(answer, seconds=limits.body_timeout_seconds)
    variants = {
        "uvicorn's protocol": (HttpToolsProtocol, answer),
        "+ body timeout": (HttpToolsProtocol, timed),
        "LimitedHttpProtocol": (limited, answer),
        "LimitedHttpProtocol + body timeout (as served)": (limited, timed),
    }
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):  # interleaved, so that load changes touch every variant alike
        for name, (protocol, app) in variants.items():
            runs[name].append(await per_request_us(protocol, app, requests))
    return {name: statistics.median(values) for name, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    uvloop.install()
    load = os.getloadavg()
    medians = asyncio.run(measure(args.requests, args.rounds))
    base = medians["uvicorn's protocol"]
    print(
        f"`python scripts/bench/bench_server_guards.py --requests {args.requests} "
        f"--rounds {args.rounds}` — {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end\n"
    )
    print("| server stack | µs per request (median of rounds) | added |")
    print("|---|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} | {value - base:+.1f} |")


if __name__ == "__main__":
    main()
