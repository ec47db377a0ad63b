"""The dedicated embedder (all-minilm:22m) against SmolLM2 embedding on the same machine.

- conversion: ``bert_gguf.converted`` of the package's safetensors into a fresh directory,
  ``--runs`` times (the median), and the GGUF's size;
- per model: ``python -m services.modelhost`` as a real process (the embedder twice: its
  first start converts, its second reuses the file), its RSS once ready and
  after the embeddings, and ``--calls`` ``/api/embed`` calls of one short text timed on the
  client (median and min-max), after one untimed call that makes the embedding context.

Prints a Markdown table. A benchmark, not a test: the exit code is non-zero only when a
host fails.

    .venv/bin/python scripts/bench/bench_embedder.py [--calls 20] [--runs 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from benchlib import free_port, load_average, memory_mb, start, stop, swarm_env, wait_ready

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from services.modelhost.bert_gguf import converted  # noqa: E402
from services.modelhost.catalog import lookup, package_dir  # noqa: E402

EMBEDDER, GENERATIVE = "all-minilm:22m", "smollm2:135m"
TEXT = "The router falls back to a cloud provider when no local model can answer."


def conversion(runs: int) -> tuple[float, int]:
    """Median seconds of a conversion from scratch, and the GGUF's size in bytes."""
    archive = package_dir(lookup(EMBEDDER)) / "model.zip"
    seconds, size = [], 0
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as directory:
            started = time.perf_counter()
            path = converted(archive, Path(directory), "all-minilm-22m")
            seconds.append(time.perf_counter() - started)
            size = path.stat().st_size
    return statistics.median(seconds), size


def host(model: str, calls: int, threads: int | None, state: Path) -> dict[str, float]:
    port = free_port()
    argv = [sys.executable, "-m", "services.modelhost", "--model", model, "--port", str(port)]
    if threads:
        argv += ["--threads", str(threads)]
    process = start(argv, swarm_env(state), state / f"{model.replace(':', '-')}.log")
    try:
        started = time.perf_counter()
        wait_ready(process, port, "/readyz", deadline_s=120)
        ready_s = time.perf_counter() - started
        ready_rss = memory_mb(process.pid)["VmRSS"]
        body = {"model": model, "input": TEXT}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            client.post("/api/embed", json=body).raise_for_status()  # makes the context
            timings = []
            for _ in range(calls):
                began = time.perf_counter()
                answer = client.post("/api/embed", json=body)
                timings.append((time.perf_counter() - began) * 1e3)
                answer.raise_for_status()
            width = len(answer.json()["embeddings"][0])
        after = memory_mb(process.pid)
    finally:
        stop(process)
    return {
        "ready_s": ready_s,
        "ready_rss": ready_rss,
        "rss": after["VmRSS"],
        "peak": after["VmHWM"],
        "median_ms": statistics.median(timings),
        "min_ms": min(timings),
        "max_ms": max(timings),
        "width": width,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    print(f"load average before: {load_average()}")
    seconds, size = conversion(args.runs)
    print(f"conversion: {seconds:.2f} s (median of {args.runs}), GGUF {size / 1e6:.1f} MB\n")
    print("| model | dims | ready in | RSS ready / after / peak (MB) | embed ms median (min-max) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as directory:
        # The embedder twice on one state directory: converting at its first load, then not.
        for model, label in (
            (EMBEDDER, f"{EMBEDDER}, converting"),
            (EMBEDDER, f"{EMBEDDER}, cached"),
            (GENERATIVE, GENERATIVE),
        ):
            state = Path(directory) / model.replace(":", "-")
            state.mkdir(exist_ok=True)
            got = host(model, args.calls, args.threads, state)
            print(
                f"| {label} | {got['width']} | {got['ready_s']:.1f} s | {got['ready_rss']:.0f} / "
                f"{got['rss']:.0f} / {got['peak']:.0f} | {got['median_ms']:.1f} "
                f"({got['min_ms']:.1f}-{got['max_ms']:.1f}) |"
            )
    print(f"\nload average after: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
