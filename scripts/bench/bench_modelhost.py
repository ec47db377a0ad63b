"""Generation speed of the embedded model host against llama-cpp-python called directly.

Same prompt, greedy (temperature 0, fixed seed, no repeat penalty, so every run generates
exactly ``--tokens`` tokens), ``--runs`` runs of each, interleaved so that drift in the
machine's load hits both alike:

- direct: ``Llama.generate`` in this process, loaded by the host's own ``load_engine`` (the
  same file, context, batch and threads), timed from the first token to the last;
- host: ``python -m services.modelhost`` as a real process, called with the official
  ``ollama`` client streaming ``/api/generate``, timed on the client from the first
  streamed token to the last.

Prints a Markdown table (medians, min-max) and the ratio host/direct; DESIGN section 7's
budget for the wrapper chain is >= 97% of direct. A benchmark, not a test: the exit code is
non-zero only when the host fails.

    .venv/bin/python scripts/bench/bench_modelhost.py [--model smollm2:135m] [--runs 5]
        [--tokens 256] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ollama
from benchlib import free_port, load_average

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from schemas.config import load_settings  # noqa: E402
from services.modelhost.engine import load_engine  # noqa: E402
from services.modelhost.settings import ModelHostSettings, default_threads  # noqa: E402

# Greedy counting never ends on its own: every run generates exactly --tokens tokens.
PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
SEED = 42
BUDGET = 0.97


class TokenClock:
    """The one definition of generation speed in these benchmarks.

    ``(tokens - 1) / (last - first)``: the tokens generated after the first, over the time
    from the first token's arrival at the consumer to the last's (``perf_counter``), so
    prompt evaluation and set-up are left out alike for every path. ``tick`` at each piece
    of text as it arrives; ``pieces`` counts them (one per token for plain ASCII text).
    """

    def __init__(self) -> None:
        self.first = self.last = 0.0
        self.pieces = 0

    def tick(self) -> None:
        self.last = time.perf_counter()
        self.first = self.first or self.last
        self.pieces += 1

    def rate(self, tokens: int) -> float:
        return (tokens - 1) / (self.last - self.first)


def direct_run(
    llama, tokens: list[int], count: int, repeat_penalty: float = 1.0
) -> tuple[float, list[int]]:
    """(tok/s, the tokens) of ``Llama.generate`` (greedy) between the first and last token."""
    llama.set_seed(SEED)
    clock = TokenClock()
    answer: list[int] = []
    for token in llama.generate(tokens, temp=0.0, repeat_penalty=repeat_penalty):
        clock.tick()
        answer.append(token)
        if len(answer) == count:
            break
    return clock.rate(count), answer


def host_run(
    client: ollama.Client, model: str, count: int, messages: list[dict] | None = None
) -> tuple[float, float, str]:
    """(client-side tok/s, the host's own eval_count / eval_duration, the text) of one
    stream: ``/api/generate`` of PROMPT (raw, no repeat penalty), or ``/api/chat`` of
    ``messages`` with the host's default sampling but temperature 0."""
    options = {"temperature": 0, "seed": SEED, "num_predict": count}
    if messages is None:
        parts = client.generate(
            model=model, prompt=PROMPT, raw=True, options=options | {"repeat_penalty": 1.0},
            stream=True,
        )  # fmt: skip
    else:
        parts = client.chat(model=model, messages=messages, options=options, stream=True)
    clock = TokenClock()
    text: list[str] = []
    final = None
    for part in parts:
        piece = part.response if messages is None else part.message.content
        if piece:
            clock.tick()
            text.append(piece)
        if part.done:
            final = part
            break
    if final is None or final.eval_count != count:
        raise SystemExit(f"the host generated {final and final.eval_count} tokens, not {count}")
    own = final.eval_count / (final.eval_duration / 1e9)
    return clock.rate(count), own, "".join(text)


def rates_cell(rates: list[float]) -> str:
    return f"{statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f})"


def start_host(
    settings: ModelHostSettings, data_dir: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "services.modelhost", "--model", settings.model,
        "--port", str(settings.port), "--context-length", str(settings.context_length),
    ]  # fmt: skip
    if settings.threads:
        command += ["--threads", str(settings.threads)]
    env = {**(os.environ if env is None else env), "SWARM_DATA_DIR": data_dir}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the model host exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{settings.port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the model host did not start within 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: the host's)")
    parser.add_argument("--context-length", type=int, default=2_048)
    args = parser.parse_args()

    # The models directory of the profile's data dir, so an assembled Gemma is reused.
    data_dir = str(load_settings().state_dir)
    settings = ModelHostSettings(
        model=args.model,
        port=free_port(),
        context_length=args.context_length,
        threads=args.threads,
        models_dir=Path(data_dir) / "models",
    )
    load_at_start = load_average()
    engine = load_engine(settings)
    tokens = engine.tokenize(PROMPT)
    process = start_host(settings, data_dir)
    try:
        client = ollama.Client(host=f"http://127.0.0.1:{settings.port}", timeout=300)
        direct_run(engine.llama, tokens, 8)  # warm both up: first decodes are slow
        host_run(client, args.model, 8)
        direct, host, host_own = [], [], []
        for _ in range(args.runs):
            direct.append(direct_run(engine.llama, tokens, args.tokens)[0])
            client_rate, own_rate, _ = host_run(client, args.model, args.tokens)
            host.append(client_rate)
            host_own.append(own_rate)
    finally:
        process.terminate()
        process.wait(timeout=15)
        engine.close()

    ratio = statistics.median(host) / statistics.median(direct)
    threads = settings.threads or default_threads()
    print(f"`{shlex.join([Path(sys.executable).name, *sys.argv])}`\n")
    print(
        f"{args.model}, {args.tokens} tokens, greedy, {args.runs} interleaved runs, "
        f"{threads} threads, {os.cpu_count()} cores, {platform.machine()}; load average "
        f"{load_at_start} at start, {load_average()} at end\n"
    )
    print("| path | generation tok/s, median (min-max) |")
    print("|---|---|")
    print(f"| llama-cpp-python direct (`Llama.generate`, in process) | {rates_cell(direct)} |")
    print(f"| model host over HTTP (ollama client, streaming) | {rates_cell(host)} |")
    print(f"| model host, its own `eval_count / eval_duration` | {rates_cell(host_own)} |")
    verdict = "within" if ratio >= BUDGET else "under"
    print(f"\nhost / direct: **{ratio:.1%}** ({verdict} the {BUDGET:.0%} budget)")


if __name__ == "__main__":
    main()
