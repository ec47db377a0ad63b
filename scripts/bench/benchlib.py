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
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


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


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def ignore_sigint() -> None:
    """Pool initializer: Ctrl-C is the parent's to handle; it terminates the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def verdict(value: float, budget: float, unit: str = "ms", at_least: bool = False) -> str:
    ok = value >= budget if at_least else value <= budget
    missed = "**under**" if at_least else "**over**"
    return f"{'≥' if at_least else '≤'} {budget:g} {unit} " + ("ok" if ok else missed)


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
# The hop budgets of DESIGN 7, the same for the wrapper and the router.

BUDGET_MS = 1.0  # added p50, CPU per request, added TTFT p50
BUDGET_RSS_MB = 80
CONCURRENCY = 16
HEADERS = {"Content-Type": "application/json"}


def http_response(body: bytes, content_type: bytes = b"application/json") -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
    return head % (content_type, len(body)) + body


def http_chunked(chunks: list[bytes], content_type: bytes) -> bytes:
    """A whole answer in chunked transfer encoding, one chunk a piece."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    return head % content_type + body + b"0\r\n\r\n"


class CannedHTTP(asyncio.Protocol):
    """Just enough HTTP/1.1 (keep-alive, Content-Length bodies) to answer each call with
    ``CANNED[(method, path, the body has "stream": true)]``, whole, at once."""

    CANNED: dict[tuple[bytes, bytes, bool], bytes] = {}
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
    script: str, env: dict[str, str], state: Path, fake_port: int, reference_port: int
) -> tuple[subprocess.Popen, subprocess.Popen]:
    """(the fake, the bare pass-through in front of it), each ``script`` in its own process
    (``--serve-fake``, ``--serve-passthrough``: see ``serve_helper``)."""
    fake_argv = [sys.executable, script, "--serve-fake", str(fake_port)]
    fake = start(fake_argv, env, state / "fake.log")
    reference_argv = [script, "--serve-passthrough", str(reference_port), str(fake_port)]
    return fake, start([sys.executable, *reference_argv], env, state / "reference.log")


def serve_helper(args: argparse.Namespace, fake: type[CannedHTTP]) -> bool:
    """Serve ``fake`` or the pass-through if ``args`` (``output_arguments``) ask for one."""
    if args.serve_fake:
        serve_canned(fake, args.serve_fake)
    elif args.serve_passthrough:
        serve_passthrough(*args.serve_passthrough)
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
    ``whole_rounds`` adds each hop's CPU over whole rounds per call (``round_`` keys): also
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
    figures = {
        name: {
            "p50": statistics.median(round_p50s[name]) / 1e6,
            "p99": percentile(every[name], 0.99) / 1e6,
        }
        for name in names
    }
    for kind, cpu_of in (("", round_cpu), ("round_", spans)):
        if cpu_of:
            figures[f"{kind}cpu_ms_per_request"] = statistics.median(cpu_of["via"]) * 1000
            reference = statistics.median(cpu_of["reference"]) * 1000
            figures[f"reference_{kind}cpu_ms_per_request"] = reference
    return figures


# Each window ends with a pause, so the calls still in flight finish before the next starts.
GAP_S = 0.2


def client_worker(
    targets: dict[str, tuple[int, str, bytes]],
    threads: int,
    windows: list[tuple[str, float, float]],
    warmup: int,
) -> dict:
    """One client process: ``threads`` threads, each with one keep-alive connection per
    target (name: port, path, body), warm up, then call as fast as they can during each
    (target, start, end) window (``time.monotonic``, shared by all processes). Per window:
    (TTFB, total) ns of every call started inside it."""
    samples: list[list[tuple[int, int]]] = [[] for _ in windows]
    late: list[bool] = []
    lock = threading.Lock()

    def client() -> None:
        conns = {name: http.client.HTTPConnection(HOST, t[0]) for name, t in targets.items()}
        for _ in range(warmup):
            for name, conn in conns.items():
                call(conn, *targets[name][1:])
        mine: list[list[tuple[int, int]]] = [[] for _ in windows]
        late.append(time.monotonic() > windows[0][1])
        for index, (name, start_at, end_at) in enumerate(windows):
            time.sleep(max(0.0, start_at - time.monotonic()))
            conn, (_, path, payload) = conns[name], targets[name]
            while time.monotonic() < end_at:
                mine[index].append(call(conn, path, payload))
        for conn in conns.values():
            conn.close()
        with lock:
            for index, calls in enumerate(mine):
                samples[index] += calls

    cpu_started = time.process_time()
    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {"samples": samples, "late": any(late), "cpu_s": time.process_time() - cpu_started}


def run_concurrent(
    pool,
    clients: int,
    targets: dict[str, tuple[int, str, bytes]],
    hop_pid: int,
    seconds: float,
    warmup: int,
    rounds: int,
    concurrency: int = CONCURRENCY,
) -> dict:
    """``concurrency`` closed-loop callers in ``clients`` processes; each round a window
    of ``direct`` calls, then one ``via`` the hop (``targets``: name: port, path, body).
    Per measure, the median over rounds of each window's p50 and req/s, and the p99 of
    all calls; the hop's CPU per call over its windows."""
    targets = {side: targets[side] for side in ("direct", "via")}
    lead = 1.5  # spawned clients connect and warm up before the first window
    start = time.monotonic() + lead
    windows = []
    for n in range(2 * rounds):
        opens = start + n * (seconds + GAP_S)
        windows.append(("direct" if n % 2 == 0 else "via", opens, opens + seconds))
    shares = [concurrency // clients + (n < concurrency % clients) for n in range(clients)]
    pending = pool.starmap_async(
        client_worker, [(targets, threads, windows, warmup) for threads in shares]
    )
    hop_cpu = []
    for name, opens, closes in windows:
        time.sleep(max(0.0, opens - time.monotonic()))
        before = cpu_seconds(hop_pid)
        time.sleep(max(0.0, closes + GAP_S - time.monotonic()))
        if name == "via":
            hop_cpu.append(cpu_seconds(hop_pid) - before)
    results = pending.get()
    if any(result["late"] for result in results):
        raise RuntimeError("the clients' warm-up ran into the first window: lower --warmup")
    samples = [[c for result in results for c in result["samples"][n]] for n in range(len(windows))]
    sides = {
        side: [calls for (name, _, _), calls in zip(windows, samples, strict=True) if name == side]
        for side in ("direct", "via")
    }
    figures: dict = {}
    for side, mine in sides.items():
        for measure, index in (("", 1), ("_ttfb", 0)):
            p50s = [percentile([c[index] for c in calls], 0.50) for calls in mine]
            every = [c[index] for calls in mine for c in calls]
            figures[side + measure] = {
                "p50": statistics.median(p50s) / 1e6,
                "p99": percentile(every, 0.99) / 1e6,
            }
        figures[side]["per_s"] = statistics.median(len(calls) / seconds for calls in mine)
    per_call = [cpu / len(calls) for cpu, calls in zip(hop_cpu, sides["via"], strict=True)]
    span = windows[-1][2] - windows[0][1] + GAP_S
    return figures | {
        "cpu_ms_per_request": statistics.median(per_call) * 1000,
        "client_cores": sum(result["cpu_s"] for result in results) / (span + lead),
    }


# --- the report's tables ---------------------------------------------------------------------


def machine_line(results: dict, command: str) -> str:
    """The command, the machine, and its load (other work skews every figure)."""
    return (
        f"`{command}` — {platform.node()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, load average {results['loadavg_start']} at start, "
        f"{results['loadavg_end']} at end"
    )


def concurrent_note(results: dict, plain: dict, stream: dict, hopped: str) -> str:
    """How ``run_concurrent`` loaded the hop (``hopped``: "wrapped", "routed"...)."""
    shares = results["clients"]
    return (
        f"Concurrency {CONCURRENCY}: {shares} client processes x {CONCURRENCY // shares}"
        f"{'+' if CONCURRENCY % shares else ''} threads, each with its own keep-alive connection; "
        f"{results['rounds']} rounds of a direct then a {hopped} {results['seconds']} s window "
        "(median of the windows' p50 and req/s; p99 of all); the clients used "
        f"{plain['client_cores']:.2f} / {stream['client_cores']:.2f} cores (non-stream / "
        "stream); budgets are set at concurrency 1"
    )


def _row(label: str, direct: dict, via: dict) -> str:
    """Concurrency 16: not budgeted (the budgets are set at concurrency 1)."""
    cells = [
        label,
        f"{direct['p50']:.3f} / {direct['p99']:.3f}",
        f"{via['p50']:.3f} / {via['p99']:.3f}",
        f"{via['p50'] - direct['p50']:.3f}",
        f"{direct['per_s']:,.0f} / {via['per_s']:,.0f}" if "per_s" in via else "—",
    ]
    return "| " + " | ".join([*cells, "—"]) + " |"


def _hop_row(label: str, figures: dict, measure: str, budgeted: bool = True) -> str:
    direct, bare, via = (figures[name + measure] for name in ("direct", "reference", "via"))
    added = via["p50"] - direct["p50"]
    cells = [
        label,
        *(f"{f['p50']:.3f} / {f['p99']:.3f}" for f in (direct, bare, via)),
        f"{bare['p50'] - direct['p50']:.3f} / {added:.3f}",
        verdict(added, BUDGET_MS) if budgeted else "—",
    ]
    return "| " + " | ".join(cells) + " |"


def _hop_cpu_row(label: str, figures: dict, budgeted: bool, kind: str = "") -> str:
    cpu = figures[f"{kind}cpu_ms_per_request"]
    budget = verdict(cpu, BUDGET_MS) if budgeted else "—"
    bare = figures[f"reference_{kind}cpu_ms_per_request"]
    return f"| {label} | — | — | — | {bare:.3f} / {cpu:.3f} | {budget} |"


def _memory_row(label: str, memory: dict, budgeted: bool) -> str:
    budget = verdict(memory["VmHWM"], BUDGET_RSS_MB, "MB") + " (peak)" if budgeted else "—"
    return f"| {label} | {memory['VmRSS']:.1f} | {memory['VmHWM']:.1f} | {budget} |"


def hop_table(plain: dict, stream: dict, hop: str) -> list[str]:
    """Concurrency 1 (results of ``run``): direct, bare hop and ``hop``, against budgets."""
    return [
        f"| measure (ms) | direct p50 / p99 | bare hop p50 / p99 | via {hop} p50 / p99 "
        f"| added p50: bare hop / {hop} | budget ({hop}) |",
        "|---|---|---|---|---|---|",
        _hop_row("non-stream, whole call", plain, ""),
        _hop_row("stream, time to first byte", stream, "_ttfb"),
        _hop_row("stream, whole stream", stream, "", budgeted=False),
        _hop_cpu_row("CPU per request, non-stream", plain, budgeted=True),
        _hop_cpu_row("CPU per request, stream (not budgeted)", stream, budgeted=False),
        *(
            [
                _hop_cpu_row("CPU per request, non-stream, whole rounds", plain, True, "round_"),
                _hop_cpu_row("CPU per request, stream, whole rounds", stream, False, "round_"),
            ]
            if "round_cpu_ms_per_request" in plain
            else []
        ),
    ]


def concurrent_table(plain: dict, stream: dict, hop: str) -> list[str]:
    """Concurrency 16 (results of ``run_concurrent``): direct and ``hop``, with req/s."""
    return [
        f"| measure (ms) | direct p50 / p99 | via {hop} p50 / p99 | added p50 "
        "| req/s direct / via | budget |",
        "|---|---|---|---|---|---|",
        _row("non-stream, whole call", plain["direct"], plain["via"]),
        _row("stream, time to first byte", stream["direct_ttfb"], stream["via_ttfb"]),
        _row("stream, whole stream", stream["direct"], stream["via"]),
        *(
            f"| {hop} CPU per request, {label} | — | — | {f['cpu_ms_per_request']:.3f} | — | — |"
            for label, f in (("non-stream", plain), ("stream", stream))
        ),
    ]


def memory_table(start: dict, end: dict, hop: str, started: str) -> list[str]:
    """``memory_mb`` of the hop at its start and end; the budget holds the peak."""
    return [
        f"| {hop} memory (MB) | VmRSS | VmHWM (peak) | budget |",
        "|---|---|---|---|",
        _memory_row(started, start, False),
        _memory_row("at end (after all scenarios)", end, True),
    ]


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
    """The Markdown report of ``measure_hop`` for ``hop`` ("wrapper"; ``hopped``: "wrapped"),
    with ``about`` the hop after the method, and ``after`` (lines) before its memory."""
    plain, stream = results["non_stream"], results["stream"]
    plain16, stream16 = results[f"non_stream_c{CONCURRENCY}"], results[f"stream_c{CONCURRENCY}"]
    method = (
        f"Concurrency 1: {results['requests']} calls per row in {results['rounds']} rounds "
        f"(median of the rounds' p50; p99 of all), direct, bare-hop and {hopped} calls in turn. "
        "The bare hop is the reference of DESIGN 7, a bare aiohttp pass-through (~0.4 ms "
        "added on the machine the budgets were set on): what any Python hop costs here today."
    )
    lines = [
        machine_line(results, command),
        "",
        f"{method} {about}".rstrip(),
        "",
        *hop_table(plain, stream, hop),
        "",
        concurrent_note(results, plain16, stream16, hopped),
        "",
        *concurrent_table(plain16, stream16, hop),
        "",
        *after,
        *memory_table(results["memory_start"], results["memory_end"], hop, started),
    ]
    return "\n".join(lines)


# --- a hop benchmark's run -------------------------------------------------------------------

SCENARIOS = ("non_stream", "stream")


def hop_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a hop benchmark's load (``measure_hop``)."""
    parser.add_argument("--requests", type=int, default=3_000, help="timed calls per scenario")
    parser.add_argument("--rounds", type=int, default=5, help="rounds the calls are split into")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls first")
    parser.add_argument("--seconds", type=float, default=0.8, help="concurrency 16: per window")
    parser.add_argument("--clients", type=int, default=4, help="concurrency 16: client processes")


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
    """Both scenarios at concurrency 1 (``run``), then at ``CONCURRENCY`` (``run_concurrent``),
    as ``args`` (``hop_arguments``) says; ``targets(scenario)``, ``pids`` and ``whole_rounds``
    as ``run`` takes them. With the hop's memory before the first call."""
    results: dict = {
        "requests": args.requests,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "clients": args.clients,
        "memory_start": memory_mb(pids["via"]),
    }
    for scenario in SCENARIOS:
        results[scenario] = run(
            targets(scenario), pids, args.requests, args.warmup, args.rounds, whole_rounds
        )
    for scenario in SCENARIOS:
        results[f"{scenario}_c{CONCURRENCY}"] = run_concurrent(
            pool,
            args.clients,
            targets(scenario),
            pids["via"],
            args.seconds,
            max(1, args.warmup // CONCURRENCY),
            args.rounds,
        )
    return results
