"""Benchmark the wrapper hop (OpenAI in, Ollama API out): DESIGN 7's rows.

Starts an instant fake Ollama backend (raw asyncio, canned bodies) in its own process, the
real wrapper (``python -m services reasoner`` from the default profile, pointed at the
fake by ``SWARM_*`` variables, with a registry URL where nothing listens) in another, and
the reference hop of DESIGN 7 (a bare aiohttp pass-through to the same fake) in a third.
The same load goes to the fake directly (the baseline), through the bare hop and through
the wrapper, in the same run:

- concurrency 1: one client (stdlib ``http.client``, keep-alive) calls the three in turn,
  so all see the same machine state;
- concurrency 16 and 64 (``--concurrency``): ``--clients`` client processes share the
  threads, each thread with its own keep-alive connections; each round is a direct, a
  bare-hop and a wrapped window of ``--seconds``;
- non-streamed: ``POST /api/chat`` direct and through the bare hop, ``POST
  /v1/chat/completions`` via the wrapper; streamed: time to the first body byte (TTFT)
  and to the end of the stream;
- CPU per request of the wrapper and of the bare hop, from ``/proc/<pid>/stat`` (utime +
  stime) around each call (concurrency 1) or over each window (concurrency 16, 64);
- the wrapper's memory, VmRSS and VmHWM (peak) from ``/proc/<pid>/status``, before any
  call, after an untimed warm-up and at the end.

It prints each DESIGN 7 row it measures with the ratio of the wrapper's figure to the bare
hop's and a verdict (within, or over/under by how much). DESIGN 7 gives the wrapper "≤ 2x
the bare hop, same three rows" as the router: added p50 and CPU per request ≤ 2x
(non-stream, concurrency 1), added TTFT p50 ≤ 2x (streaming), and at concurrency 16 and
64 req/s ≥ 0.5x (twice the time per request is half the rate), added p99 ≤ 2x, 0 errors;
and memory (peak ≤ 100 MB, flat: see ``benchlib.FLAT_GROWTH``).

``--throughput`` measures instead the token rate of the whole chain on the real embedded
model (``python -m services.modelhost``, the wrapper in front of it, the official ``openai``
client streaming) against llama-cpp-python called directly in this process and the host
called directly with the ``ollama`` client; helpers shared with ``bench_modelhost.py``.

A benchmark, not a test: a missed budget is reported, not turned into an exit code.

    .venv/bin/python scripts/bench/bench_wrapper.py [--requests 3000] [--rounds 5] [--seconds 0.8]
        [--clients 4] [--concurrency 16 64] [--json]
    .venv/bin/python scripts/bench/bench_wrapper.py --throughput [--runs 5] [--tokens 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
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
    memory_mb,
    output_arguments,
    serve_helper,
    start,
    start_helpers,
    stop,
    swarm_env,
    verdict,
    verdict_rows,
    wait_ready,
)

WRAPPER = "reasoner"  # a wrapper of the default profile; only its backend and port change
MODEL = "smollm2:135m"
# DESIGN 7: wrapper hop ≤ 2x the bare hop on the router's rows; req/s: half the bare hop's.
BUDGETS = HopBudgets(added_p50=2.0, cpu=2.0, added_ttfb=2.0, per_s=0.5, added_p99=2.0)

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


LINES = [json.dumps(line).encode() + b"\n" for line in STREAM]


class FakeOllama(CannedHTTP):
    """The Ollama API calls the wrapper makes, answered at once (or paced: see
    ``CannedHTTP``)."""

    STREAMS = {(b"POST", b"/api/chat"): (b"application/x-ndjson", LINES)}
    CANNED = {
        (b"POST", b"/api/chat", False): http_response(json.dumps(ANSWER).encode()),
        (b"POST", b"/api/chat", True): http_chunked(LINES, b"application/x-ndjson"),
        (b"GET", b"/api/tags", False): http_response(json.dumps(TAGS).encode()),
        (b"POST", b"/api/show", False): http_response(json.dumps(SHOW).encode()),
        (b"GET", b"/api/version", False): http_response(b'{"version":"0.0.0-fake"}'),
    }


# --- processes -----------------------------------------------------------------------------


def wrapper_env(state: Path, wrapper_port: int, backend_port: int) -> dict[str, str]:
    """The default profile's wrapper, moved to ``wrapper_port`` and pointed at a backend on
    ``backend_port``; its registry URL is a port where nothing listens (it retries)."""
    return swarm_env(
        state,
        **{
            f"SWARM_WRAPPERS__{WRAPPER.upper()}__PORT": str(wrapper_port),
            "SWARM_BACKENDS__SMOLLM2__PORT": str(backend_port),
            "SWARM_REGISTRY__URL": f"http://{HOST}:{free_port()}",
        },
    )


# --- measuring -----------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Say hello."}]
DIRECT = {"model": MODEL, "messages": MESSAGES, "stream": False}
VIA = {"model": MODEL, "messages": MESSAGES}


def bodies(scenario: str) -> tuple[bytes, bytes]:
    """(the direct body, the wrapped body) of a scenario."""
    stream = scenario == "stream"
    direct, via = DIRECT | {"stream": stream}, VIA | {"stream": stream}
    return json.dumps(direct).encode(), json.dumps(via).encode()


def targets(scenario: str, direct: int, reference: int, wrapper: int) -> dict:
    """The fake and the bare hop speak the Ollama API, the wrapper the OpenAI API."""
    direct_body, via_body = bodies(scenario)
    return {
        "direct": (direct, "/api/chat", direct_body),
        "reference": (reference, "/api/chat", direct_body),
        "via": (wrapper, "/v1/chat/completions", via_body),
    }


def table(results: dict, command: str) -> str:
    return hop_report(results, command, "wrapper", "wrapped")


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
    hop_arguments(parser)
    parser.add_argument("--throughput", action="store_true", help="tok/s on the embedded model")
    parser.add_argument("--runs", type=int, default=5, help="--throughput: runs of each path")
    parser.add_argument("--tokens", type=int, default=256, help="--throughput: tokens per run")
    output_arguments(parser)
    args = parser.parse_args(argv)
    if serve_helper(args, FakeOllama):
        return 0
    command = shlex.join(["python", "scripts/bench/bench_wrapper.py", *(argv or sys.argv[1:])])
    if args.throughput:
        results = throughput(args)
        print(json.dumps(results, indent=2) if args.json else throughput_table(results, command))
        return 0

    load_at_start = load_average()
    fake_port, wrapper_port, reference_port = free_port(), free_port(), free_port()
    state = Path(tempfile.mkdtemp(prefix="bench-wrapper-"))
    env = wrapper_env(state, wrapper_port, fake_port)
    fake, reference = start_helpers(__file__, env, state, fake_port, reference_port, args.reference)
    wrapper = start([sys.executable, "-m", "services", WRAPPER], env, state / "wrapper.log")
    # spawn, not fork: clients start clean; Ctrl-C is the parent's to handle.
    pool = multiprocessing.get_context("spawn").Pool(args.clients, initializer=ignore_sigint)
    try:
        wait_ready(fake, fake_port, "/api/version")
        wait_ready(wrapper, wrapper_port, "/health")
        wait_ready(reference, reference_port, "/api/version")
        hops = partial(targets, direct=fake_port, reference=reference_port, wrapper=wrapper_port)
        pids = {"reference": reference.pid, "via": wrapper.pid}
        results = measure_hop(pool, args, hops, pids)
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
    results["rows"] = verdict_rows(results, BUDGETS, "wrapper")
    print(json.dumps(results, indent=2) if args.json else table(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
