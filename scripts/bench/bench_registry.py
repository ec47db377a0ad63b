"""Benchmark the agent registry over real HTTP against its budgets.

Starts ``python -m registry`` as a subprocess on a fresh SQLite data dir, fills it with
``--agents`` agents, gives most of them a load (a heartbeat with an expected wait), then
measures ``/discover`` latency, each kind unsorted and sorted by expected wait (concurrency
1, beside ``GET /health`` as the framework floor), sustained heartbeats per second (each
with a load) from several client processes, and the registry's memory. Prints a Markdown
table (or ``--json``) of each figure against its budget. A benchmark, not a test: a missed
budget is reported, not turned into an exit code; the exit code is non-zero only when the
registry failed to start or requests errored.

    .venv/bin/python scripts/bench/bench_registry.py [--agents 10000] [--duration 10] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
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

from schemas.agents import DISCOVER_DEFAULT_LIMIT, expected_wait_ms

JSON_HEADERS = {"Content-Type": "application/json"}

# Budgets (DESIGN): discovery p99 at 10,000 agents, heartbeat throughput, resident memory.
DISCOVER_P99_BUDGET_MS = 5.0
HEARTBEATS_PER_S_BUDGET = 1_000.0
RSS_BUDGET_MB = 80.0

# Ranked by popularity: index 0 is drawn most often (Zipf-like weights below).
CAPABILITIES = [
    "reasoning", "classification", "summarization", "extraction", "explanation",
    "planning", "tagging", "translation", "code_review", "embedding",
    "filtering", "question_answering", "code_generation", "domain_classification",
    "sentiment_analysis", "tmd_extraction", "entity_recognition", "rewriting",
    "chat", "retrieval", "reranking", "keyword_extraction", "math",
    "domain_validation", "sql_generation", "json_repair", "spell_check",
    "language_detection", "title_generation", "moderation", "paraphrasing",
    "outline_generation", "citation_check", "unit_conversion", "date_normalization",
    "regex_synthesis", "log_triage", "schema_mapping", "ocr_cleanup", "legal_clause_tagging",
]  # fmt: skip
ZIPF_EXPONENT = 1.7
# How many capabilities an agent declares (1..5): mostly a few, rarely many.
CAPABILITY_COUNT_WEIGHTS = {1: 25, 2: 30, 3: 22, 4: 14, 5: 9}
ROLES = {
    "reasoner": 30, "classifier": 25, "summarizer": 12, "extractor": 10,
    "embedder": 8, "translator": 7, "domain_classifier": 5, "coder": 3,
}  # fmt: skip
LOCALITIES = {"local": 95, "cloud": 5}
MODELS = [
    ("smollm2:135m", "135M", 2_048), ("smollm2:360m", "360M", 8_192),
    ("gemma3:270m", "270M", 32_768), ("qwen2.5:0.5b", "0.5B", 32_768),
    ("llama3.2:1b", "1B", 131_072), ("phi3:mini", "3.8B", 4_096),
]  # fmt: skip
QUANTIZATIONS = ["Q4_K_M", "Q5_K_M", "Q8_0", "F16"]
# Of the agents, the share that reports a load (the rest: wrappers from before issue 14,
# unknown load); the parallel slots a load says, mostly one (the embedded host).
LOAD_SHARE = 0.85
PARALLEL_WEIGHTS = {1: 60, 2: 25, 4: 15}
SORTED = {"sort": "expected_wait"}
ALL_KINDS = "all kinds"
ALL_KINDS_SORTED = "all kinds, sorted by wait"


# ---------------------------------------------------------------------------- data


def zipf_weights(count: int, exponent: float) -> list[float]:
    """Weight of rank r is 1/r**s: a few popular names, a long tail of rare ones."""
    return [1.0 / (rank**exponent) for rank in range(1, count + 1)]


def draw_capabilities(rng: random.Random, weights: list[float]) -> list[str]:
    """1..5 distinct capabilities, popular ones more likely."""
    counts, count_weights = zip(*CAPABILITY_COUNT_WEIGHTS.items(), strict=True)
    wanted = rng.choices(counts, count_weights)[0]
    chosen: dict[str, None] = {}
    while len(chosen) < wanted:
        chosen[rng.choices(CAPABILITIES, weights)[0]] = None
    return list(chosen)


def make_agents(count: int, seed: int) -> list[dict]:
    """Deterministic agent definitions with a realistic spread of capabilities and roles."""
    rng = random.Random(seed)
    weights = zipf_weights(len(CAPABILITIES), ZIPF_EXPONENT)
    agents = []
    for index in range(count):
        model, parameters, context_length = rng.choice(MODELS)
        role = rng.choices(list(ROLES), list(ROLES.values()))[0]
        agents.append(
            {
                "agent_id": f"bench-{role}-{index:06d}",
                "name": f"{model} {role} #{index}",
                "tier": rng.randint(0, 9),
                "locality": rng.choices(list(LOCALITIES), list(LOCALITIES.values()))[0],
                "role": role,
                "capabilities": draw_capabilities(rng, weights),
                "endpoint": f"http://127.0.0.1:{20_000 + index % 40_000}",
                "transport": "http",
                "cost_per_1k_tokens": round(rng.uniform(0, 0.002), 6),
                "metadata": {
                    "model": model,
                    "parameters": parameters,
                    "quantization": rng.choice(QUANTIZATIONS),
                    "context_length": context_length,
                },
            }
        )
    return agents


def make_load(rng: random.Random) -> dict:
    """A load as a wrapper reports it: idle to three calls a slot, 0.2-5 s a call."""
    parallel = rng.choices(list(PARALLEL_WEIGHTS), list(PARALLEL_WEIGHTS.values()))[0]
    in_flight = rng.randint(0, 3 * parallel)
    per_call = round(rng.uniform(200, 5_000), 1)
    return {
        "in_flight": in_flight,
        "queued": max(0, in_flight - parallel),
        "parallel": parallel,
        "service_ms_per_call": per_call,
        "expected_wait_ms": expected_wait_ms(in_flight, parallel, per_call),
    }


def make_loads(agents: list[dict], seed: int) -> dict[str, dict]:
    """The load each reporting agent sends once after the fill, by agent id."""
    rng = random.Random(seed + 1)
    return {a["agent_id"]: make_load(rng) for a in agents if rng.random() < LOAD_SHARE}


@dataclass(frozen=True)
class Query:
    """One kind of discovery request and the client-side truth of how many agents match
    (and, sorted by expected wait, of which agents in which order)."""

    kind: str
    body: dict
    matching: int
    expected_ids: list[str] | None = None

    @property
    def expected(self) -> int:
        """The registry answers at most ``limit`` agents (DISCOVER_DEFAULT_LIMIT by default)."""
        return min(self.matching, self.body.get("limit", DISCOVER_DEFAULT_LIMIT))


def matches(agents: list[dict], body: dict) -> list[dict]:
    """The agents that match, from our own data: all are alive, given the one-hour TTL."""
    wanted = set(body.get("capabilities", []))
    found = []
    for agent in agents:
        have = set(agent["capabilities"])
        hit = wanted <= have if body.get("match", "all") == "all" else bool(wanted & have)
        if hit and body.get("role") in (None, agent["role"]):
            found.append(agent)
    return found


def by_expected_wait(found: list[dict], loads: dict[str, dict], limit: int) -> list[str]:
    """The ids the registry must answer sorted: lowest wait first, unknown last, by id."""

    def key(agent: dict) -> tuple:
        wait = loads.get(agent["agent_id"], {}).get("expected_wait_ms")
        return (wait is None, wait or 0.0, agent["agent_id"])

    return [agent["agent_id"] for agent in sorted(found, key=key)[:limit]]


def make_queries(
    agents: list[dict], loads: dict[str, dict], limit: int | None = None
) -> list[Query]:
    """Realistic discovery mix, each kind unsorted and then sorted by expected wait; the
    rare capability is the least used one actually present."""
    usage = Counter(cap for agent in agents for cap in agent["capabilities"])
    rarest = min(usage, key=lambda cap: (usage[cap], cap))
    bodies = {
        f"popular [{CAPABILITIES[0]}]": {"capabilities": [CAPABILITIES[0]]},
        f"rare [{rarest}]": {"capabilities": [rarest]},
        "2 caps, match=all": {"capabilities": ["classification", "tagging"], "match": "all"},
        "3 caps, match=any": {
            "capabilities": ["translation", "embedding", "domain_classification"],
            "match": "any",
        },
        "cap + role filter": {"capabilities": ["summarization"], "role": "summarizer"},
    }
    if limit is not None:
        bodies = {kind: body | {"limit": limit} for kind, body in bodies.items()}
    queries = []
    for kind, body in bodies.items():
        found = matches(agents, body)
        queries.append(Query(kind, body, len(found)))
        order = by_expected_wait(found, loads, body.get("limit", DISCOVER_DEFAULT_LIMIT))
        queries.append(Query(f"{kind}, sorted by wait", body | SORTED, len(found), order))
    return queries


# ---------------------------------------------------------------------------- HTTP client


def connect(port: int, timeout_s: float = 30) -> http.client.HTTPConnection:
    """One keep-alive connection; Nagle off so small requests are not delayed."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def request(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None
) -> tuple[int, bytes]:
    """Send and read the whole response so the connection can be reused."""
    conn.request(method, path, body=body, headers=JSON_HEADERS if body is not None else {})
    response = conn.getresponse()
    return response.status, response.read()


def timed_request(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None
) -> tuple[int, bytes, int]:
    started = time.perf_counter_ns()
    status, payload = request(conn, method, path, body)
    return status, payload, time.perf_counter_ns() - started


# ---------------------------------------------------------------------------- registry process


def _die_with_parent() -> None:
    """Linux: SIGKILL the registry if this script dies without running its finally."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def start_registry(port: int, data_dir: Path, log_path: Path) -> subprocess.Popen:
    # Inherited SWARM_* values (a database URL, a write token) would change what is measured.
    env = {key: value for key, value in os.environ.items() if not key.startswith("SWARM_")}
    env |= {"SWARM_DATA_DIR": str(data_dir), "SWARM_REGISTRY__TTL_SECONDS": "3600"}
    command = [sys.executable, "-m", "registry", "--host", HOST, "--port", str(port)]
    return start(
        command,
        env,
        log_path,
        # Own session: a terminal Ctrl-C reaches only us, and we stop the registry.
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


def error_log_lines(log_path: Path) -> list[str]:
    text = log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if "ERROR" in line or "Traceback" in line]


# ---------------------------------------------------------------------------- fill


def post_batch(port: int, posts: list[tuple[str, bytes]]) -> tuple[int, list[str]]:
    """Pool worker: POST each (path, body) on one connection; return (ok count, failures)."""
    conn = connect(port)
    ok, failures = 0, []
    try:
        for path, body in posts:
            status, payload = request(conn, "POST", path, body)
            if status == 200:
                ok += 1
            else:  # the body of the first few only: one cause usually explains them all
                detail = f" {payload[:200]!r}" if len(failures) < 5 else ""
                failures.append(f"{path}: HTTP {status}{detail}")
    finally:
        conn.close()
    return ok, failures


def fill(ctx, port: int, pid: int, posts: list[tuple[str, bytes]], workers: int) -> dict:
    """Send every POST (the registrations, then the loads' heartbeats) from ``workers``
    client processes; return rate and errors."""
    slices = [posts[i::workers] for i in range(workers)]
    with ctx.Pool(workers, initializer=ignore_sigint) as pool:
        pool.apply(time.sleep, (0,))  # most of the pool's start-up, before the clock starts
        cpu_started, started = cpu_seconds(pid), time.perf_counter_ns()
        results = pool.starmap(post_batch, [(port, chunk) for chunk in slices])
        elapsed_s = (time.perf_counter_ns() - started) / 1e9
        registry_cores = (cpu_seconds(pid) - cpu_started) / elapsed_s
    ok = sum(count for count, _ in results)
    errors = [error for _, batch in results for error in batch]
    return {
        "workers": workers,
        "ok": ok,
        "seconds": elapsed_s,
        "errors": errors,
        "per_s": ok / elapsed_s,
        "registry_cores": registry_cores,
    }


# ---------------------------------------------------------------------------- latency


def summarize_ns(samples_ns: list[int]) -> dict[str, float]:
    values = sorted(sample / 1e6 for sample in samples_ns)
    return {
        "n": len(values),
        "p50_ms": percentile(values, 0.50),
        "p99_ms": percentile(values, 0.99),
        "max_ms": values[-1],
    }


@dataclass
class Probe:
    """One kind of request measured at concurrency 1."""

    kind: str
    method: str
    path: str
    body: bytes | None = None
    expected_agents: int | None = None
    matching_agents: int | None = None
    returned_agents: int | None = None
    expected_ids: list[str] | None = None  # sorted: the answer, in its order
    order_wrong: bool = False
    samples_ns: list[int] = field(default_factory=list)


def check_probe_response(probe: Probe, status: int, payload: bytes) -> None:
    if status != 200:
        raise RuntimeError(f"{probe.kind}: HTTP {status} {payload[:300]!r}")
    if probe.expected_agents is not None:
        returned = [agent["agent_id"] for agent in json.loads(payload)["agents"]]
        probe.returned_agents = len(returned)
        if probe.expected_ids is not None and returned != probe.expected_ids:
            probe.order_wrong = True


def measure_sequential(port: int, probes: list[Probe], requests: int, warmup: int) -> None:
    """Round-robin the probes on one keep-alive connection, so drift hits all kinds alike."""
    conn = connect(port)
    try:
        for _ in range(warmup):
            for probe in probes:
                status, payload = request(conn, probe.method, probe.path, probe.body)
                check_probe_response(probe, status, payload)
        for _ in range(requests):
            for probe in probes:
                status, payload, elapsed = timed_request(conn, probe.method, probe.path, probe.body)
                if status != 200:
                    check_probe_response(probe, status, payload)
                probe.samples_ns.append(elapsed)
    finally:
        conn.close()


def discover_probes(queries: list[Query]) -> list[Probe]:
    return [
        Probe(
            kind=f"POST /discover {query.kind}",
            method="POST",
            path="/discover",
            body=json.dumps(query.body).encode(),
            expected_agents=query.expected,
            matching_agents=query.matching,
            expected_ids=query.expected_ids,
        )
        for query in queries
    ]


# ---------------------------------------------------------------------------- heartbeats


def heartbeat_bodies(seed: int, count: int = 64) -> list[bytes]:
    """Heartbeats as wrappers send them, each with a load drawn at random per beat: an
    agent's expected wait changes from one beat to the next (the costly case)."""
    rng = random.Random(seed)
    return [
        json.dumps({"status": "passing", "load": make_load(rng)}).encode() for _ in range(count)
    ]


def heartbeat_worker(
    port: int, agent_ids: list[str], seed: int, start_at: float, duration_s: float
) -> dict:
    """Pool worker: heartbeat random agents back to back from ``start_at`` for ``duration_s``.

    ``time.monotonic`` is system-wide on Linux, so all workers share one window.
    """
    rng = random.Random(seed)
    bodies = heartbeat_bodies(seed)
    conn = connect(port)
    request(conn, "POST", f"/heartbeat/{agent_ids[0]}", bodies[0])  # warm the connection
    latencies: list[int] = []
    bad: Counter[str] = Counter()
    time.sleep(max(0.0, start_at - time.monotonic()))
    cpu_started = time.process_time()
    end_at = start_at + duration_s
    while time.monotonic() < end_at:
        path = f"/heartbeat/{rng.choice(agent_ids)}"
        try:
            status, _, elapsed = timed_request(conn, "POST", path, rng.choice(bodies))
        except (OSError, http.client.HTTPException) as exc:
            bad[type(exc).__name__] += 1
            conn.close()
            conn = connect(port)
            continue
        if status == 200:
            latencies.append(elapsed)
        else:
            bad[str(status)] += 1
    finished = time.monotonic()
    conn.close()
    return {
        "latencies_ns": latencies,
        "bad": dict(bad),
        "finished": finished,
        "client_cpu_s": time.process_time() - cpu_started,
    }


def heartbeat_load(ctx, port: int, pid: int, agent_ids: list[str], args) -> dict:
    """Sustained heartbeats from ``args.hb_workers`` processes, each one connection."""
    with ctx.Pool(args.hb_workers, initializer=ignore_sigint) as pool:
        pool.apply(time.sleep, (0,))
        # Start in the future, so every worker has connected before the window opens.
        start_at = time.monotonic() + 1.0
        pending = pool.starmap_async(
            heartbeat_worker,
            [
                (port, agent_ids, args.seed + n, start_at, args.duration)
                for n in range(args.hb_workers)
            ],
        )
        time.sleep(max(0.0, start_at - time.monotonic()))
        server_cpu_started = cpu_seconds(pid)
        results = pending.get()
        server_cpu_s = cpu_seconds(pid) - server_cpu_started
    window_s = max(result["finished"] for result in results) - start_at
    latencies = [ns for result in results for ns in result["latencies_ns"]]
    bad: Counter[str] = Counter()
    for result in results:
        bad.update(result["bad"])
    return {
        "workers": args.hb_workers,
        "seconds": window_s,
        "ok": len(latencies),
        "per_s": len(latencies) / window_s,
        "latency": summarize_ns(latencies) if latencies else None,
        "non_200": dict(bad),
        "registry_cores": server_cpu_s / window_s,
        "client_cores": sum(result["client_cpu_s"] for result in results) / window_s,
    }


# ---------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def latency_row(probe: Probe, stats: dict, budgeted: bool) -> list[str]:
    figure = f"p50 {stats['p50_ms']:.2f} · p99 {stats['p99_ms']:.2f} · max {stats['max_ms']:.2f} ms"
    if probe.returned_agents is not None:
        figure += f" · {probe.returned_agents} of {probe.matching_agents:,} agents"
    if not budgeted:
        return [probe.kind, figure, "— (baseline)", "info"]
    return [
        probe.kind,
        figure,
        f"p99 ≤ {DISCOVER_P99_BUDGET_MS:g} ms",
        verdict(stats["p99_ms"] <= DISCOVER_P99_BUDGET_MS),
    ]


def build_rows(results: dict) -> list[list[str]]:
    """One row per measured figure: what, figure, budget, PASS/FAIL (or info)."""
    rows = []
    for what, unit in (("fill", "registrations"), ("loads", "heartbeats")):
        sent = results[what]
        path = "/register" if what == "fill" else "/heartbeat/{id} with a load"
        rows.append(
            [
                f"{what}: POST {path}, {sent['ok']:,} ({sent['workers']} clients)",
                f"{sent['per_s']:,.0f} {unit}/s ({sent['seconds']:.1f} s, "
                f"registry at {sent['registry_cores']:.2f} cores)",
                "—",
                "info",
            ]
        )
    for probe in results["_probes"]:
        rows.append(
            latency_row(probe, results["latency"][probe.kind], probe.expected_agents is not None)
        )
    for kind in (ALL_KINDS, ALL_KINDS_SORTED):
        overall = results["latency"][kind]
        rows.append(latency_row(Probe(f"POST /discover, {kind}", "", ""), overall, True))
    beats = results["heartbeats"]
    rows.append(
        [
            f"heartbeats: {beats['workers']} client processes, {beats['seconds']:.1f} s",
            f"{beats['per_s']:,.0f} /s",
            f"≥ {HEARTBEATS_PER_S_BUDGET:,.0f} /s",
            verdict(beats["per_s"] >= HEARTBEATS_PER_S_BUDGET),
        ]
    )
    if beats["latency"]:
        lat = beats["latency"]
        rows.append(
            [
                "heartbeat latency (under that load)",
                f"p50 {lat['p50_ms']:.2f} · p99 {lat['p99_ms']:.2f} · max {lat['max_ms']:.2f} ms",
                "—",
                "info",
            ]
        )
    non_200 = sum(beats["non_200"].values())
    detail = f" {beats['non_200']}" if non_200 else ""
    rows.append(["heartbeat non-200s / errors", f"{non_200}{detail}", "0", verdict(non_200 == 0)])
    rows.append(
        [
            "CPU during heartbeats (registry / clients)",
            f"{beats['registry_cores']:.2f} / {beats['client_cores']:.2f} cores",
            "—",
            "info",
        ]
    )
    for label, key in (
        ("at start", "at_start"),
        ("after fill", "after_fill"),
        ("at end", "at_end"),
    ):
        memory = results["memory"][key]
        rows.append(
            [
                f"registry RSS {label} (VmRSS, peak VmHWM)",
                f"{memory['VmRSS']:.1f} MB, peak {memory['VmHWM']:.1f} MB",
                f"≤ {RSS_BUDGET_MB:g} MB",
                verdict(memory["VmHWM"] <= RSS_BUDGET_MB),
            ]
        )
    return rows


def print_markdown(results: dict) -> None:
    machine = results["machine"]
    print(f"command: `{results['command']}`")
    print(
        f"machine: {machine['nproc']} CPUs, Python {machine['python']}, {machine['platform']}; "
        f"load average {machine['loadavg_start']} at start, {machine['loadavg_end']} at end"
    )
    print(
        f"agents: {results['agents']:,} ({results['loads']['ok']:,} with a load); "
        f"discovery requests per kind: {results['requests']} "
        f"(after {results['warmup']} warm-up), concurrency 1, keep-alive\n"
    )
    rows = [["Measure", "Figure", "Budget", "Result"], *build_rows(results)]
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "|".join("---" for _ in rows[0]) + "|")
    for row in rows[1:]:
        print("| " + " | ".join(row) + " |")
    if results["registry_log_errors"]:
        print(f"\nregistry log: {len(results['registry_log_errors'])} error line(s), first:")
        for line in results["registry_log_errors"][:5]:
            print(f"    {line}")


def json_report(results: dict) -> dict:
    """The figures without internals, plus budgets and verdicts."""
    report = {key: value for key, value in results.items() if not key.startswith("_")}
    report["agents_returned_of_matching"] = {
        p.kind: [p.returned_agents, p.matching_agents]
        for p in results["_probes"]
        if p.returned_agents is not None
    }
    report["budgets"] = {
        "discover_p99_ms": DISCOVER_P99_BUDGET_MS,
        "heartbeats_per_s": HEARTBEATS_PER_S_BUDGET,
        "rss_mb": RSS_BUDGET_MB,
    }
    report["verdicts"] = {row[0]: row[3] for row in build_rows(results) if row[3] != "info"}
    return report


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=10_000, help="agents to register")
    parser.add_argument("--duration", type=float, default=10.0, help="heartbeat load, seconds")
    parser.add_argument("--port", type=int, default=0, help="registry port (0: a free one)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per query kind")
    parser.add_argument("--warmup", type=int, default=30, help="untimed requests per kind first")
    parser.add_argument("--fill-workers", type=int, default=4, help="client processes for the fill")
    parser.add_argument("--hb-workers", type=int, default=8, help="heartbeat client processes")
    parser.add_argument(
        "--limit", type=int, help="discovery page size (default: the registry's, 20)"
    )
    parser.add_argument("--seed", type=int, default=20_240_601, help="random seed for the data")
    return parser.parse_args(argv)


def check_discovery_counts(probes: list[Probe]) -> list[str]:
    return [
        f"{p.kind}: returned {p.returned_agents} agents, expected {p.expected_agents}"
        for p in probes
        if p.expected_agents is not None and p.returned_agents != p.expected_agents
    ] + [f"{p.kind}: not the lowest expected waits in order" for p in probes if p.order_wrong]


def run(args: argparse.Namespace, process: subprocess.Popen, port: int) -> dict:
    """All phases against a running, healthy registry; return the figures."""
    # spawn, not fork: workers start clean, and the default changes in Python 3.14 anyway.
    ctx = multiprocessing.get_context("spawn")
    memory_at_start = memory_mb(process.pid)  # what the imports alone cost
    floor = Probe("GET /health, empty registry (floor)", "GET", "/health")
    measure_sequential(port, [floor], args.requests, args.warmup)

    agents = make_agents(args.agents, args.seed)
    registrations = [("/register", json.dumps(agent).encode()) for agent in agents]
    fill_result = fill(ctx, port, process.pid, registrations, args.fill_workers)
    loads = make_loads(agents, args.seed)
    beats = [(f"/heartbeat/{i}", json.dumps({"load": load}).encode()) for i, load in loads.items()]
    loads_result = fill(ctx, port, process.pid, beats, args.fill_workers)
    memory_after_fill = memory_mb(process.pid)

    probes = discover_probes(make_queries(agents, loads, args.limit))
    # /health counts agents by status (a table scan), so beside it a single-row read.
    health_full = Probe(f"GET /health, {args.agents:,} agents", "GET", "/health")
    one_id = agents[len(agents) // 2]["agent_id"]
    point = Probe("GET /agents/{id} (one indexed row)", "GET", f"/agents/{one_id}")
    measure_sequential(port, [*probes, health_full, point], args.requests, args.warmup)

    heartbeats = heartbeat_load(ctx, port, process.pid, [a["agent_id"] for a in agents], args)
    all_probes = [floor, *probes, health_full, point]
    latency = {probe.kind: summarize_ns(probe.samples_ns) for probe in all_probes}
    for kind, sorted_ in ((ALL_KINDS, False), (ALL_KINDS_SORTED, True)):
        samples = [
            ns for p in probes if (p.expected_ids is not None) == sorted_ for ns in p.samples_ns
        ]
        latency[kind] = summarize_ns(samples)
    return {
        "agents": args.agents,
        "requests": args.requests,
        "warmup": args.warmup,
        "fill": fill_result,
        "loads": loads_result,
        "latency": latency,
        "heartbeats": heartbeats,
        "memory": {
            "at_start": memory_at_start,
            "after_fill": memory_after_fill,
            "at_end": memory_mb(process.pid),
        },
        "discovery_mismatches": check_discovery_counts(probes),
        "_probes": all_probes,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM takes the same way out as Ctrl-C, through the finally that stops the registry.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    port = args.port or free_port()
    load_at_start = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
        log_path = Path(tmp) / "registry.log"
        process = start_registry(port, Path(tmp) / "data", log_path)
        try:
            try:
                wait_ready(process, port, "/health", deadline_s=30)
            except RuntimeError as exc:
                print(f"bench_registry: {exc}\n{log_path.read_text()[-3000:]}", file=sys.stderr)
                return 2
            results = run(args, process, port)
        except KeyboardInterrupt:
            print("bench_registry: interrupted", file=sys.stderr)
            return 130
        except (RuntimeError, OSError, http.client.HTTPException) as exc:
            print(f"bench_registry: request failed: {exc!r}", file=sys.stderr)
            return 1
        finally:
            stop(process)
        results["registry_log_errors"] = error_log_lines(log_path)
    results["command"] = shlex.join(sys.orig_argv)
    results["machine"] = {
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": load_at_start,
        "loadavg_end": load_average(),
    }
    if args.json:
        print(json.dumps(json_report(results), indent=2))
    else:
        print_markdown(results)
    failures = results["fill"]["errors"] + results["loads"]["errors"]
    failures += results["discovery_mismatches"]
    failures += [f"heartbeat {k}: {v}" for k, v in results["heartbeats"]["non_200"].items()]
    for failure in failures[:10]:
        print(f"bench_registry: error: {failure}", file=sys.stderr)
    return 1 if failures or results["registry_log_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
