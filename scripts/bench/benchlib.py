"""What the benchmark scripts share: daemon processes, /proc readings, percentiles, and
the measuring of a hop (wrapper, router) beside an instant fake backend and a bare
pass-through, with the report's tables.

Standard library only at import (the pass-through imports aiohttp when it starts), so that
a benchmark's client processes start light.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def free_ports_in_a_row(count: int) -> int:
    """The first of ``count`` consecutive free ports: a wrapper's replicas listen on
    port, port + 1, ... (free when looked at; another process may still take one)."""
    while True:
        first = free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(first + 1, first + count):
                    held.enter_context(socket.socket()).bind((HOST, port))
            except OSError:
                continue
        return first


def start(argv: list[str], env: dict[str, str], log: Path, **popen) -> subprocess.Popen:
    """A daemon from the repository, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, **popen
        )


def wait_ready(process: subprocess.Popen, port: int, path: str, deadline_s: float = 30) -> None:
    """Until ``GET path`` answers 200; fail early if the process exits."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        # Short timeout: something else may hold the port and never answer.
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            try:
                conn.request("GET", path)
                if conn.getresponse().status == 200:
                    return
            finally:
                conn.close()
        time.sleep(0.05)
    raise RuntimeError(f"{process.args} not ready on {path} within {deadline_s}s")


def stop(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM for a clean shutdown, SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (the peak so far) of a process, in MB, from /proc/<pid>/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(value.split()[0]) / 1024  # kB
    return values


def load_average() -> str:
    """Other work on the machine skews every figure; the reader should see it."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def scrape_metrics(port: int, path: str = "/metrics") -> dict[str, float]:
    """A daemon's Prometheus samples: ``name{labels}`` (as the exposition writes it) to value."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        text = response.read().decode()
        if response.status != 200:
            raise RuntimeError(f"{path} on port {port}: HTTP {response.status}")
    finally:
        conn.close()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def metric_total(samples: dict[str, float], name: str) -> float:
    """The sum of metric ``name`` over all its label sets (0 when it has none yet)."""
    return sum(value for key, value in samples.items() if key.partition("{")[0] == name)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def ignore_sigint() -> None:
    """Pool initializer: Ctrl-C is the parent's to handle; it terminates the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- budgets and verdicts --------------------------------------------------------------------


def judge(value: float | None, budget: float, at_least: bool = False) -> dict:
    """Whether ``value`` keeps ``budget`` (at most it, or ``at_least`` it), and by how much
    it misses: ``verdict`` within, over, under, or not measurable; ``by`` the miss."""
    if value is None or math.isnan(value):
        return {"verdict": "not measurable", "by": None}
    if value >= budget if at_least else value <= budget:
        return {"verdict": "within", "by": 0.0}
    return {"verdict": "under" if at_least else "over", "by": abs(value - budget)}


def verdict_text(judged: dict, budget: float, unit: str = "", spec: str = ".2f") -> str:
    """``within``, or ``**over** by 0.42x (28%)``: the miss, and its share of the budget."""
    if judged["by"] is None or judged["verdict"] == "within":
        return judged["verdict"]
    share = f" ({judged['by'] / budget:.0%})" if budget else ""
    return f"**{judged['verdict']}** by {judged['by']:{spec}}{unit}{share}"


def verdict(value: float, budget: float, unit: str = "", at_least: bool = False) -> str:
    """``≥ 97% within``, ``≤ 1.5x **over** by 0.20x (13%)``."""
    bound = f"{'≥' if at_least else '≤'} {budget:g}{unit}"
    return f"{bound} {verdict_text(judge(value, budget, at_least), budget, unit)}"


def swarm_env(state: Path, **values: str) -> dict[str, str]:
    """This environment without its ``SWARM_*`` values (a profile, a database URL or a
    token would change what is measured), state in ``state``, quiet logs, and ``values``."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SWARM_")} | {
        "SWARM_DATA_DIR": str(state),
        "SWARM_LOG_LEVEL": "warning",
        **values,
        "PYTHONUNBUFFERED": "1",
    }


# --- a hop and its reference: an instant fake backend, a bare pass-through --------------------

HEADERS = {"Content-Type": "application/json"}


def http_response(body: bytes, content_type: bytes = b"application/json") -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
    return head % (content_type, len(body)) + body


def http_chunked(chunks: list[bytes], content_type: bytes) -> bytes:
    """A whole answer in chunked transfer encoding, one chunk a piece."""
    return b"".join(http_chunked_parts(chunks, content_type))


def http_chunked_parts(chunks: list[bytes], content_type: bytes) -> list[bytes]:
    """The head with the first chunk, each further chunk, and the end: an answer in
    chunked transfer encoding as a paced stream writes it."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
    parts = [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks]
    return [head % content_type + parts[0], *parts[1:], b"0\r\n\r\n"]


# A paced stream: a chat whose last message says this, streamed, gets its chunks from the
# fake this far apart (as a model writes its tokens), to see whether a hop buffers them.
PACED = "paced"
PACE_S = 0.04


class CannedHTTP(asyncio.Protocol):
    """Just enough HTTP/1.1 (keep-alive, Content-Length bodies) to answer each call with
    ``CANNED[(method, path, the body has "stream": true)]``, whole, at once; a streamed
    call of :data:`PACED` gets the chunks of ``STREAMS[(method, path)]`` (a content type
    and the chunks) :data:`PACE_S` apart."""

    CANNED: dict[tuple[bytes, bytes, bool], bytes] = {}
    STREAMS: dict[tuple[bytes, bytes], tuple[bytes, list[bytes]]] = {}
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
            if stream and b'"%s"' % PACED.encode() in body and (method, path) in self.STREAMS:
                self.write_paced(http_chunked_parts(*reversed(self.STREAMS[method, path])))
                continue
            self.transport.write(self.CANNED.get((method, path, stream), self.NOT_FOUND))

    def write_paced(self, parts: list[bytes]) -> None:
        loop = asyncio.get_running_loop()
        for index, part in enumerate(parts[:-1]):
            loop.call_later(index * PACE_S, self.transport.write, part)
        # The end right after the last chunk: the pauses are between the chunks.
        loop.call_later((len(parts) - 2) * PACE_S, self.transport.write, parts[-1])


def serve_canned(protocol: type[CannedHTTP], port: int) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(protocol, HOST, port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def start_helpers(
    script: str,
    env: dict[str, str],
    state: Path,
    fake_port: int,
    reference_port: int,
    reference: str = "aiohttp",
) -> tuple[subprocess.Popen, subprocess.Popen]:
    """(the fake, the bare pass-through of kind ``reference`` in front of it), each
    ``script`` in its own process (``--serve-fake``, ``--serve-passthrough``: see
    ``serve_helper``)."""
    fake_argv = [sys.executable, script, "--serve-fake", str(fake_port)]
    fake = start(fake_argv, env, state / "fake.log")
    reference_argv = [script, "--serve-passthrough", str(reference_port), str(fake_port)]
    reference_argv += ["--reference", reference]
    return fake, start([sys.executable, *reference_argv], env, state / "reference.log")


def serve_helper(args: argparse.Namespace, fake: type[CannedHTTP]) -> bool:
    """Serve ``fake`` or the pass-through if ``args`` (``output_arguments``) ask for one."""
    if args.serve_fake:
        serve_canned(fake, args.serve_fake)
    elif args.serve_passthrough:
        serve = serve_asgi_passthrough if args.reference == "asgi" else serve_passthrough
        serve(*args.serve_passthrough)
    else:
        return False
    return True


def serve_passthrough(port: int, backend_port: int) -> None:
    """The reference hop of DESIGN 7: a bare aiohttp pass-through to the fake, streaming
    its answers back chunk by chunk. What any Python hop costs on this machine today."""
    import uvloop
    from aiohttp import ClientSession, web

    backend = f"http://{HOST}:{backend_port}"

    async def session(app: web.Application):
        app["session"] = ClientSession()
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with request.app["session"].request(
            request.method, backend + request.path, data=body, headers=HEADERS
        ) as answer:
            response = web.StreamResponse(status=answer.status)
            response.content_type = answer.content_type
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{path:.*}", forward)
    uvloop.install()
    web.run_app(app, host=HOST, port=port, access_log=None, print=None)


def serve_asgi_passthrough(port: int, backend_port: int) -> None:
    """The same pass-through as a bare ASGI app on uvicorn (httptools, uvloop), the server
    the daemons run on (``--reference asgi``): not DESIGN 7's reference, but what that
    server costs by itself, to tell it from what a daemon's app adds."""
    import uvicorn
    from aiohttp import ClientSession

    backend = f"http://{HOST}:{backend_port}"
    sessions: list[ClientSession] = []

    async def lifespan(receive, send) -> None:
        while (await receive())["type"] == "lifespan.startup":
            sessions.append(ClientSession())
            await send({"type": "lifespan.startup.complete"})
        await sessions[0].close()
        await send({"type": "lifespan.shutdown.complete"})

    async def forward(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        url = backend + scope["path"]
        async with sessions[0].request(scope["method"], url, data=body, headers=HEADERS) as answer:
            content_type = answer.headers.get("Content-Type", "application/json").encode()
            start = {"type": "http.response.start", "status": answer.status}
            await send(start | {"headers": [(b"content-type", content_type)]})
            async for chunk in answer.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    uvicorn.run(
        forward,
        host=HOST,
        port=port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )


# --- measuring a hop -------------------------------------------------------------------------


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


def paced_body(body: bytes) -> bytes:
    """A streamed chat ``body`` (OpenAI's or Ollama's) the fake answers paced."""
    chat = json.loads(body)
    chat["messages"] = [*chat["messages"][:-1], chat["messages"][-1] | {"content": PACED}]
    return json.dumps(chat).encode()


def measure_pacing(targets: dict[str, tuple[int, str, bytes]], calls: int) -> dict:
    """Whether a hop passes a stream's chunks on as they come: ``calls`` paced streams
    (``paced_body``) to each target, in turn; per target, the pauses kept (reads that came
    at least half a pace after the one before: the direct call sees every pause the fake
    made) and the median time from the first read to the last (about 0 when a hop sends
    a stream on at once)."""
    kept = {name: 0 for name in targets}
    spans: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(calls):
        for name, (port, path, body) in targets.items():
            conn = http.client.HTTPConnection(HOST, port, timeout=CALL_TIMEOUT_S)
            conn.request("POST", path, paced_body(body), HEADERS)
            response = conn.getresponse()
            reads = []
            while response.read1():
                reads.append(time.perf_counter())
            conn.close()
            if response.status != 200:
                raise RuntimeError(f"{path}: HTTP {response.status}")
            kept[name] += sum(b - a >= PACE_S / 2 for a, b in itertools.pairwise(reads))
            spans[name].append((reads[-1] - reads[0]) * 1000)
    return {"calls": calls, "pace_ms": PACE_S * 1000, "kept": kept} | {
        "span_ms": {name: statistics.median(values) for name, values in spans.items()}
    }


def run(
    targets: dict[str, tuple[int, str, bytes]],
    pids: dict[str, int],
    requests: int,
    warmup: int,
    rounds: int,
    whole_rounds: bool = False,
) -> dict:
    """Concurrency 1: call each of ``targets`` (name: port, path, body) in turn, ``direct``
    (the fake), ``reference`` (the bare hop) and ``via`` (the hop measured), so all see the
    same machine state; ``pids`` of the two hops. Per measure, the median over ``rounds``
    of each round's p50 (a round disturbed by another process on the machine does not
    decide), and the p99 of all calls; per hop, the median of the rounds' CPU per call,
    read around each call: what the hop spends until the caller has its answer.
    ``whole_rounds`` adds each hop's CPU over whole rounds per call (``round_`` key): also
    what it does after the answer is out and in the background."""
    conns = {name: http.client.HTTPConnection(HOST, target[0]) for name, target in targets.items()}
    for _ in range(warmup):
        for name, (_, path, body) in targets.items():
            call(conns[name], path, body)
    names = [name + measure for name in targets for measure in ("", "_ttfb")]
    every: dict[str, list[float]] = {name: [] for name in names}
    round_p50s: dict[str, list[float]] = {name: [] for name in names}
    round_cpu: dict[str, list[float]] = {name: [] for name in pids}
    spans: dict[str, list[float]] = {name: [] for name in pids if whole_rounds}
    per_round = max(1, requests // rounds)
    for _ in range(rounds):
        began = {name: cpu_seconds(pids[name]) for name in spans}
        samples: dict[str, list[float]] = {name: [] for name in names}
        cpu = dict.fromkeys(round_cpu, 0.0)
        for _ in range(per_round):
            for name, (_, path, body) in targets.items():
                pid = pids.get(name)
                before = cpu_seconds(pid) if pid else 0.0
                first, total = call(conns[name], path, body)
                if pid:
                    cpu[name] += cpu_seconds(pid) - before
                samples[name].append(total)
                samples[name + "_ttfb"].append(first)
        for name in names:
            every[name] += samples[name]
            round_p50s[name].append(percentile(samples[name], 0.50))
        for name, seconds in cpu.items():
            round_cpu[name].append(seconds / per_round)
        for name, spent in spans.items():
            spent.append((cpu_seconds(pids[name]) - began[name]) / per_round)
    for conn in conns.values():
        conn.close()
    figures: dict = {
        name: {
            "p50": statistics.median(round_p50s[name]) / 1e6,
            "p99": percentile(every[name], 0.99) / 1e6,
        }
        for name in names
    }
    for kind, cpu_of in (("", round_cpu), ("round_", spans)):
        if cpu_of:
            figures[f"{kind}cpu_ms_per_request"] = {
                name: statistics.median(per_call) * 1000 for name, per_call in cpu_of.items()
            }
    return figures


# Each window ends with a pause, so the calls still in flight finish before the next starts.
GAP_S = 0.2
# A call that takes longer than this under load counts as an error.
CALL_TIMEOUT_S = 30


def client_worker(
    targets: dict[str, tuple[int, str, bytes]],
    threads: int,
    windows: list[tuple[str, float, float]],
    warmup: int,
) -> dict:
    """One client process: ``threads`` threads, each with one keep-alive connection per
    target (name: port, path, body), warm up, then call as fast as they can during each
    (target, start, end) window (``time.monotonic``, shared by all processes). Per window:
    (TTFB, total) ns of every call started inside it that answered 200, and the count of
    those that did not (an error status, a broken connection, a timeout)."""
    samples: list[list[tuple[int, int]]] = [[] for _ in windows]
    errors = [0] * len(windows)
    late: list[bool] = []
    lock = threading.Lock()

    def client() -> None:
        conns = {
            name: http.client.HTTPConnection(HOST, t[0], timeout=CALL_TIMEOUT_S)
            for name, t in targets.items()
        }
        for _ in range(warmup):
            for name, conn in conns.items():
                call(conn, *targets[name][1:])
        mine: list[list[tuple[int, int]]] = [[] for _ in windows]
        failed = [0] * len(windows)
        late.append(time.monotonic() > windows[0][1])
        for index, (name, start_at, end_at) in enumerate(windows):
            time.sleep(max(0.0, start_at - time.monotonic()))
            conn, (_, path, payload) = conns[name], targets[name]
            while time.monotonic() < end_at:
                try:
                    mine[index].append(call(conn, path, payload))
                except (OSError, http.client.HTTPException, RuntimeError):
                    failed[index] += 1
                    conn.close()  # the next request opens a new connection
        for conn in conns.values():
            conn.close()
        with lock:
            for index, calls in enumerate(mine):
                samples[index] += calls
                errors[index] += failed[index]

    cpu_started = time.process_time()
    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {
        "samples": samples,
        "errors": errors,
        "late": any(late),
        "cpu_s": time.process_time() - cpu_started,
    }


def _p(calls: list[tuple[int, int]], index: int, fraction: float) -> float:
    """A percentile of the calls' TTFB (``index`` 0) or total (1), in ms; NaN for none."""
    return percentile([c[index] for c in calls], fraction) / 1e6 if calls else math.nan


def run_concurrent(
    pool,
    clients: int,
    targets: dict[str, tuple[int, str, bytes]],
    pids: dict[str, int],
    seconds: float,
    warmup: int,
    rounds: int,
    concurrency: int,
) -> dict:
    """``concurrency`` closed-loop callers in ``clients`` processes; each round one window
    per target (name: port, path, body; ``direct``, ``reference``, ``via``), in an order
    that turns by one each round, so no target always follows the same one. Per target,
    the median over its windows of each window's p50 and req/s, the p99 of all its calls
    and its failed calls; per hop of ``pids``, its CPU per call over its windows."""
    names = list(targets)
    lead = 1.5  # spawned clients connect and warm up before the first window
    start = time.monotonic() + lead
    windows = []
    for n in range(rounds):
        for name in names[n % len(names) :] + names[: n % len(names)]:
            opens = start + len(windows) * (seconds + GAP_S)
            windows.append((name, opens, opens + seconds))
    shares = [concurrency // clients + (n < concurrency % clients) for n in range(clients)]
    pending = pool.starmap_async(
        client_worker, [(targets, threads, windows, warmup) for threads in shares if threads]
    )
    hop_cpu: dict[str, list[float]] = {name: [] for name in pids}
    for name, opens, closes in windows:
        time.sleep(max(0.0, opens - time.monotonic()))
        before = cpu_seconds(pids[name]) if name in pids else 0.0
        time.sleep(max(0.0, closes + GAP_S - time.monotonic()))
        if name in pids:
            hop_cpu[name].append(cpu_seconds(pids[name]) - before)
    results = pending.get()
    if any(result["late"] for result in results):
        raise RuntimeError("the clients' warm-up ran into the first window: lower --warmup")
    samples = [[c for result in results for c in result["samples"][n]] for n in range(len(windows))]
    errors = [sum(result["errors"][n] for result in results) for n in range(len(windows))]
    figures: dict = {}
    for side in names:
        mine = [n for n, (name, _, _) in enumerate(windows) if name == side]
        every = [c for n in mine for c in samples[n]]
        for measure, index in (("", 1), ("_ttfb", 0)):
            figures[side + measure] = {
                "p50": statistics.median(_p(samples[n], index, 0.50) for n in mine),
                "p99": _p(every, index, 0.99),
            }
        figures[side]["per_s"] = statistics.median(len(samples[n]) / seconds for n in mine)
        figures[side]["errors"] = sum(errors[n] for n in mine)
    figures["cpu_ms_per_request"] = {}
    for name, spent in hop_cpu.items():
        calls = [len(samples[n]) for n, window in enumerate(windows) if window[0] == name]
        per_call = [cpu / n if n else math.nan for cpu, n in zip(spent, calls, strict=True)]
        figures["cpu_ms_per_request"][name] = statistics.median(per_call) * 1000
    span = windows[-1][2] - windows[0][1] + GAP_S
    figures["client_cores"] = sum(result["cpu_s"] for result in results) / (span + lead)
    return figures


# --- DESIGN 7's rows, each with its verdict --------------------------------------------------


@dataclass(frozen=True)
class HopBudgets:
    """DESIGN 7's budgets of a hop, as ratios of the hop's figure to the bare hop's in the
    same run (DESIGN 7: "router hop", "router under concurrency", "wrapper hop")."""

    added_p50: float  # concurrency 1, non-stream: added p50, at most
    cpu: float  # concurrency 1, non-stream: CPU per request, at most
    added_ttfb: float  # streaming, concurrency 1: added time-to-first-byte p50, at most
    per_s: float  # concurrency 16 and 64: req/s, at least
    added_p99: float  # concurrency 16 and 64: added p99, at most


# Chunks unbuffered: of the pauses a paced stream makes (as the direct call sees them), the
# share a hop keeps; not all, as a busy machine may delay one read past the next chunk.
UNBUFFERED = 95.0
PACED_CALLS = 10  # paced streams per target
MEMORY_BUDGET_MB = 100.0  # RSS per daemon without a model (DESIGN 7), judged on the peak
# "Flat under sustained load": the RSS at the end of the run is at most 5% above the RSS
# after the warm-up (DESIGN 7: no growth after warm-up; 5% is room for the allocator).
FLAT_GROWTH = 0.05

SCENARIOS = {"non_stream": "non-stream", "stream": "stream"}
TIMES = "\N{MULTIPLICATION SIGN}"


def _ratio(hop: float, bare: float) -> float:
    """The hop's figure over the bare hop's; NaN when the bare hop's is not above zero."""
    return hop / bare if bare > 0 else math.nan


def _added(figures: dict, measure: str, stat: str) -> tuple[float, float]:
    """(bare hop, hop): what each adds to the direct call's ``stat`` of ``measure``."""
    direct = figures["direct" + measure][stat]
    return figures["reference" + measure][stat] - direct, figures["via" + measure][stat] - direct


def _row(row: str, measure: str, bare, hop, value, budget, unit, at_least=False) -> dict:
    """One measure of a DESIGN 7 row: the figures, the judged ``value``, the verdict."""
    judged = judge(value, budget, at_least)
    sign = "≥" if at_least else "≤"
    return {
        "row": row,
        "measure": measure,
        "bare_hop": bare,
        "hop": hop,
        "value": None if value is None or math.isnan(value) else value,
        "unit": unit,
        "budget": f"{sign} {budget:g}{unit}",
        "budget_value": budget,
        **judged,
    }


def _ratio_row(row: str, measure: str, bare: float, hop: float, budget: float, at_least=False):
    return _row(row, measure, bare, hop, _ratio(hop, bare), budget, TIMES, at_least)


def verdict_rows(results: dict, budgets: HopBudgets, hop: str) -> list[dict]:
    """Every DESIGN 7 row ``measure_hop`` measured for ``hop``, each measure judged."""
    plain, stream = results["non_stream"], results["stream"]
    label = f"{hop} hop, non-stream, concurrency 1"
    rows = [_ratio_row(label, "added p50 (ms)", *_added(plain, "", "p50"), budgets.added_p50)]
    for kind, how in (("", "read around each call"), ("round_", "whole rounds")):
        if f"{kind}cpu_ms_per_request" in plain:
            cpu = plain[f"{kind}cpu_ms_per_request"]
            measure = f"CPU per request (ms), {how}"
            rows.append(_ratio_row(label, measure, cpu["reference"], cpu["via"], budgets.cpu))
    label = f"{hop} hop, streaming, concurrency 1"
    added = _added(stream, "_ttfb", "p50")
    rows.append(_ratio_row(label, "added time to first byte p50 (ms)", *added, budgets.added_ttfb))
    pacing = results["pacing"]
    kept = {name: 100 * n / max(1, pacing["kept"]["direct"]) for name, n in pacing["kept"].items()}
    measure = "chunks unbuffered: the fake's pauses kept (%)"
    rows.append(
        _row(label, measure, kept["reference"], kept["via"], kept["via"], UNBUFFERED, "%", True)
    )
    for concurrency in results["concurrency"]:
        for scenario, name in SCENARIOS.items():
            figures = results[f"{scenario}_c{concurrency}"]
            bare, via = figures["reference"], figures["via"]
            label = f"{hop} under concurrency {concurrency}, {name}"
            rows += [
                _ratio_row(label, "req/s", bare["per_s"], via["per_s"], budgets.per_s, True),
                _ratio_row(label, "added p99 (ms)", *_added(figures, "", "p99"), budgets.added_p99),
                _row(label, "errors", bare["errors"], via["errors"], via["errors"], 0, "")
                | {"budget": "0"},
            ]
    warm, end = results["memory_warm"]["VmRSS"], results["memory_end"]["VmRSS"]
    peak = results["memory_end"]["VmHWM"]
    growth = (end / warm - 1) * 100
    label = f"{hop} memory"
    rows += [
        _row(label, "peak RSS (MB)", None, peak, peak, MEMORY_BUDGET_MB, " MB"),
        _row(label, "RSS after warm-up → at end (MB)", None, end, growth, FLAT_GROWTH * 100, "%")
        | {"after_warmup": warm, "budget": f"growth ≤ {FLAT_GROWTH:.0%}"},
    ]
    return rows


def _cell(value, measure: str) -> str:
    if value is None:
        return "—"
    if measure == "req/s":
        return f"{value:,.0f}"
    if measure == "errors":
        return f"{value:d}"
    return f"{value:.1f}" if "MB" in measure else f"{value:.3f}"


def verdict_table(rows: list[dict], hop: str) -> list[str]:
    """The rows of ``verdict_rows`` as Markdown."""
    lines = [
        f"| DESIGN 7 row | measure | bare hop | {hop} | measured | budget | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "value" not in row:  # not measured
            cells = [row["row"], row["measure"], "—", "—", "—", "—", f"not measured: {row['why']}"]
        else:
            spec = ".2f" if row["unit"] in (TIMES, "%") else ".1f" if "MB" in row["unit"] else "d"
            value = "n/a" if row["value"] is None else f"{row['value']:{spec}}{row['unit']}"
            text = verdict_text(row, row["budget_value"], row["unit"], spec)
            hop_cell = _cell(row["hop"], row["measure"])
            if "after_warmup" in row:
                hop_cell = f"{row['after_warmup']:.1f} → {hop_cell}"
            cells = [
                row["row"],
                row["measure"],
                _cell(row["bare_hop"], row["measure"]),
                hop_cell,
                value,
                row["budget"],
                text,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _figures_row(label: str, figures: dict, measure: str, with_rate: bool) -> str:
    sides = [figures[name + measure] for name in ("direct", "reference", "via")]
    rates = "—"
    cpu = "—"
    if with_rate and "per_s" in sides[0]:
        rates = " / ".join(f"{side['per_s']:,.0f}" for side in sides)
    if with_rate and "cpu_ms_per_request" in figures:
        per = figures["cpu_ms_per_request"]
        cpu = f"{per['reference']:.3f} / {per['via']:.3f}"
    cells = [label, *(f"{side['p50']:.3f} / {side['p99']:.3f}" for side in sides), rates, cpu]
    return "| " + " | ".join(cells) + " |"


def figures_table(results: dict, hop: str) -> list[str]:
    """What the verdicts were computed from: each target's p50 / p99, req/s and CPU."""
    lines = [
        f"| concurrency, measure (ms) | direct p50 / p99 | bare hop p50 / p99 | {hop} p50 / p99 "
        f"| req/s direct / bare hop / {hop} | CPU ms per request, bare hop / {hop} |",
        "|---|---|---|---|---|---|",
    ]
    for concurrency, suffix in ((1, ""), *((c, f"_c{c}") for c in results["concurrency"])):
        plain, stream = results["non_stream" + suffix], results["stream" + suffix]
        lines += [
            _figures_row(f"{concurrency}, non-stream, whole call", plain, "", True),
            _figures_row(f"{concurrency}, stream, time to first byte", stream, "_ttfb", False),
            _figures_row(f"{concurrency}, stream, whole stream", stream, "", True),
        ]
    return lines


def machine_line(results: dict, command: str) -> str:
    """The command, the machine, and its load (other work skews every figure)."""
    return (
        f"`{command}` — {platform.node()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, load average {results['loadavg_start']} at start, "
        f"{results['loadavg_end']} at end"
    )


REFERENCES = {
    "aiohttp": "The bare hop is the reference of DESIGN 7, a bare aiohttp pass-through in "
    "front of the same fake.",
    "asgi": "The bare hop here is NOT DESIGN 7's reference (`--reference asgi`): the same "
    "pass-through as a bare ASGI app on uvicorn, the daemons' server, in front of the same "
    "fake; the ratios tell what a daemon's app adds to its server.",
}


def hop_report(
    results: dict,
    command: str,
    hop: str,
    hopped: str,
    *,
    about: str = "",
    after: tuple[str, ...] = (),
    started: str = "at start (healthy, before any call)",
) -> str:
    """The Markdown report of ``measure_hop`` for ``hop`` ("wrapper"; ``hopped``: "wrapped")
    with its ``results["rows"]`` (``verdict_rows``), ``about`` the hop after the method,
    and ``after`` (lines) at the end."""
    shares = results["clients"]
    concurrencies = " and ".join(map(str, results["concurrency"]))
    method = (
        "Ratios are the hop's figure over the bare hop's, both measured in this run (added: "
        f"minus the direct call's). {REFERENCES[results['reference']]} Concurrency 1: "
        f"{results['requests']} calls per scenario in {results['rounds']} rounds (median of "
        f"the rounds' p50; p99 of all), direct, bare-hop and {hopped} calls in turn. "
        f"Concurrency {concurrencies}: {shares} client processes sharing the threads, each "
        f"thread with its own keep-alive connections; {results['rounds']} rounds of a direct, "
        f"a bare-hop and a {hopped} window of {results['seconds']} s, in an order that turns "
        "each round (median of the windows' p50 and req/s; p99 of all calls; an error is a "
        "call that did not answer 200); a streamed call's p99 is to its last byte. Memory: "
        f"VmRSS after an untimed warm-up ({results['warmup_seconds']} s of each scenario at "
        f"concurrency {max(results['concurrency'])} through the {hop} alone) and at the end "
        f"of all scenarios; the peak is VmHWM."
    )
    memory = results["memory_start"], results["memory_warm"], results["memory_end"]
    clients = ", ".join(
        f"{results[f'non_stream_c{c}']['client_cores']:.2f} / "
        f"{results[f'stream_c{c}']['client_cores']:.2f} at {c}"
        for c in results["concurrency"]
    )
    lines = [
        machine_line(results, command),
        "",
        f"{method} {about}".rstrip(),
        "",
        *verdict_table(results["rows"], hop),
        "",
        *figures_table(results, hop),
        "",
        f"{hop.capitalize()} VmRSS {started}: {memory[0]['VmRSS']:.1f} MB; after warm-up "
        f"{memory[1]['VmRSS']:.1f} MB; at end {memory[2]['VmRSS']:.1f} MB (peak "
        f"{memory[2]['VmHWM']:.1f} MB). Cores the clients used (non-stream / stream): "
        f"{clients}.",
        *after,
    ]
    return "\n".join(lines)


# --- a hop benchmark's run -------------------------------------------------------------------


def hop_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a hop benchmark's load (``measure_hop``)."""
    parser.add_argument("--requests", type=int, default=3_000, help="timed calls per scenario")
    parser.add_argument("--rounds", type=int, default=5, help="rounds the calls are split into")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls first")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[16, 64], help="the concurrent loads"
    )
    parser.add_argument("--seconds", type=float, default=0.8, help="concurrent: per window")
    parser.add_argument("--clients", type=int, default=4, help="concurrent: client processes")
    parser.add_argument(
        "--warmup-seconds", type=float, default=8.0, help="memory: untimed load per scenario"
    )
    parser.add_argument(
        "--reference",
        choices=["aiohttp", "asgi"],
        default="aiohttp",
        help="the bare hop: DESIGN 7's aiohttp pass-through, or the same as a bare ASGI app "
        "on uvicorn (what the daemons' server costs by itself; not DESIGN 7's reference)",
    )


def output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json``, and the hidden options that start a hop benchmark's helper servers."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--serve-fake", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-passthrough", type=int, nargs=2, help=argparse.SUPPRESS)


def measure_hop(
    pool,
    args: argparse.Namespace,
    targets: Callable[[str], dict],
    pids: dict[str, int],
    whole_rounds: bool = False,
) -> dict:
    """The hop's memory before any call; an untimed warm-up through the hop alone at the
    highest concurrency and its memory after it; both scenarios at concurrency 1 (``run``),
    then at each of ``args.concurrency`` (``run_concurrent``), as ``args``
    (``hop_arguments``) says; its memory at the end. ``targets(scenario)``, ``pids`` and
    ``whole_rounds`` as ``run`` takes them."""
    top = max(args.concurrency)
    results: dict = {
        "reference": args.reference,
        "requests": args.requests,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "clients": args.clients,
        "concurrency": sorted(args.concurrency),
        "warmup_seconds": args.warmup_seconds,
        "memory_start": memory_mb(pids["via"]),
    }
    for scenario in SCENARIOS:
        via = {"via": targets(scenario)["via"]}
        warmup = max(1, args.warmup // top)
        run_concurrent(pool, args.clients, via, {}, args.warmup_seconds, warmup, 1, top)
    results["memory_warm"] = memory_mb(pids["via"])
    for scenario in SCENARIOS:
        results[scenario] = run(
            targets(scenario), pids, args.requests, args.warmup, args.rounds, whole_rounds
        )
    results["pacing"] = measure_pacing(targets("stream"), PACED_CALLS)
    for concurrency in results["concurrency"]:
        for scenario in SCENARIOS:
            results[f"{scenario}_c{concurrency}"] = run_concurrent(
                pool,
                args.clients,
                targets(scenario),
                pids,
                args.seconds,
                max(1, args.warmup // concurrency),
                args.rounds,
                concurrency,
            )
    results["memory_end"] = memory_mb(pids["via"])
    return results
