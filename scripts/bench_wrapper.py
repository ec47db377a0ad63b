"""Benchmark the wrapper hop (OpenAI in, Ollama API out) against its budgets (DESIGN 7).

Starts an instant fake Ollama backend (raw asyncio, canned bodies) in its own process and
the real wrapper (``python -m services reasoner`` from the default profile, pointed at the
fake by ``SWARM_*`` variables, with a registry URL where nothing listens) in another. At
concurrency 1, one client (stdlib ``http.client``, keep-alive) alternates calls to the fake
directly (the baseline) and through the wrapper, so both see the same machine state:

- non-streamed: ``POST /api/chat`` direct vs ``POST /v1/chat/completions`` via the wrapper;
- streamed: time to the first body byte (TTFT) and to the end of the stream;
- the wrapper's CPU per request, from ``/proc/<pid>/stat`` (utime + stime) around each run.

A benchmark, not a test: a missed budget is reported, not turned into an exit code.

    .venv/bin/python scripts/bench_wrapper.py [--requests 3000] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
WRAPPER = "reasoner"  # a wrapper of the default profile; only its backend and port change
MODEL = "smollm2:135m"
BUDGET_MS = 1.0  # added p50, CPU per request, added TTFT p50

# --- the instant fake backend ------------------------------------------------------------

CREATED = "2025-01-01T00:00:00.000000Z"
ANSWER = {
    "model": MODEL,
    "created_at": CREATED,
    "message": {"role": "assistant", "content": "Hello! How are you today?"},
    "done": True,
    "done_reason": "stop",
    "total_duration": 5_191_566,
    "load_duration": 2_154,
    "prompt_eval_count": 26,
    "prompt_eval_duration": 383_809,
    "eval_count": 7,
    "eval_duration": 4_799_921,
}
PIECES = ["Hello", "!", " How", " are", " you", " today", "?"]
STREAM = [
    {"model": MODEL, "created_at": CREATED, "message": {"role": "assistant", "content": p}}
    | {"done": False}
    for p in PIECES
] + [ANSWER | {"message": {"role": "assistant", "content": ""}}]
TAGS = {
    "models": [
        {
            "name": MODEL,
            "model": MODEL,
            "modified_at": CREATED,
            "size": 100_000_000,
            "digest": "0" * 64,
            "details": {"format": "gguf", "parameter_size": "135M", "quantization_level": "Q4_1"},
        }
    ]
}
SHOW = {
    "details": {"format": "gguf", "parameter_size": "135M", "quantization_level": "Q4_1"},
    "model_info": {"general.architecture": "llama", "llama.context_length": 8192},
}


def _response(body: bytes, content_type: bytes = b"application/json") -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
    return head % (content_type, len(body)) + body


def _chunked(lines: list[dict]) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    chunks = [json.dumps(line).encode() + b"\n" for line in lines]
    return head + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


class FakeOllama(asyncio.Protocol):
    """Just enough HTTP/1.1 (keep-alive, Content-Length bodies) for the wrapper's calls."""

    CANNED = {
        (b"POST", b"/api/chat", False): _response(json.dumps(ANSWER).encode()),
        (b"POST", b"/api/chat", True): _chunked(STREAM),
        (b"GET", b"/api/tags", False): _response(json.dumps(TAGS).encode()),
        (b"POST", b"/api/show", False): _response(json.dumps(SHOW).encode()),
        (b"GET", b"/api/version", False): _response(b'{"version":"0.0.0-fake"}'),
    }
    NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].split(b"\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path, _ = head[0].split(b" ", 2)
            stream = b'"stream":true' in body.replace(b" ", b"")
            self.transport.write(self.CANNED.get((method, path, stream), self.NOT_FOUND))


def serve_fake(port: int) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(FakeOllama, HOST, port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# --- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )


def wait_ready(process: subprocess.Popen, port: int, path: str, deadline_s: float = 30) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                conn.close()
                return
            conn.close()
        time.sleep(0.1)
    raise RuntimeError(f"{process.args} not ready on {path} within {deadline_s}s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- measuring -----------------------------------------------------------------------------

HEADERS = {"Content-Type": "application/json"}
MESSAGES = [{"role": "user", "content": "Say hello."}]
DIRECT = {"model": MODEL, "messages": MESSAGES, "stream": False}
VIA = {"model": MODEL, "messages": MESSAGES}


def call(conn: http.client.HTTPConnection, path: str, body: bytes) -> tuple[float, float]:
    """(time to the first body byte, time to the end of the body), in ns."""
    started = time.perf_counter_ns()
    conn.request("POST", path, body, HEADERS)
    response = conn.getresponse()
    first = response.read1() if response.chunked else response.read()
    first_at = time.perf_counter_ns()
    if response.status != 200:
        raise RuntimeError(f"{path}: HTTP {response.status} {first[:300]!r}")
    while response.read1():
        pass
    return first_at - started, time.perf_counter_ns() - started


def run(
    scenario: str,
    direct: int,
    wrapper: int,
    wrapper_pid: int,
    requests: int,
    warmup: int,
    rounds: int,
) -> dict:
    """Alternate direct and wrapped calls; per measure, the median over ``rounds`` of each
    round's p50 (a round disturbed by another process on the machine does not decide),
    and the p99 of all calls."""
    stream = scenario == "stream"
    direct_body = json.dumps(DIRECT | {"stream": stream}).encode()
    via_body = json.dumps(VIA | {"stream": stream}).encode()
    to_fake = http.client.HTTPConnection(HOST, direct)
    to_wrapper = http.client.HTTPConnection(HOST, wrapper)
    for _ in range(warmup):
        call(to_fake, "/api/chat", direct_body)
        call(to_wrapper, "/v1/chat/completions", via_body)
    names = ("direct", "via", "direct_ttfb", "via_ttfb")
    every: dict[str, list[float]] = {name: [] for name in names}
    round_p50s: dict[str, list[float]] = {name: [] for name in names}
    round_cpu: list[float] = []
    per_round = max(1, requests // rounds)
    for _ in range(rounds):
        samples: dict[str, list[float]] = {name: [] for name in names}
        wrapper_cpu = 0.0
        for _ in range(per_round):
            first, total = call(to_fake, "/api/chat", direct_body)
            samples["direct"].append(total)
            samples["direct_ttfb"].append(first)
            before = cpu_seconds(wrapper_pid)
            first, total = call(to_wrapper, "/v1/chat/completions", via_body)
            wrapper_cpu += cpu_seconds(wrapper_pid) - before
            samples["via"].append(total)
            samples["via_ttfb"].append(first)
        for name in names:
            every[name] += samples[name]
            round_p50s[name].append(percentile(samples[name], 0.50))
        round_cpu.append(wrapper_cpu / per_round)
    to_fake.close()
    to_wrapper.close()
    return {
        name: {
            "p50": statistics.median(round_p50s[name]) / 1e6,
            "p99": percentile(every[name], 0.99) / 1e6,
        }
        for name in names
    } | {"cpu_ms_per_request": statistics.median(round_cpu) * 1000}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def table(results: dict, command: str) -> str:
    plain, stream = results["non_stream"], results["stream"]

    def row(label: str, direct: dict, via: dict, budgeted: bool = True) -> str:
        added = via["p50"] - direct["p50"]
        budget = "—"
        if budgeted:
            budget = f"≤ {BUDGET_MS} ms " + ("ok" if added <= BUDGET_MS else "**over**")
        return (
            f"| {label} | {direct['p50']:.3f} / {direct['p99']:.3f} | "
            f"{via['p50']:.3f} / {via['p99']:.3f} | {added:.3f} | {budget} |"
        )

    def cpu_row(label: str, figures: dict) -> str:
        cpu = figures["cpu_ms_per_request"]
        budget = "—"
        if "not budgeted" not in label:
            budget = f"≤ {BUDGET_MS} ms " + ("ok" if cpu <= BUDGET_MS else "**over**")
        return f"| {label} | — | — | {cpu:.3f} | {budget} |"

    lines = [
        f"`{command}` — {platform.node()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, {results['requests']} calls per row in "
        f"{results['rounds']} rounds (median of the rounds' p50; p99 of all), concurrency 1",
        "",
        "| measure (ms) | direct p50 / p99 | via wrapper p50 / p99 | added p50 | budget |",
        "|---|---|---|---|---|",
        row("non-stream, whole call", plain["direct"], plain["via"]),
        row("stream, time to first byte", stream["direct_ttfb"], stream["via_ttfb"]),
        row("stream, whole stream", stream["direct"], stream["via"], budgeted=False),
        cpu_row("wrapper CPU per request, non-stream", plain),
        cpu_row("wrapper CPU per request, stream (not budgeted)", stream),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3_000, help="timed calls per scenario")
    parser.add_argument("--rounds", type=int, default=5, help="rounds the calls are split into")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls first")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--serve-fake", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_fake:
        serve_fake(args.serve_fake)
        return 0

    fake_port, wrapper_port, nobody = free_port(), free_port(), free_port()
    state = Path(tempfile.mkdtemp(prefix="bench-wrapper-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_")} | {
        "SWARM_DATA_DIR": str(state),
        "SWARM_LOG_LEVEL": "warning",
        f"SWARM_WRAPPERS__{WRAPPER.upper()}__PORT": str(wrapper_port),
        "SWARM_BACKENDS__SMOLLM2__PORT": str(fake_port),
        "SWARM_REGISTRY__URL": f"http://{HOST}:{nobody}",  # nothing listens: it retries
        "PYTHONUNBUFFERED": "1",
    }
    fake_argv = [sys.executable, __file__, "--serve-fake", str(fake_port)]
    fake = start(fake_argv, env, state / "fake.log")
    wrapper = start([sys.executable, "-m", "services", WRAPPER], env, state / "wrapper.log")
    try:
        wait_ready(fake, fake_port, "/api/version")
        wait_ready(wrapper, wrapper_port, "/health")
        results: dict = {"requests": args.requests, "rounds": args.rounds}
        for scenario in ("non_stream", "stream"):
            results[scenario] = run(
                scenario,
                fake_port,
                wrapper_port,
                wrapper.pid,
                args.requests,
                args.warmup,
                args.rounds,
            )
    except Exception:
        print(f"failed; logs in {state}", file=sys.stderr)
        raise
    finally:
        stop(wrapper)
        stop(fake)
    shutil.rmtree(state, ignore_errors=True)
    command = shlex.join(["python", "scripts/bench_wrapper.py", *(argv or sys.argv[1:])])
    print(json.dumps(results, indent=2) if args.json else table(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
