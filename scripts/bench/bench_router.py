"""Benchmark the router hop (OpenAI in, OpenAI out, routed by capability): DESIGN 7's rows.

Starts an instant fake OpenAI-compatible upstream (raw asyncio, canned bodies) in its own
process, a real registry (``python -m registry``) and the real router (``python -m router``
from the default profile, moved to free ports by ``SWARM_*`` variables, its per-client rate
limit off, its usage database in a fresh state directory). The fake is registered as the
agent ``bench_upstream`` serving ``reasoning`` and kept passing by a heartbeat every 10 s;
the router finds it by its own discovery. The same body (``"model":
"capability:reasoning"``) goes to the fake directly (the baseline), through the reference
hop of DESIGN 7 (a bare aiohttp pass-through to the same fake) and through the router, in
the same run, as ``bench_wrapper.py`` does for the wrapper:

- concurrency 1: one client (stdlib ``http.client``, keep-alive) calls the three in turn;
- concurrency 16 and 64 (``--concurrency``): ``--clients`` client processes share the
  threads; each round is a direct, a bare-hop and a routed window of ``--seconds``;
- non-streamed and streamed (SSE): time to the first body byte (TTFT) and to the end;
- CPU per request of the router and of the bare hop, from ``/proc/<pid>/stat``; the
  router's memory, VmRSS and VmHWM (peak) from ``/proc/<pid>/status``, before any call,
  after an untimed warm-up and at the end.

It prints each DESIGN 7 row it measures with the ratio of the router's figure to the bare
hop's and a verdict (within, or over/under by how much): non-stream at concurrency 1
(added p50, CPU per request ≤ 1.5x), streaming (added TTFT p50 ≤ 1.5x), at concurrency
16 and 64 for both scenarios (req/s ≥ 0.8x, added p99 ≤ 2x, 0 errors), and memory (peak
≤ 100 MB, flat: see ``benchlib.FLAT_GROWTH``); then the figures they come from.

A benchmark, not a test: a missed budget is reported, not turned into an exit code.

    .venv/bin/python scripts/bench/bench_router.py [--requests 3000] [--rounds 5] [--seconds 0.8]
        [--clients 4] [--concurrency 16 64] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import shlex
import shutil
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from benchlib import (
    HOST,
    CannedHTTP,
    HopBudgets,
    free_port,
    hop_arguments,
    hop_report,
    http_chunked,
    http_response,
    ignore_sigint,
    load_average,
    measure_hop,
    output_arguments,
    serve_helper,
    start,
    start_helpers,
    stop,
    swarm_env,
    verdict_rows,
    wait_ready,
)

AGENT_ID = "bench_upstream"
CAPABILITY = "reasoning"
MODEL = "bench-model"
# DESIGN 7: router hop, router under concurrency 16 and 64; ratios to the bare hop.
BUDGETS = HopBudgets(added_p50=1.5, cpu=1.5, added_ttfb=1.5, per_s=0.8, added_p99=2.0)
HEARTBEAT_S = 10.0  # the registry's TTL is 30 s

# --- the instant fake upstream -------------------------------------------------------------

CREATED = 1_735_689_600
PIECES = ["Hello", "!", " How", " are", " you", " today", "?"]
COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": CREATED,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(PIECES)},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 26, "completion_tokens": 7, "total_tokens": 33},
}
CHUNK = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED}
CHUNKS = [
    CHUNK | {"model": MODEL, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    for delta in [{"role": "assistant", "content": ""}, *({"content": p} for p in PIECES)]
] + [CHUNK | {"model": MODEL, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]


EVENTS = [b"data: %s\n\n" % json.dumps(chunk).encode() for chunk in CHUNKS] + [b"data: [DONE]\n\n"]


class FakeOpenAI(CannedHTTP):
    """An OpenAI-compatible agent answering every chat call at once (or paced: see
    ``CannedHTTP``): one chunk of the chunked encoding an SSE event."""

    CANNED = {
        (b"POST", b"/v1/chat/completions", False): http_response(json.dumps(COMPLETION).encode()),
        (b"POST", b"/v1/chat/completions", True): http_chunked(EVENTS, b"text/event-stream"),
        (b"GET", b"/health", False): http_response(b'{"status":"healthy"}'),
    }
    STREAMS = {(b"POST", b"/v1/chat/completions"): (b"text/event-stream", EVENTS)}


# --- the registry, the agent and its heartbeats ----------------------------------------------

AGENT = {
    "agent_id": AGENT_ID,
    "name": "bench",
    "role": "reasoner",
    "capabilities": [CAPABILITY],
    "metadata": {"model": MODEL},
}


def url(port: int) -> str:
    return f"http://{HOST}:{port}"


def post(port: int, path: str, body: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request("POST", path, payload, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def register(registry_port: int, fake_port: int) -> None:
    status, answer = post(registry_port, "/register", AGENT | {"endpoint": url(fake_port)})
    if status != 200:
        raise RuntimeError(f"register: HTTP {status} {answer[:300]!r}")


def heartbeats(registry_port: int, done: threading.Event, failures: list[str]) -> None:
    """Thread: keep the agent passing until ``done``; what failed goes to ``failures``."""
    while not done.wait(HEARTBEAT_S):
        try:
            status, answer = post(registry_port, f"/heartbeat/{AGENT_ID}")
        except OSError as exc:
            failures.append(f"heartbeat: {exc}")
            continue
        if status != 200:
            failures.append(f"heartbeat: HTTP {status} {answer[:200]!r}")


def wait_routed(router, router_port: int, deadline_s: float = 30) -> None:
    """Until the router, from its own discovery, routes the capability to the fake."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if router.poll() is not None:
            raise RuntimeError(f"the router exited with {router.returncode}")
        status, answer = post(router_port, "/route", {"capability": CAPABILITY})
        if status == 200 and json.loads(answer)["agent_id"] == AGENT_ID:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the router did not route {CAPABILITY!r} to {AGENT_ID} in {deadline_s}s")


# --- measuring -----------------------------------------------------------------------------

PATH = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say hello."}]


def targets(scenario: str, direct: int, reference: int, router: int) -> dict:
    """The router forwards the body unchanged: the same bytes and path for all three."""
    body = {"model": f"capability:{CAPABILITY}", "messages": MESSAGES}
    data = json.dumps(body | {"stream": scenario == "stream"}).encode()
    return {
        "direct": (direct, PATH, data),
        "reference": (reference, PATH, data),
        "via": (router, PATH, data),
    }


def table(results: dict, command: str) -> str:
    failures = results["heartbeat_failures"]
    about = (
        f'All three get the same body (`"model": "capability:{CAPABILITY}"`). The router is '
        "one uvicorn process that finds the fake in a real registry (read every second) and "
        "writes a route record per call to SQLite; rate limit off. CPU per request is read "
        "around each call (what a hop spends until its answer is out, as "
        "`bench_wrapper.py` reads it) and, at concurrency 1, also over whole rounds divided "
        "by their calls (also what a hop does after the answer and in the background: the "
        "router's discovery and usage writes); both are judged."
    )
    beats = f"Heartbeats: {len(failures)} failed" + (f" ({failures[0]})" if failures else "") + "."
    return hop_report(
        results,
        command,
        "router",
        "routed",
        about=about,
        after=("", beats),
        started="at start (healthy, routing; before any chat call)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    hop_arguments(parser)
    # The option of earlier versions: concurrency 16 and this.
    parser.add_argument("--max-concurrency", type=int, help=argparse.SUPPRESS)
    output_arguments(parser)
    args = parser.parse_args(argv)
    if args.max_concurrency:
        args.concurrency = [16, args.max_concurrency]
    if serve_helper(args, FakeOpenAI):
        return 0
    command = shlex.join(["python", "scripts/bench/bench_router.py", *(argv or sys.argv[1:])])

    load_at_start = load_average()
    fake_port, reference_port = free_port(), free_port()
    registry_port, router_port = free_port(), free_port()
    state = Path(tempfile.mkdtemp(prefix="bench-router-"))
    env = swarm_env(
        state,
        SWARM_REGISTRY__PORT=str(registry_port),
        SWARM_ROUTER__PORT=str(router_port),
        SWARM_ROUTER__RATE_LIMIT_PER_SECOND="0",
    )
    fake, reference = start_helpers(__file__, env, state, fake_port, reference_port, args.reference)
    registry = start([sys.executable, "-m", "registry"], env, state / "registry.log")
    router = None
    done, failures = threading.Event(), []
    beating = threading.Thread(target=heartbeats, args=(registry_port, done, failures))
    # spawn, not fork: clients start clean; Ctrl-C is the parent's to handle.
    pool = multiprocessing.get_context("spawn").Pool(args.clients, initializer=ignore_sigint)
    try:
        wait_ready(fake, fake_port, "/health")
        wait_ready(reference, reference_port, "/health")
        wait_ready(registry, registry_port, "/health")
        register(registry_port, fake_port)
        beating.start()
        router = start([sys.executable, "-m", "router"], env, state / "router.log")
        wait_ready(router, router_port, "/health")
        wait_routed(router, router_port)
        hops = partial(targets, direct=fake_port, reference=reference_port, router=router_port)
        pids = {"reference": reference.pid, "via": router.pid}
        results = measure_hop(pool, args, hops, pids, whole_rounds=True)
    except Exception:
        print(f"failed; logs in {state}", file=sys.stderr)
        raise
    finally:
        done.set()
        pool.terminate()
        pool.join()
        for process in (router, registry, reference, fake):
            if process is not None:
                stop(process)
    shutil.rmtree(state, ignore_errors=True)
    results |= {
        "heartbeat_failures": failures,
        "loadavg_start": load_at_start,
        "loadavg_end": load_average(),
    }
    results["rows"] = verdict_rows(results, BUDGETS, "router")
    print(json.dumps(results, indent=2) if args.json else table(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
