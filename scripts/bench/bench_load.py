"""Load through the router: the embedded SmolLM2 reasoner under closed-loop callers.

Each scenario has its own swarm from the default profile (config/swarm.yaml), reduced to
what it needs and moved to free ports, its state in a temporary directory: a registry, a
router, the SmolLM2 model host(s) and the ``reasoner`` wrapper(s), every model host on one
llama.cpp thread (the 2-core machine's default). The swarms run side by side, started and
warmed up first, so that the scenarios can take turns at each concurrency:

1. ``1 host``: one host and one wrapper (``replicas: 1``);
2. ``2 replicas``: ``replicas: 2`` on the wrapper entry, two hosts and two wrappers;
3. ``1 host + budget``: one host, and the classifier (Gemma 3 270M on its own host) as a
   second local model to spill to: the profile's fallbacks say ``reasoning:
   [classification]``, and every call sends ``X-Max-Wait-Ms`` (``--max-wait-ms``).

Callers ask the router for ``capability:reasoning`` (``POST /v1/chat/completions``), the
same prompt and ``max_tokens`` every call, temperature 0, at each of ``--concurrency`` for
``--seconds`` (a caller starts no call after that; the cell's wall time runs until the
last one ends). Per cell: aggregate tok/s (completion tokens of the answers' ``usage``
over the wall time), p50/p95 latency of the calls that answered 200, the model hosts'
queue wait (``modelhost_queue_wait_seconds`` in their ``/metrics``, read before and after
the cell), 503s and other errors, spills (``router_spills_total`` in the router's
``/metrics``) and who served (the ``X-Routed-To`` header of each answer).

Prints the command, the machine, the load average and a Markdown table (``--json``: the
figures). A benchmark, not a test.

    .venv/bin/python scripts/bench/bench_load.py [--seconds 25] [--concurrency 1 4 8]
        [--max-tokens 48] [--max-wait-ms 2000] [--scenarios single replicas spill] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from benchlib import (
    HOST,
    REPO_ROOT,
    free_port,
    free_ports_in_a_row,
    load_average,
    machine_line,
    metric_total,
    percentile,
    scrape_metrics,
    start,
    stop,
    swarm_env,
    wait_ready,
)

sys.path.insert(0, str(REPO_ROOT))

from schemas.config import load_settings

PROFILE = REPO_ROOT / "config" / "swarm.yaml"
PROMPT = "Count from 1 to 100, separated by commas."  # long enough for any max_tokens here
CAPABILITY = "reasoning"
REASONER, CLASSIFIER = "reasoner", "classifier"  # the default profile's wrappers
SCENARIOS = {
    "single": "1 host",
    "replicas": "2 replicas",
    "spill": "1 host + budget",
}
QUEUE_WAIT = "modelhost_queue_wait_seconds"
CALL_TIMEOUT_S = 300  # a call this slow counts as an error


# --- the swarm of a scenario -----------------------------------------------------------------


@dataclass
class Swarm:
    """The daemons of one scenario and where they listen."""

    registry: int
    router: int
    hosts: list[int]  # every model host's port
    wrappers: dict[str, int]  # agent_id -> port
    first_ranked: str  # the agent a call goes to without a budget
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)


def scenario_profile(scenario: str, ports: dict[str, int]) -> dict:
    """The default profile reduced to ``scenario``'s daemons, on ``ports``."""
    profile = yaml.safe_load(PROFILE.read_text())
    replicas = 2 if scenario == "replicas" else 1
    wrappers = [REASONER, CLASSIFIER] if scenario == "spill" else [REASONER]
    profile["registry"]["port"] = ports["registry"]
    profile["router"]["port"] = ports["router"]
    # Only the fallback this benchmark spills through: reasoning calls to the classifier.
    profile["router"]["capability_fallbacks"] = (
        {CAPABILITY: ["classification"]} if scenario == "spill" else {}
    )
    profile["wrappers"] = {name: profile["wrappers"][name] for name in wrappers}
    backends = {profile["wrappers"][name]["backend"] for name in wrappers}
    profile["backends"] = {name: profile["backends"][name] for name in backends}
    for name, entry in profile["wrappers"].items():
        entry["port"] = ports[name]
        entry["replicas"] = replicas
        backend = profile["backends"][entry["backend"]]
        backend["port"] = ports[entry["backend"]]
        # One thread a host: two hosts of one thread each on the 2 cores (the profile gives
        # gemma3 two threads, which would oversubscribe the cores beside SmolLM2).
        backend["threads"] = 1
    return profile


def start_swarm(scenario: str, directory: Path) -> Swarm:
    """Registry, router, model hosts, wrappers, their state in ``directory/scenario``;
    each healthy, and every wrapper routed to."""
    replicas = 2 if scenario == "replicas" else 1
    ports = {"registry": free_port(), "router": free_port()}
    for name, backend in ((REASONER, "smollm2"), (CLASSIFIER, "gemma3")):
        ports[name], ports[backend] = free_ports_in_a_row(replicas), free_ports_in_a_row(replicas)
    profile = scenario_profile(scenario, ports)
    state = directory / scenario  # its own databases: the swarms run side by side
    state.mkdir()
    if (directory / "models").exists():
        (state / "models").symlink_to(directory / "models", target_is_directory=True)
    path = state / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    env = swarm_env(state, SWARM_CONFIG=str(path))
    swarm = Swarm(ports["registry"], ports["router"], [], {}, "")
    log = directory / "logs"
    log.mkdir(exist_ok=True)

    def launch(name: str, argv: list[str], port: int, health: str, deadline: float) -> None:
        process = start([sys.executable, "-m", *argv], env, log / f"{scenario}-{name}.log")
        swarm.processes.append((name, process))
        wait_ready(process, port, health, deadline_s=deadline)

    try:
        launch("registry", ["registry"], swarm.registry, "/health", 30)
        launch("router", ["router"], swarm.router, "/health", 30)
        for name, entry in profile["wrappers"].items():
            for replica in range(1, replicas + 1):
                flag = ["--replica", str(replica)]
                host = profile["backends"][entry["backend"]]["port"] + replica - 1
                argv = ["services.modelhost", "--backend", entry["backend"], *flag]
                launch(f"host-{entry['backend']}-{replica}", argv, host, "/health", 180)
                swarm.hosts.append(host)
                port = entry["port"] + replica - 1
                launch(f"wrapper-{name}-{replica}", ["services", name, *flag], port, "/health", 60)
                agent = entry["agent_id"] if replica == 1 else f"{entry['agent_id']}-{replica}"
                swarm.wrappers[agent] = port
        swarm.first_ranked = wait_routed(swarm)
    except BaseException:
        stop_swarm(swarm)
        raise
    return swarm


def stop_swarm(swarm: Swarm) -> None:
    """The wrappers first (they deregister), the registry last."""
    for _, process in reversed(swarm.processes):
        stop(process)


def post(port: int, path: str, body: dict, headers: dict | None = None, timeout=30):
    """(status, headers, parsed JSON body or None) of one call."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = None
        return response.status, response.headers, parsed
    finally:
        conn.close()


def wait_routed(swarm: Swarm, deadline_s: float = 60) -> str:
    """Until the router's own discovery has every wrapper as a candidate of the
    capability (``POST /route``); the agent it ranks first."""
    end = time.monotonic() + deadline_s
    seen: set[str] = set()
    while time.monotonic() < end:
        status, _, decision = post(swarm.router, "/route", {"capability": CAPABILITY})
        if status == 200:
            seen = {decision["agent_id"]} | {f["agent_id"] for f in decision["fallbacks"]}
            if seen >= set(swarm.wrappers):
                return decision["agent_id"]
        time.sleep(0.2)
    raise RuntimeError(f"the router routes {CAPABILITY} to {sorted(seen)}, not {swarm.wrappers}")


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Cell:
    """What the callers of one cell saw."""

    latencies: list[float] = field(default_factory=list)  # s, of calls that answered 200
    tokens: int = 0
    unavailable: int = 0  # 503s
    errors: list[str] = field(default_factory=list)  # any other failure, first words
    # X-Routed-To -> [calls, completion tokens]: a spilled call runs on another model,
    # which may end its answer before max_tokens.
    served_by: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def chat_body(max_tokens: int) -> str:
    return json.dumps(
        {
            "model": f"capability:{CAPABILITY}",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
    )


def caller(port: int, body: str, headers: dict, until: float, cell: Cell) -> None:
    """Closed loop: one call after the other on one keep-alive connection until ``until``."""
    conn = http.client.HTTPConnection(HOST, port, timeout=CALL_TIMEOUT_S)
    try:
        while time.monotonic() < until:
            began = time.perf_counter()
            try:
                conn.request("POST", "/v1/chat/completions", body, headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()  # the next call opens a new connection
                with cell.lock:
                    cell.errors.append(type(exc).__name__)
                continue
            took = time.perf_counter() - began
            with cell.lock:
                if response.status == 200:
                    cell.latencies.append(took)
                    tokens = json.loads(data)["usage"]["completion_tokens"]
                    cell.tokens += tokens
                    served = cell.served_by.setdefault(
                        response.headers.get("X-Routed-To", "?"), [0, 0]
                    )
                    served[0] += 1
                    served[1] += tokens
                elif response.status == 503:
                    cell.unavailable += 1
                else:
                    cell.errors.append(f"HTTP {response.status}: {data[:120]!r}")
    finally:
        conn.close()


def read_counters(swarm: Swarm) -> dict[str, float]:
    """The router's spills and every host's queue-wait histogram, summed over the hosts."""
    counters = {"spills": metric_total(scrape_metrics(swarm.router), "router_spills_total")}
    for port in swarm.hosts:
        for key, value in scrape_metrics(port).items():
            if key.startswith(QUEUE_WAIT):
                counters[key] = counters.get(key, 0.0) + value
    return counters


def queue_wait(before: dict[str, float], after: dict[str, float]) -> dict:
    """The cell's queue wait over all hosts: the mean, and the histogram bucket its p95
    falls in (the bound, s; the hosts measure it in buckets only)."""
    count = after[f"{QUEUE_WAIT}_count"] - before[f"{QUEUE_WAIT}_count"]
    if not count:
        return {"generations": 0, "mean_s": None, "p95_at_most_s": None}
    mean = (after[f"{QUEUE_WAIT}_sum"] - before[f"{QUEUE_WAIT}_sum"]) / count
    buckets = sorted(
        (float(key.split('le="')[1].rstrip('"}')), after[key] - before[key])
        for key in after
        if key.startswith(f"{QUEUE_WAIT}_bucket")
    )
    p95 = next(bound for bound, cumulative in buckets if cumulative >= 0.95 * count)
    return {"generations": int(count), "mean_s": mean, "p95_at_most_s": p95}


def run_cell(swarm: Swarm, concurrency: int, args: argparse.Namespace, budget: bool) -> dict:
    """``concurrency`` closed-loop callers for ``args.seconds``, each call with the wait
    budget ``args.max_wait_ms`` if ``budget``; the cell's figures."""
    headers = {"Content-Type": "application/json"}
    if budget:
        headers["X-Max-Wait-Ms"] = str(args.max_wait_ms)
    body = chat_body(args.max_tokens)
    before = read_counters(swarm)
    cell = Cell()
    began = time.perf_counter()
    until = time.monotonic() + args.seconds
    workers = [
        threading.Thread(
            target=caller, args=(swarm.router, body, headers, until, cell), daemon=True
        )
        for _ in range(concurrency)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - began
    after = read_counters(swarm)
    latencies = cell.latencies
    return {
        "concurrency": concurrency,
        "wall_s": wall,
        "calls": len(latencies),
        "completion_tokens": cell.tokens,
        "tok_per_s": cell.tokens / wall,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
        "p95_ms": percentile(latencies, 0.95) * 1000 if latencies else None,
        "queue_wait": queue_wait(before, after),
        "http_503": cell.unavailable,
        "other_errors": len(cell.errors),
        "error_examples": sorted(set(cell.errors))[:3],
        "spills": int(after["spills"] - before["spills"]),
        "served_by": {
            agent: {"calls": calls, "completion_tokens": tokens}
            for agent, (calls, tokens) in sorted(cell.served_by.items())
        },
        "loadavg_end": load_average(),
    }


def warm_up(swarm: Swarm, args: argparse.Namespace) -> None:
    """A call straight to each wrapper (a host's first decodes are slow, and each wrapper
    then knows its service time), then two through the router (it learns its latency)."""
    body = json.loads(chat_body(args.max_tokens))
    for port in swarm.wrappers.values():
        status, _, answer = post(port, "/v1/chat/completions", body, timeout=CALL_TIMEOUT_S)
        if status != 200:
            raise RuntimeError(f"warm-up call to the wrapper on {port}: HTTP {status} {answer}")
    for _ in range(2):
        status, _, answer = post(swarm.router, "/v1/chat/completions", body, timeout=CALL_TIMEOUT_S)
        if status != 200:
            raise RuntimeError(f"warm-up call through the router: HTTP {status} {answer}")


def run_scenarios(args: argparse.Namespace, state: Path) -> list[dict]:
    """Every scenario's swarm up at once (an idle one costs next to no CPU), then the cells
    by concurrency, the scenarios taking turns: work of others on this shared machine that
    comes and goes hits every scenario at a concurrency alike, not one scenario at all."""
    swarms: dict[str, Swarm] = {}
    cells: dict[str, list[dict]] = {scenario: [] for scenario in args.scenarios}
    try:
        for scenario in args.scenarios:
            swarms[scenario] = start_swarm(scenario, state)
            warm_up(swarms[scenario], args)
        for turn, concurrency in enumerate(args.concurrency):
            first = turn % len(args.scenarios)
            for scenario in args.scenarios[first:] + args.scenarios[:first]:
                budget = scenario == "spill"
                cells[scenario].append(run_cell(swarms[scenario], concurrency, args, budget))
                done = f"{SCENARIOS[scenario]} at {concurrency}"
                print(f"... {done}: load average {load_average()}", file=sys.stderr)
    finally:
        for swarm in swarms.values():
            stop_swarm(swarm)
    return [
        {
            "scenario": SCENARIOS[scenario],
            "agents": sorted(swarm.wrappers),
            "first_ranked": swarm.first_ranked,
            "hosts": len(swarm.hosts),
            "wait_budget_ms": args.max_wait_ms if scenario == "spill" else None,
            "cells": cells[scenario],
        }
        for scenario, swarm in swarms.items()
    ]


# --- the report -------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f} ms"


def _queue(wait: dict) -> str:
    if not wait["generations"]:
        return "—"
    return f"{wait['mean_s'] * 1000:,.0f} ms (p95 ≤ {wait['p95_at_most_s']:g} s)"


def source() -> str:
    """The code measured: the commit, and whether the tree differs from it."""
    described = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return described.stdout.strip() or "not a git checkout"


def table(results: dict, command: str) -> str:
    args = results["arguments"]
    lines = [
        f"{machine_line(results, command)}; code: {results['source']}",
        "",
        f"Each cell: {args['seconds']:g} s of closed-loop callers (calls started in it, all "
        f"finished), `capability:{CAPABILITY}`, max_tokens {args['max_tokens']}, temperature "
        f"0, prompt {PROMPT!r}; the budget scenario sends `X-Max-Wait-Ms: "
        f"{args['max_wait_ms']}`. Queue wait: the model hosts' own (mean over every "
        "generation of the cell, all hosts; p95 as the bucket bound of their histogram).",
        "",
        "| scenario | callers | calls | tok/s | p50 latency | p95 latency | queue wait "
        "mean (p95) | 503s | other errors | spills (/metrics) | served by (X-Routed-To): calls "
        "| load at end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["scenarios"]:
        for cell in run["cells"]:
            served = ", ".join(
                f"{agent} {by['calls']} ({by['completion_tokens'] / by['calls']:.0f} tok/call)"
                for agent, by in cell["served_by"].items()
            )
            cells = [
                run["scenario"],
                str(cell["concurrency"]),
                str(cell["calls"]),
                f"{cell['tok_per_s']:.1f}",
                _ms(cell["p50_ms"]),
                _ms(cell["p95_ms"]),
                _queue(cell["queue_wait"]),
                str(cell["http_503"]),
                str(cell["other_errors"]),
                str(cell["spills"]),
                served or "—",
                cell["loadavg_end"].split()[0],
            ]
            lines.append("| " + " | ".join(cells) + " |")
    examples = [
        e for run in results["scenarios"] for c in run["cells"] for e in c["error_examples"]
    ]
    if examples:
        lines += ["", "Errors, first of each kind: " + "; ".join(sorted(set(examples)))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=25, help="per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=48, help="of every call")
    parser.add_argument("--max-wait-ms", type=int, default=2000, help="the budget scenario's")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "scripts/bench/bench_load.py", *(argv or sys.argv[1:])])
    # A SIGTERM tears the swarm down as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    results: dict = {
        "arguments": vars(args),
        "source": source(),
        "loadavg_start": load_average(),
    }
    state = Path(tempfile.mkdtemp(prefix="bench-load-"))
    models = load_settings().state_dir / "models"
    if models.is_dir():  # an assembled model is reused, not assembled again
        (state / "models").symlink_to(models, target_is_directory=True)
    try:
        results["scenarios"] = run_scenarios(args, state)
    except BaseException:
        print(f"failed; logs in {state / 'logs'}", file=sys.stderr)
        raise
    shutil.rmtree(state, ignore_errors=True)
    results["loadavg_end"] = load_average()
    print(json.dumps(results, indent=2) if args.json else table(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
