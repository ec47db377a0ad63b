"""Benchmark the wrapper hop (OpenAI in, Ollama API out) against its budgets (DESIGN 7).

Starts an instant fake Ollama backend (raw asyncio, canned bodies) in its own process and
the real wrapper (``python -m services reasoner`` from the default profile, pointed at the
fake by ``SWARM_*`` variables, with a registry URL where nothing listens) in another. The
same load goes to the fake directly (the baseline) and through the wrapper, in the same run:

- concurrency 1: one client (stdlib ``http.client``, keep-alive) alternates direct and
  wrapped calls, so both see the same machine state;
- concurrency 16: ``--clients`` client processes share 16 threads, each thread with its
  own keep-alive connections; the rounds alternate a direct and a wrapped window of
  ``--seconds`` each, and report p50/p99 and requests per second;
- non-streamed: ``POST /api/chat`` direct vs ``POST /v1/chat/completions`` via the wrapper;
- streamed: time to the first body byte (TTFT) and to the end of the stream;
- the wrapper's CPU per request, from ``/proc/<pid>/stat`` (utime + stime) around each
  call (concurrency 1) or each wrapped window (concurrency 16);
- the wrapper's memory, VmRSS and VmHWM (peak) from ``/proc/<pid>/status``, at start and end.

``--throughput`` measures instead the token rate of the whole chain on the real embedded
model (``python -m services.modelhost``, the wrapper in front of it, the official ``openai``
client streaming) against llama-cpp-python called directly in this process and the host
called directly with the ``ollama`` client; helpers shared with ``bench_modelhost.py``.

A benchmark, not a test: a missed budget is reported, not turned into an exit code.

    .venv/bin/python scripts/bench_wrapper.py [--requests 3000] [--rounds 5] [--seconds 0.8]
        [--clients 4] [--json]
    .venv/bin/python scripts/bench_wrapper.py --throughput [--runs 5] [--tokens 256] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import (
    HOST,
    cpu_seconds,
    free_port,
    ignore_sigint,
    load_average,
    memory_mb,
    percentile,
    start,
    stop,
    wait_ready,
)

WRAPPER = "reasoner"  # a wrapper of the default profile; only its backend and port change
MODEL = "smollm2:135m"
BUDGET_MS = 1.0  # added p50, CPU per request, added TTFT p50
BUDGET_RSS_MB = 80
CONCURRENCY = 16

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


# --- processes -----------------------------------------------------------------------------


def wrapper_env(state: Path, wrapper_port: int, backend_port: int) -> dict[str, str]:
    """The default profile's wrapper, moved to ``wrapper_port`` and pointed at a backend on
    ``backend_port``; its registry URL is a port where nothing listens (it retries)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SWARM_")} | {
        "SWARM_DATA_DIR": str(state),
        "SWARM_LOG_LEVEL": "warning",
        f"SWARM_WRAPPERS__{WRAPPER.upper()}__PORT": str(wrapper_port),
        "SWARM_BACKENDS__SMOLLM2__PORT": str(backend_port),
        "SWARM_REGISTRY__URL": f"http://{HOST}:{free_port()}",
        "PYTHONUNBUFFERED": "1",
    }


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


def bodies(scenario: str) -> tuple[bytes, bytes]:
    """(the direct body, the wrapped body) of a scenario."""
    stream = scenario == "stream"
    direct, via = DIRECT | {"stream": stream}, VIA | {"stream": stream}
    return json.dumps(direct).encode(), json.dumps(via).encode()


def run(
    scenario: str,
    direct: int,
    reference: tuple[int, int],
    wrapper: tuple[int, int],
    requests: int,
    warmup: int,
    rounds: int,
) -> dict:
    """Call the fake directly, through the reference pass-through and through the wrapper,
    in turn; ``reference`` and ``wrapper`` are (port, pid). Per measure, the median over
    ``rounds`` of each round's p50 (a round disturbed by another process on the machine
    does not decide), and the p99 of all calls; per hop, the median of the rounds' CPU
    per call."""
    direct_body, via_body = bodies(scenario)
    targets = {
        "direct": (http.client.HTTPConnection(HOST, direct), "/api/chat", direct_body, None),
        "reference": (
            http.client.HTTPConnection(HOST, reference[0]),
            "/api/chat",
            direct_body,
            reference[1],
        ),
        "via": (
            http.client.HTTPConnection(HOST, wrapper[0]),
            "/v1/chat/completions",
            via_body,
            wrapper[1],
        ),
    }
    for _ in range(warmup):
        for conn, path, body, _ in targets.values():
            call(conn, path, body)
    names = [name + measure for name in targets for measure in ("", "_ttfb")]
    every: dict[str, list[float]] = {name: [] for name in names}
    round_p50s: dict[str, list[float]] = {name: [] for name in names}
    round_cpu: dict[str, list[float]] = {"reference": [], "via": []}
    per_round = max(1, requests // rounds)
    for _ in range(rounds):
        samples: dict[str, list[float]] = {name: [] for name in names}
        cpu = dict.fromkeys(round_cpu, 0.0)
        for _ in range(per_round):
            for name, (conn, path, body, pid) in targets.items():
                before = cpu_seconds(pid) if pid else 0.0
                first, total = call(conn, path, body)
                if pid:
                    cpu[name] += cpu_seconds(pid) - before
                samples[name].append(total)
                samples[name + "_ttfb"].append(first)
        for name in names:
            every[name] += samples[name]
            round_p50s[name].append(percentile(samples[name], 0.50))
        for name, seconds in cpu.items():
            round_cpu[name].append(seconds / per_round)
    for conn, *_ in targets.values():
        conn.close()
    return {
        name: {
            "p50": statistics.median(round_p50s[name]) / 1e6,
            "p99": percentile(every[name], 0.99) / 1e6,
        }
        for name in names
    } | {
        "cpu_ms_per_request": statistics.median(round_cpu["via"]) * 1000,
        "reference_cpu_ms_per_request": statistics.median(round_cpu["reference"]) * 1000,
    }


# Each window ends with a pause, so the calls still in flight finish before the next starts.
GAP_S = 0.2
TARGETS = {"direct": "/api/chat", "via": "/v1/chat/completions"}


def client_worker(
    ports: dict[str, int],
    body: dict[str, bytes],
    threads: int,
    windows: list[tuple[str, float, float]],
    warmup: int,
) -> dict:
    """One client process: ``threads`` threads, each with one keep-alive connection per
    target, warm up, then call as fast as they can during each (target, start, end) window
    (``time.monotonic``, shared by all processes). Per window: (TTFB, total) ns of every
    call started inside it."""
    samples: list[list[tuple[int, int]]] = [[] for _ in windows]
    late: list[bool] = []
    lock = threading.Lock()

    def client() -> None:
        conns = {name: http.client.HTTPConnection(HOST, port) for name, port in ports.items()}
        for _ in range(warmup):
            for name, conn in conns.items():
                call(conn, TARGETS[name], body[name])
        mine: list[list[tuple[int, int]]] = [[] for _ in windows]
        late.append(time.monotonic() > windows[0][1])
        for index, (name, start_at, end_at) in enumerate(windows):
            time.sleep(max(0.0, start_at - time.monotonic()))
            conn, path, payload = conns[name], TARGETS[name], body[name]
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
    scenario: str,
    direct: int,
    wrapper: int,
    wrapper_pid: int,
    seconds: float,
    warmup: int,
    rounds: int,
) -> dict:
    """``CONCURRENCY`` closed-loop callers in ``clients`` processes; each round a direct
    window, then a wrapped one. Per measure, the median over rounds of each window's p50
    and req/s, and the p99 of all calls; the wrapper's CPU per call over its windows."""
    direct_body, via_body = bodies(scenario)
    ports = {"direct": direct, "via": wrapper}
    body = {"direct": direct_body, "via": via_body}
    lead = 1.5  # spawned clients connect and warm up before the first window
    start = time.monotonic() + lead
    windows = []
    for n in range(2 * rounds):
        opens = start + n * (seconds + GAP_S)
        windows.append(("direct" if n % 2 == 0 else "via", opens, opens + seconds))
    shares = [CONCURRENCY // clients + (n < CONCURRENCY % clients) for n in range(clients)]
    pending = pool.starmap_async(
        client_worker, [(ports, body, threads, windows, warmup) for threads in shares]
    )
    wrapper_cpu = []
    for name, opens, closes in windows:
        time.sleep(max(0.0, opens - time.monotonic()))
        before = cpu_seconds(wrapper_pid)
        time.sleep(max(0.0, closes + GAP_S - time.monotonic()))
        if name == "via":
            wrapper_cpu.append(cpu_seconds(wrapper_pid) - before)
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
    per_call = [cpu / len(calls) for cpu, calls in zip(wrapper_cpu, sides["via"], strict=True)]
    span = windows[-1][2] - windows[0][1] + GAP_S
    return figures | {
        "cpu_ms_per_request": statistics.median(per_call) * 1000,
        "client_cores": sum(result["cpu_s"] for result in results) / (span + lead),
    }


def verdict(value: float, budget: float, unit: str = "ms", at_least: bool = False) -> str:
    ok = value >= budget if at_least else value <= budget
    missed = "**under**" if at_least else "**over**"
    return f"{'≥' if at_least else '≤'} {budget:g} {unit} " + ("ok" if ok else missed)


def table(results: dict, command: str) -> str:
    plain, stream = results["non_stream"], results["stream"]
    plain16, stream16 = results["non_stream_c16"], results["stream_c16"]

    def row(label: str, direct: dict, via: dict, budgeted: bool = True, rates: bool = False):
        added = via["p50"] - direct["p50"]
        budget = verdict(added, BUDGET_MS) if budgeted else "—"
        cells = [
            label,
            f"{direct['p50']:.3f} / {direct['p99']:.3f}",
            f"{via['p50']:.3f} / {via['p99']:.3f}",
            f"{added:.3f}",
        ]
        if rates:
            cells.append(f"{direct['per_s']:,.0f} / {via['per_s']:,.0f}" if "per_s" in via else "—")
        return "| " + " | ".join([*cells, budget]) + " |"

    def cpu_row(label: str, figures: dict, budgeted: bool, rates: bool = False) -> str:
        cpu = figures["cpu_ms_per_request"]
        budget = verdict(cpu, BUDGET_MS) if budgeted else "—"
        return f"| {label} | — | — | {cpu:.3f} |{' — |' if rates else ''} {budget} |"

    def hop_row(label: str, figures: dict, measure: str, budgeted: bool = True) -> str:
        direct, bare, via = (figures[name + measure] for name in ("direct", "reference", "via"))
        added = via["p50"] - direct["p50"]
        cells = [
            label,
            *(f"{f['p50']:.3f} / {f['p99']:.3f}" for f in (direct, bare, via)),
            f"{bare['p50'] - direct['p50']:.3f} / {added:.3f}",
            verdict(added, BUDGET_MS) if budgeted else "—",
        ]
        return "| " + " | ".join(cells) + " |"

    def hop_cpu_row(label: str, figures: dict, budgeted: bool) -> str:
        cpu = figures["cpu_ms_per_request"]
        budget = verdict(cpu, BUDGET_MS) if budgeted else "—"
        bare = figures["reference_cpu_ms_per_request"]
        return f"| {label} | — | — | — | {bare:.3f} / {cpu:.3f} | {budget} |"

    def memory_row(label: str, memory: dict, budgeted: bool) -> str:
        budget = verdict(memory["VmHWM"], BUDGET_RSS_MB, "MB") + " (peak)" if budgeted else "—"
        return f"| {label} | {memory['VmRSS']:.1f} | {memory['VmHWM']:.1f} | {budget} |"

    shares = results["clients"]
    lines = [
        f"`{command}` — {platform.node()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, load average {results['loadavg_start']} at start, "
        f"{results['loadavg_end']} at end",
        "",
        f"Concurrency 1: {results['requests']} calls per row in {results['rounds']} rounds "
        "(median of the rounds' p50; p99 of all), direct, bare-hop and wrapped calls in turn. "
        "The bare hop is the reference of DESIGN 7, a bare aiohttp pass-through (~0.4 ms "
        "added on the machine the budgets were set on): what any Python hop costs here today.",
        "",
        "| measure (ms) | direct p50 / p99 | bare hop p50 / p99 | via wrapper p50 / p99 "
        "| added p50: bare hop / wrapper | budget (wrapper) |",
        "|---|---|---|---|---|---|",
        hop_row("non-stream, whole call", plain, ""),
        hop_row("stream, time to first byte", stream, "_ttfb"),
        hop_row("stream, whole stream", stream, "", budgeted=False),
        hop_cpu_row("CPU per request, non-stream", plain, budgeted=True),
        hop_cpu_row("CPU per request, stream (not budgeted)", stream, budgeted=False),
        "",
        f"Concurrency {CONCURRENCY}: {shares} client processes x {CONCURRENCY // shares}"
        f"{'+' if CONCURRENCY % shares else ''} threads, each with its own keep-alive connection; "
        f"{results['rounds']} rounds of a direct then a wrapped {results['seconds']} s window "
        "(median of the windows' p50 and req/s; p99 of all); the clients used "
        f"{plain16['client_cores']:.2f} / {stream16['client_cores']:.2f} cores (non-stream / "
        "stream); budgets are set at concurrency 1",
        "",
        "| measure (ms) | direct p50 / p99 | via wrapper p50 / p99 | added p50 "
        "| req/s direct / via | budget |",
        "|---|---|---|---|---|---|",
        row("non-stream, whole call", plain16["direct"], plain16["via"], False, True),
        row(
            "stream, time to first byte", stream16["direct_ttfb"], stream16["via_ttfb"], False, True
        ),
        row("stream, whole stream", stream16["direct"], stream16["via"], False, True),
        cpu_row("wrapper CPU per request, non-stream", plain16, budgeted=False, rates=True),
        cpu_row("wrapper CPU per request, stream", stream16, budgeted=False, rates=True),
        "",
        "| wrapper memory (MB) | VmRSS | VmHWM (peak) | budget |",
        "|---|---|---|---|",
        memory_row("at start (healthy, before any call)", results["memory_start"], False),
        memory_row("at end (after all scenarios)", results["memory_end"], True),
    ]
    return "\n".join(lines)


# --- token throughput on the embedded model ---------------------------------------------------

# A prompt SmolLM2 answers at length: greedy, it does not end its turn within 256 tokens.
STORY = [{"role": "user", "content": "Write a long story about a dragon."}]


def wrapper_run(client, count: int, seed: int, clock_type) -> tuple[float, str, int]:
    """(tok/s, the text, content chunks) of one stream through the wrapper, official
    ``openai`` client; the token count is the stream's usage."""
    clock = clock_type()
    text: list[str] = []
    usage = None
    stream = client.chat.completions.create(
        model=MODEL,
        messages=STORY,
        temperature=0,
        seed=seed,
        max_tokens=count,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            clock.tick()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    if usage is None or usage.completion_tokens != count:
        raise SystemExit(f"the wrapper generated {usage and usage.completion_tokens}, not {count}")
    return clock.rate(count), "".join(text), clock.pieces


def throughput(args: argparse.Namespace) -> dict:
    """Interleaved runs of the three paths on the same tokens, same greedy sampling."""
    import openai
    from bench_modelhost import (
        SEED,
        ModelHostSettings,
        TokenClock,
        default_threads,
        direct_run,
        host_run,
        load_engine,
        ollama,
        start_host,
    )

    load_at_start = load_average()
    state = Path(tempfile.mkdtemp(prefix="bench-wrapper-"))
    host_port, wrapper_port = free_port(), free_port()
    # The host's settings as the profile's backend has them (context, batch, threads).
    settings = ModelHostSettings(model=MODEL, port=host_port, models_dir=state / "models")
    engine = load_engine(settings)
    # The prompt as the host builds it for /api/chat: the GGUF's chat template.
    prompt, has_bos, _ = engine.render_chat(STORY)
    tokens = engine.tokenize(prompt, add_bos=not has_bos)
    env = wrapper_env(state, wrapper_port, host_port)
    host = wrapper = None
    try:
        host = start_host(settings, str(state), env)
        wrapper = start([sys.executable, "-m", "services", WRAPPER], env, state / "wrapper.log")
        wait_ready(wrapper, wrapper_port, "/health")
        memory_start = memory_mb(wrapper.pid)
        to_host = ollama.Client(host=f"http://{HOST}:{host_port}", timeout=300)
        to_wrapper = openai.OpenAI(
            base_url=f"http://{HOST}:{wrapper_port}/v1", api_key="unused", max_retries=0
        )
        # The host's sampling for temperature 0: penalties (repeat 1.1 over 64, Ollama's
        # defaults; the OpenAI API has no repeat penalty), then greedy.
        paths = {
            "direct": lambda: direct_run(engine.llama, tokens, args.tokens, repeat_penalty=1.1),
            "host": lambda: host_run(to_host, MODEL, args.tokens, messages=STORY),
            "wrapper": lambda: wrapper_run(to_wrapper, args.tokens, SEED, TokenClock),
        }
        for name in paths:  # warm up: the first decodes are slow
            paths[name]()
        rates: dict[str, list[float]] = {name: [] for name in paths}
        host_own: list[float] = []
        texts: dict[str, set[str]] = {name: set() for name in paths}
        pieces: set[int] = set()
        for n in range(args.runs):
            names = list(paths)
            for name in names[n % 3 :] + names[: n % 3]:  # rotate who goes first
                result = paths[name]()
                rates[name].append(result[0])
                if name == "direct":
                    texts[name].add(engine.llama.detokenize(result[1]).decode(errors="replace"))
                elif name == "host":
                    host_own.append(result[1])
                    texts[name].add(result[2])
                else:
                    texts[name].add(result[1])
                    pieces.add(result[2])
        memory_end = memory_mb(wrapper.pid)
    except Exception:
        print(f"failed; logs in {state}", file=sys.stderr)
        raise
    finally:
        for process in (wrapper, host):
            if process is not None:
                stop(process)
        engine.close()
    shutil.rmtree(state, ignore_errors=True)
    return {
        "model": MODEL,
        "tokens": args.tokens,
        "runs": args.runs,
        "threads": settings.threads or default_threads(),
        "prompt_tokens": len(tokens),
        "rates": rates,
        "host_own": host_own,
        "same_text": len(set.union(*texts.values())) == 1,
        "wrapper_chunks": sorted(pieces),
        "memory_start": memory_start,
        "memory_end": memory_end,
        "loadavg_start": load_at_start,
        "loadavg_end": load_average(),
    }


def throughput_table(results: dict, command: str) -> str:
    from bench_modelhost import BUDGET, rates_cell

    rates = results["rates"]
    median = {name: statistics.median(values) for name, values in rates.items()}
    wrapped, hosted = median["wrapper"] / median["direct"], median["host"] / median["direct"]
    lines = [
        f"`{command}` — {platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}, Python "
        f"{platform.python_version()}, load average {results['loadavg_start']} at start, "
        f"{results['loadavg_end']} at end",
        "",
        f"{results['model']}, chat prompt {STORY[0]['content']!r} ({results['prompt_tokens']} "
        f"tokens after the chat template), {results['tokens']} tokens generated, temperature 0 "
        f"(greedy after the host's default repeat penalty 1.1), seed fixed, "
        f"{results['threads']} llama.cpp threads, {results['runs']} interleaved runs. "
        "Generation tok/s, one definition for all: (tokens - 1) / (arrival of the last token "
        "- arrival of the first), timed by the consumer (prompt evaluation excluded).",
        "",
        "| path | generation tok/s, median (min-max) |",
        "|---|---|",
        *(
            f"| {label} | {rates_cell(values)} |"
            for label, values in (
                ("llama-cpp-python direct (`Llama.generate`, in process)", rates["direct"]),
                ("model host direct (ollama client, `/api/chat` streaming)", rates["host"]),
                ("via the wrapper (openai client, streaming, usage)", rates["wrapper"]),
                ("model host, its own `eval_count / eval_duration`", results["host_own"]),
            )
        ),
        "",
        f"wrapper / direct: **{wrapped:.1%}** ({verdict(wrapped * 100, BUDGET * 100, '%', True)}); "
        f"host / direct: {hosted:.1%}. Same text on all paths: "
        f"{'yes' if results['same_text'] else '**no**'}; content chunks per wrapped stream: "
        f"{', '.join(map(str, results['wrapper_chunks']))}. Wrapper VmRSS / VmHWM: "
        f"{results['memory_start']['VmRSS']:.1f} / {results['memory_start']['VmHWM']:.1f} MB "
        f"at start, {results['memory_end']['VmRSS']:.1f} / {results['memory_end']['VmHWM']:.1f} "
        "MB at end.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3_000, help="timed calls per scenario")
    parser.add_argument("--rounds", type=int, default=5, help="rounds the calls are split into")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls first")
    parser.add_argument("--seconds", type=float, default=0.8, help="concurrency 16: per window")
    parser.add_argument("--clients", type=int, default=4, help="concurrency 16: client processes")
    parser.add_argument("--throughput", action="store_true", help="tok/s on the embedded model")
    parser.add_argument("--runs", type=int, default=5, help="--throughput: runs of each path")
    parser.add_argument("--tokens", type=int, default=256, help="--throughput: tokens per run")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--serve-fake", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-passthrough", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_fake:
        serve_fake(args.serve_fake)
        return 0
    if args.serve_passthrough:
        serve_passthrough(*args.serve_passthrough)
        return 0
    command = shlex.join(["python", "scripts/bench_wrapper.py", *(argv or sys.argv[1:])])
    if args.throughput:
        results = throughput(args)
        print(json.dumps(results, indent=2) if args.json else throughput_table(results, command))
        return 0

    load_at_start = load_average()
    fake_port, wrapper_port, reference_port = free_port(), free_port(), free_port()
    state = Path(tempfile.mkdtemp(prefix="bench-wrapper-"))
    env = wrapper_env(state, wrapper_port, fake_port)
    fake_argv = [sys.executable, __file__, "--serve-fake", str(fake_port)]
    fake = start(fake_argv, env, state / "fake.log")
    wrapper = start([sys.executable, "-m", "services", WRAPPER], env, state / "wrapper.log")
    reference_argv = [__file__, "--serve-passthrough", str(reference_port), str(fake_port)]
    reference = start([sys.executable, *reference_argv], env, state / "reference.log")
    # spawn, not fork: clients start clean; Ctrl-C is the parent's to handle.
    pool = multiprocessing.get_context("spawn").Pool(args.clients, initializer=ignore_sigint)
    try:
        wait_ready(fake, fake_port, "/api/version")
        wait_ready(wrapper, wrapper_port, "/health")
        wait_ready(reference, reference_port, "/api/version")
        results: dict = {
            "requests": args.requests,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "clients": args.clients,
            "memory_start": memory_mb(wrapper.pid),
        }
        for scenario in ("non_stream", "stream"):
            results[scenario] = run(
                scenario,
                fake_port,
                (reference_port, reference.pid),
                (wrapper_port, wrapper.pid),
                args.requests,
                args.warmup,
                args.rounds,
            )
        for scenario in ("non_stream", "stream"):
            results[f"{scenario}_c16"] = run_concurrent(
                pool,
                args.clients,
                scenario,
                fake_port,
                wrapper_port,
                wrapper.pid,
                args.seconds,
                max(1, args.warmup // CONCURRENCY),
                args.rounds,
            )
        results["memory_end"] = memory_mb(wrapper.pid)
    except Exception:
        print(f"failed; logs in {state}", file=sys.stderr)
        raise
    finally:
        pool.terminate()
        pool.join()
        stop(wrapper)
        stop(reference)
        stop(fake)
    shutil.rmtree(state, ignore_errors=True)
    results |= {"loadavg_start": load_at_start, "loadavg_end": load_average()}
    print(json.dumps(results, indent=2) if args.json else table(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
