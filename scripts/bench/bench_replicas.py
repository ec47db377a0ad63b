"""Replicas on a small machine: N single-threaded model hosts against one host of N threads.

What ``replicas: 2`` of an embedded backend buys on 2 cores: two SmolLM2 model hosts of
one llama.cpp thread each, the callers spread over them (caller k calls host k mod 2, as
the router spreads calls over two agents of one capability), against one host of two
threads that queues the callers first come, first served; one host of one thread is the
reference. Each scenario runs ``--callers`` closed-loop callers for ``--seconds`` (after a
warm-up call per host), every call a greedy ``/api/generate`` of the same raw prompt that
generates exactly ``--tokens`` tokens; the scenarios take turns for ``--rounds`` rounds so
that drift in the machine's load hits them alike.

Prints the command, the machine and its load average, and a Markdown table: aggregate
tok/s (every generated token over the scenario's wall time), p50 and p95 latency of a
call, calls and errors. A benchmark, not a test.

    .venv/bin/python scripts/bench/bench_replicas.py [--callers 4] [--tokens 64]
        [--seconds 30] [--rounds 2] [--model smollm2:135m]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import HOST, free_port, load_average, percentile, start, stop, wait_ready

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from schemas.config import load_settings  # noqa: E402

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # greedy counting never ends on its own
SCENARIOS = {  # name -> threads of each host
    "2 hosts x 1 thread (replicas: 2)": (1, 1),
    "1 host x 2 threads": (2,),
    "1 host x 1 thread": (1,),
}


@dataclass
class Calls:
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def generate(conn: http.client.HTTPConnection, model: str, tokens: int) -> int:
    """One greedy generation; the tokens it generated (the host's eval_count)."""
    body = {
        "model": model,
        "prompt": PROMPT,
        "raw": True,
        "stream": False,
        "options": {"temperature": 0, "seed": 42, "num_predict": tokens, "repeat_penalty": 1.0},
    }
    conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    answer = response.read()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {answer[:200]!r}")
    return json.loads(answer)["eval_count"]


def caller(port: int, model: str, tokens: int, until: float, calls: Calls) -> None:
    conn = http.client.HTTPConnection(HOST, port, timeout=300)
    try:
        while time.monotonic() < until:
            began = time.perf_counter()
            try:
                generated = generate(conn, model, tokens)
            except (OSError, RuntimeError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=300)
                with calls.lock:
                    calls.errors += 1
                continue
            with calls.lock:
                calls.latencies.append(time.perf_counter() - began)
                calls.tokens += generated
    finally:
        conn.close()


def run_scenario(threads: tuple[int, ...], args, state: Path) -> dict:
    """Start the hosts, warm each up, run the callers, stop the hosts; the figures."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_")}
    env |= {"SWARM_DATA_DIR": str(state), "SWARM_LOG_LEVEL": "warning"}
    hosts = []
    try:
        for index, count in enumerate(threads):
            port = free_port()
            argv = [
                sys.executable, "-m", "services.modelhost", "--model", args.model,
                "--port", str(port), "--threads", str(count),
                "--context-length", str(args.context_length),
            ]  # fmt: skip
            process = start(argv, env, state / f"host-{index}.log")
            hosts.append((process, port))
            wait_ready(process, port, "/health", deadline_s=120)
        for _, port in hosts:  # first decodes are slow
            warm_up = http.client.HTTPConnection(HOST, port, timeout=300)
            generate(warm_up, args.model, 8)
            warm_up.close()
        calls = Calls()
        began = time.perf_counter()
        until = time.monotonic() + args.seconds
        workers = [
            threading.Thread(
                target=caller,
                args=(hosts[k % len(hosts)][1], args.model, args.tokens, until, calls),
            )
            for k in range(args.callers)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        wall = time.perf_counter() - began
    finally:
        for process, _ in hosts:
            stop(process)
    return {
        "wall": wall,
        "tokens": calls.tokens,
        "latencies": calls.latencies,
        "errors": calls.errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="generated per call")
    parser.add_argument("--seconds", type=float, default=30, help="per scenario and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--context-length", type=int, default=1_024)
    args = parser.parse_args()

    models = load_settings().state_dir / "models"  # an assembled model is reused
    load_at_start = load_average()
    results: dict[str, list[dict]] = {name: [] for name in SCENARIOS}
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as directory:
        state = Path(directory)
        if models.is_dir():
            (state / "models").symlink_to(models, target_is_directory=True)
        for _ in range(args.rounds):
            for name, threads in SCENARIOS.items():
                results[name].append(run_scenario(threads, args, state))
                print(f"... {name}: done, load average {load_average()}", file=sys.stderr)

    print(f"`{shlex.join([Path(sys.executable).name, *sys.argv])}`\n")
    print(
        f"{args.model}, {args.callers} closed-loop callers, {args.tokens} tokens a call (greedy), "
        f"{args.seconds:g} s a scenario x {args.rounds} interleaved rounds, context "
        f"{args.context_length}, {os.cpu_count()} cores, {platform.machine()}; load average "
        f"{load_at_start} at start, {load_average()} at end\n"
    )
    print("| scenario | aggregate tok/s, per round | p50 latency | p95 latency | calls | errors |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        rates = " · ".join(f"{run['tokens'] / run['wall']:.1f}" for run in runs)
        latencies = [value for run in runs for value in run["latencies"]]
        p50 = f"{statistics.median(latencies) * 1000:.0f} ms" if latencies else "-"
        p95 = f"{percentile(latencies, 0.95) * 1000:.0f} ms" if latencies else "-"
        errors = sum(run["errors"] for run in runs)
        print(f"| {name} | {rates} | {p50} | {p95} | {len(latencies)} | {errors} |")


if __name__ == "__main__":
    main()
