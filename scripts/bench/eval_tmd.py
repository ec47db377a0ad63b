"""Evaluate the TLC domain classifier against the labelled queries of tests/data.

Sends every query of the evaluation set to a running classifier's ``/classify_domain``
(top_k 3), one at a time, and prints top-1 and top-3 accuracy and the latency
percentiles, against the targets of issue 4 (top-1 >= 80%, top-3 >= 95%, p50 <= 300 ms),
with the machine's load average before and after. One ``/classify_domain`` call before
the timed ones lets the classifier measure its prior (``services/wrapper/tmd.py``).
``--tmd`` also asks ``/extract_tmd`` and reports task and method accuracy (no targets).

    .venv/bin/python scripts/bench/eval_tmd.py [--url http://127.0.0.1:8052] [--limit N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
EVAL_SET = REPO_ROOT / "tests" / "data" / "tmd_eval.jsonl"
TARGETS = {"top1": 0.80, "top3": 0.95, "p50_ms": 300.0}


def load_eval_set(path: Path = EVAL_SET) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def evaluate(url: str, cases: list[dict], *, tmd: bool = False, timeout: float = 60.0) -> dict:
    """Classify every case; the figures and every answer."""
    answers = []
    with httpx.Client(base_url=url, timeout=timeout) as client:
        client.post("/classify_domain", json={"query": "warm-up", "top_k": 1}).raise_for_status()
        if tmd:
            client.post("/extract_tmd", json={"query": "warm-up"}).raise_for_status()
        load_before = load_average()
        for case in cases:
            started = time.perf_counter()
            response = client.post("/classify_domain", json={"query": case["query"], "top_k": 3})
            elapsed_ms = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            ranked = [d["domain"] for d in response.json()["domains"]]
            answer = {"case": case, "ranked": ranked, "ms": elapsed_ms}
            if tmd:
                body = {"query": case["query"]}
                answer["tmd"] = client.post("/extract_tmd", json=body).raise_for_status().json()
            answers.append(answer)
    return summarize(answers) | {
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def summarize(answers: list[dict]) -> dict:
    n = len(answers)
    latencies = sorted(a["ms"] for a in answers)
    misses = Counter(a["case"]["domain"] for a in answers if a["ranked"][0] != a["case"]["domain"])
    figures = {
        "queries": n,
        "top1": sum(a["ranked"][0] == a["case"]["domain"] for a in answers) / n,
        "top3": sum(a["case"]["domain"] in a["ranked"][:3] for a in answers) / n,
        "p50_ms": statistics.median(latencies),
        "p95_ms": latencies[max(0, round(0.95 * n) - 1)],
        "misses_by_domain": dict(misses.most_common()),
        "answers": answers,
    }
    if answers and "tmd" in answers[0]:
        for axis in ("task", "method"):
            right = sum(a["tmd"]["tmd"][axis] == a["case"][axis] for a in answers)
            figures[f"{axis}_accuracy"] = right / n
    return figures


def report(figures: dict, command: str) -> str:
    def verdict(name: str, value: float, at_least: bool) -> str:
        target = TARGETS[name]
        ok = value >= target if at_least else value <= target
        return "ok" if ok else "**missed**"

    lines = [
        f"`{command}` on {platform.node()}, {time.strftime('%Y-%m-%d %H:%M %Z')}, "
        f"{figures['queries']} queries; load average {figures['load_average_before']} "
        f"before, {figures['load_average_after']} after",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| top-1 accuracy | {figures['top1']:.1%} | ≥ 80% "
        f"{verdict('top1', figures['top1'], True)} |",
        f"| top-3 accuracy | {figures['top3']:.1%} | ≥ 95% "
        f"{verdict('top3', figures['top3'], True)} |",
        f"| latency p50 | {figures['p50_ms']:.0f} ms | ≤ 300 ms "
        f"{verdict('p50_ms', figures['p50_ms'], False)} |",
        f"| latency p95 | {figures['p95_ms']:.0f} ms | — |",
    ]
    for axis in ("task", "method"):
        if f"{axis}_accuracy" in figures:
            lines.append(
                f"| {axis} accuracy (`/extract_tmd`) | {figures[f'{axis}_accuracy']:.1%} | — |"
            )
    if figures["misses_by_domain"]:
        missed = ", ".join(f"{d} {n}" for d, n in figures["misses_by_domain"].items())
        lines += ["", f"Top-1 misses by expected domain: {missed}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8052", help="the classifier")
    parser.add_argument("--limit", type=int, help="only the first N queries")
    parser.add_argument("--tmd", action="store_true", help="also /extract_tmd: task, method")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = parser.parse_args(argv)
    cases = load_eval_set()[: args.limit]
    try:
        figures = evaluate(args.url, cases, tmd=args.tmd)
    except httpx.HTTPError as exc:
        print(f"eval_tmd: {args.url}: {exc}", file=sys.stderr)
        return 1
    command = shlex.join(["python", "scripts/bench/eval_tmd.py", *(argv or sys.argv[1:])])
    print(json.dumps(figures, indent=2) if args.json else report(figures, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
