"""The fleet's registries: 1,000 simulated agents heartbeating across two registries on one
PostgreSQL.

Starts a throwaway PostgreSQL (scripts/pg_cluster.py, as the suite does) and two
``python -m registry`` processes on it (A and B). ``--agents`` agents (bench_registry's
realistic definitions) register, agent k on registry k mod 2, from ``--clients`` client
processes of httpx async clients; then each agent heartbeats (with a load, as a wrapper sends
it) every ``--interval`` seconds, the wrappers' default 10 s (0: back to back, the most the
registries take), their beats spread over the interval, for ``--duration`` seconds. Under
that load one more process measures, at concurrency 1, ``POST /discover`` on A and on B in
turn (a popular capability, sorted by expected wait, as the router asks), and
``--propagation`` times how long a registration acknowledged by A takes to be answered by
B's ``GET /agents/{id}`` (B polled back to back).

Prints the command, the machine and its load average, and a Markdown table: heartbeats/s
held (total and per registry) and their latency, /discover p50/p99 per registry,
propagation A→B p50/p99, errors, registrations/s, and the CPU of each registry and of the
agents' clients. A benchmark, not a test: the exit code is non-zero only
when something failed to start or requests errored.

    .venv/bin/python scripts/bench/bench_fleet.py [--agents 1000] [--duration 30]
        [--interval 10] [--clients 2] [--propagation 50] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import shlex
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from bench_registry import heartbeat_bodies, make_agents
from benchlib import (
    HOST,
    REPO_ROOT,
    cpu_seconds,
    free_port,
    ignore_sigint,
    load_average,
    percentile,
    start,
    stop,
    swarm_env,
    wait_ready,
)

sys.path.insert(0, str(REPO_ROOT))
from scripts.pg_cluster import throwaway_cluster

NAMES = ("A", "B")
# What the router asks when it routes a call: the most common capability, least wait first.
DISCOVER_BODY = {"capabilities": ["reasoning"], "sort": "expected_wait"}


# ---------------------------------------------------------------------------- the fleet


def start_registry(name: str, database_url: str, state: Path) -> tuple:
    port = free_port()
    env = swarm_env(
        state / name,
        SWARM_DATABASE_URL=database_url,
        SWARM_REGISTRY__PORT=str(port),
        SWARM_REGISTRY__TTL_SECONDS="3600",  # nothing expires during the run
    )
    (state / name).mkdir(parents=True)
    log = state / f"registry-{name}.log"
    process = start([sys.executable, "-m", "registry", "--host", HOST], env, log)
    return process, port, log


def server_version(database_url: str) -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return connection.execute(text("SHOW server_version")).scalar_one()
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------- the agents


async def agent_loop(
    client: httpx.AsyncClient,
    agent: dict,
    bodies: list[bytes],
    beats: tuple[float, float, float],
    tally: Counter,
    latencies_ms: list[float],
) -> None:
    """One agent: a heartbeat every ``interval`` s (0: back to back) from ``first`` until
    ``end_at``, as ``(first, interval, end_at)``; count answers by status."""
    path = f"/heartbeat/{agent['agent_id']}"
    next_at, interval, end_at = beats
    beat = 0
    while next_at < end_at:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        next_at = (next_at + interval) if interval else time.monotonic()
        started = time.perf_counter()
        try:
            response = await client.post(path, content=bodies[beat % len(bodies)])
            tally[str(response.status_code)] += 1
            latencies_ms.append((time.perf_counter() - started) * 1e3)
        except httpx.HTTPError as error:
            tally[type(error).__name__] += 1
        beat += 1


def agent_clients(ports: list[int]) -> list[httpx.AsyncClient]:
    return [
        httpx.AsyncClient(
            base_url=f"http://{HOST}:{port}",
            headers={"Content-Type": "application/json"},
            timeout=30,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )
        for port in ports
    ]


async def register_agents(ports: list[int], agents: list[tuple[int, float, dict]]) -> dict:
    """Each agent registers on its home registry, all at once; count answers by status."""
    clients = agent_clients(ports)
    started = time.monotonic()
    registered: list[Counter] = [Counter() for _ in ports]

    async def register(agent: dict, home: int) -> None:
        try:
            response = await clients[home].post("/register", content=json.dumps(agent))
            registered[home][str(response.status_code)] += 1
        except httpx.HTTPError as error:
            registered[home][type(error).__name__] += 1

    try:
        await asyncio.gather(*(register(agent, home) for home, _, agent in agents))
    finally:
        for client in clients:
            await client.aclose()
    return {"counts": [dict(c) for c in registered], "seconds": time.monotonic() - started}


def register_worker(ports: list[int], agents: list[tuple[int, float, dict]]) -> dict:
    return asyncio.run(register_agents(ports, agents))


async def run_agents(
    ports: list[int], agents: list[tuple[int, float, dict]], seed: int, start_at: float, args
) -> dict:
    """``agents`` as (home registry, phase, definition), registered: each heartbeats
    ``phase`` s into the window and then every ``args.interval`` s."""
    clients = agent_clients(ports)
    try:
        bodies = heartbeat_bodies(seed)
        tallies: list[Counter] = [Counter() for _ in ports]
        latencies: list[list[float]] = [[] for _ in ports]
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        cpu_started = time.process_time()
        end_at = start_at + args.duration
        await asyncio.gather(
            *(
                agent_loop(
                    clients[home],
                    agent,
                    bodies,
                    (start_at + phase, args.interval, end_at),
                    tallies[home],
                    latencies[home],
                )
                for home, phase, agent in agents
            )
        )
        return {
            "beats": [dict(t) for t in tallies],
            "beat_ms": latencies,
            "finished": time.monotonic(),
            "client_cpu_s": time.process_time() - cpu_started,
        }
    finally:
        for client in clients:
            await client.aclose()


def agents_worker(
    ports: list[int], agents: list[tuple[int, float, dict]], seed: int, start_at: float, args
) -> dict:
    """Pool worker: its share of the agents, on one event loop."""
    return asyncio.run(run_agents(ports, agents, seed, start_at, args))


# ---------------------------------------------------------------------------- the probes


async def run_probes(ports: list[int], start_at: float, duration_s: float, wanted: int) -> dict:
    """Under the load: /discover on A and B in turn, and now and then a registration on A
    timed until B answers it; all at concurrency 1."""
    clients = [httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=30) for port in ports]
    discover_ms: list[list[float]] = [[] for _ in ports]
    propagation_ms: list[float] = []
    polls: list[int] = []
    bad: Counter = Counter()
    try:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        end_at = start_at + duration_s
        # Spread the propagation samples over the window, a few discover rounds apart.
        round_no = 0
        while time.monotonic() < end_at:
            for index, client in enumerate(clients):
                started = time.perf_counter()
                response = await client.post("/discover", json=DISCOVER_BODY)
                if response.status_code == 200:
                    discover_ms[index].append((time.perf_counter() - started) * 1e3)
                else:
                    bad[f"discover {response.status_code}"] += 1
            round_no += 1
            if len(propagation_ms) < wanted and round_no % 3 == 0:
                took, count = await propagate(clients[0], clients[1], len(propagation_ms))
                propagation_ms.append(took)
                polls.append(count)
        return {"discover_ms": discover_ms, "propagation_ms": propagation_ms, "polls": polls}
    finally:
        for client in clients:
            await client.aclose()


async def propagate(on_a: httpx.AsyncClient, on_b: httpx.AsyncClient, index: int):
    """Register an agent on A; from A's acknowledgement, poll B until it answers the agent.
    Returns the milliseconds and how many polls it took."""
    agent = make_agents(1, seed=10_000 + index)[0]
    agent["agent_id"] = f"fleet-probe-{index:03d}"
    response = await on_a.post("/register", json=agent)
    response.raise_for_status()
    acknowledged = time.perf_counter()
    polls = 0
    while True:
        polls += 1
        response = await on_b.get(f"/agents/{agent['agent_id']}")
        if response.status_code == 200:
            return (time.perf_counter() - acknowledged) * 1e3, polls
        if response.status_code != 404:
            response.raise_for_status()
        if time.perf_counter() - acknowledged > 30:
            raise RuntimeError(f"{agent['agent_id']} not on B 30 s after A acknowledged it")


def probes_worker(ports: list[int], start_at: float, duration_s: float, wanted: int) -> dict:
    return asyncio.run(run_probes(ports, start_at, duration_s, wanted))


# ---------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, ports: list[int], pids: list[int]) -> dict:
    # Agent k's home is registry k mod 2: half the fleet on each; their beats are spread
    # evenly over the interval, as wrappers started at random times are.
    definitions = make_agents(args.agents, args.seed)
    agents = [
        (k % len(ports), args.interval * k / args.agents, agent)
        for k, agent in enumerate(definitions)
    ]
    shares = [agents[i :: args.clients] for i in range(args.clients)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.clients + 1, initializer=ignore_sigint) as pool:
        pool.apply(time.sleep, (0,))
        registrations = pool.starmap(register_worker, [(ports, share) for share in shares])
        # A moment for the clients to start before the window opens.
        start_at = time.monotonic() + 1.0
        loads = [
            pool.apply_async(agents_worker, (ports, share, args.seed + i, start_at, args))
            for i, share in enumerate(shares)
        ]
        probes = pool.apply_async(probes_worker, (ports, start_at, args.duration, args.propagation))
        time.sleep(max(0.0, start_at - time.monotonic()))
        cpu_started = [cpu_seconds(pid) for pid in pids]
        results = [load.get() for load in loads]
        probed = probes.get()
    window_s = max(result["finished"] for result in results) - start_at
    used = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_started, strict=True)]
    cores = [seconds / window_s for seconds in used]
    beats = [Counter() for _ in ports]
    registered = [Counter() for _ in ports]
    beat_ms: list[list[float]] = [[] for _ in ports]
    for result in results:
        for index in range(len(ports)):
            beat_ms[index] += result["beat_ms"][index]
            beats[index].update(result["beats"][index])
    for registration in registrations:
        for index in range(len(ports)):
            registered[index].update(registration["counts"][index])
    return {
        "window_s": window_s,
        "beats": [dict(b) for b in beats],
        "heartbeat_ms": [stats(values) for values in beat_ms],
        "registered": [dict(r) for r in registered],
        "registry_cores": cores,
        "client_cpu_s": sum(result["client_cpu_s"] for result in results),
        "registrations_per_s": args.agents / max(r["seconds"] for r in registrations),
        **probed,
    }


def stats(values: list[float]) -> str:
    if not values:
        return "none"
    return f"{percentile(values, 0.5):.1f} / {percentile(values, 0.99):.1f}"


def print_markdown(args: argparse.Namespace, results: dict) -> None:
    window = results["window_s"]
    ok = [b.get("200", 0) for b in results["beats"]]
    print(f"\n    {shlex.join([sys.executable, *sys.argv])}\n")
    print(f"{platform.node()}: {multiprocessing.cpu_count()} cores, Python "
          f"{platform.python_version()}, load average {results['load_average']}; one PostgreSQL "
          f"{results['postgres']}, {args.agents} agents from {args.clients} client processes, "
          f"{window:.1f} s of heartbeats.\n")  # fmt: skip
    print("| figure | A | B | fleet |")
    print("|---|---|---|---|")
    per_s = [count / window for count in ok]
    asked = f"{args.agents / args.interval:,.0f} asked" if args.interval else "back to back"
    print(f"| heartbeats/s held ({asked}) | {per_s[0]:,.0f} | {per_s[1]:,.0f} | "
          f"{sum(per_s):,.0f} |")  # fmt: skip
    beat_ms = results["heartbeat_ms"]
    print(f"| heartbeat p50 / p99, {args.agents // 2} agents on each (ms) | {beat_ms[0]} | "
          f"{beat_ms[1]} | |")  # fmt: skip
    discover = results["discover_ms"]
    print(f"| `/discover` p50 / p99 under that load (ms, n={len(discover[0])}) | "
          f"{stats(discover[0])} | {stats(discover[1])} | |")  # fmt: skip
    print(f"| registry CPU (cores) | {results['registry_cores'][0]:.2f} | "
          f"{results['registry_cores'][1]:.2f} | |")  # fmt: skip
    print(f"| the agents' client processes' CPU (cores) | | | "
          f"{results['client_cpu_s'] / window:.2f} |")  # fmt: skip
    propagation = results["propagation_ms"]
    polls = results["polls"]
    print(f"| registration on A answered by B, p50 / p99 (ms, n={len(propagation)}; "
          f"polls of B: max {max(polls, default=0)}) | | | {stats(propagation)} |")  # fmt: skip
    errors = [sum(v for k, v in b.items() if k != "200") for b in results["beats"]]
    print(f"| heartbeat errors (non-200 or failed) | {errors[0]} | {errors[1]} | |")
    bad_reg = [sum(v for k, v in r.items() if k != "200") for r in results["registered"]]
    print(f"| registrations failed | {bad_reg[0]} | {bad_reg[1]} | |")
    print(f"| registrations/s, all at once before the heartbeats | | | "
          f"{results['registrations_per_s']:,.0f} |")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1_000)
    parser.add_argument("--duration", type=float, default=30.0, help="heartbeats, seconds")
    parser.add_argument(
        "--interval",
        type=float,
        default=10.0,
        help="an agent's heartbeat interval, s (the wrappers' default); 0: back to back",
    )
    parser.add_argument("--clients", type=int, default=2, help="agent client processes")
    parser.add_argument("--propagation", type=int, default=50, help="A→B samples")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    with throwaway_cluster() as database_url:
        started = [start_registry(name, database_url, state) for name in NAMES]
        try:
            for process, port, _ in started:
                wait_ready(process, port, "/health")
            ports = [port for _, port, _ in started]
            results = run(args, ports, [process.pid for process, _, _ in started])
        finally:
            for process, _, _ in started:
                stop(process)
        results["load_average"] = load_average()
        results["postgres"] = server_version(database_url)
        for name, (_, _, log) in zip(NAMES, started, strict=True):
            errors = [line for line in log.read_text().splitlines() if "Traceback" in line]
            results[f"log_errors_{name}"] = len(errors)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_markdown(args, results)
    failed = sum(
        v
        for part in results["beats"] + results["registered"]
        for k, v in part.items()
        if k != "200"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
