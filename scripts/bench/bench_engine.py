"""Speed of the llama.cpp builds scripts/engine.py can install, against a native build.

Each build is a wheel from engine.py's cache (compiled first if missing: minutes each),
installed alone in a scratch venv. Then, in turns so that drift in the machine's load hits
every build alike, a child process per build loads the model and measures:

- prompt tok/s: ``Llama.eval`` of a ``--prompt-tokens`` prompt from an empty cache;
- tok/s: greedy single-token decodes after it, ``--tokens`` of them.

``native`` is llama.cpp's default build (``-march=native``), the one pip makes: on a CPU
that advertises instructions it cannot run (AMX in some VMs) it dies, and the table says
how. A benchmark, not a test.

    .venv/bin/python scripts/bench/bench_engine.py [--builds cpu x86-64-v3 x86-64 native]
        [--model smollm2:135m] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

from benchlib import load_average

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

# The child runs in a scratch venv with llama-cpp-python alone: the project's modules are
# imported by the parent only.
# What llama-cpp-python itself needs besides the wheel (--no-deps keeps pip off the engine).
ENGINE_DEPENDENCIES = ["numpy", "diskcache", "jinja2", "typing-extensions"]
TEXT = "The quick brown fox jumps over the lazy dog while the registry counts heartbeats. "


def measure(model_path: str, prompt_tokens: int, tokens: int, threads: int) -> dict:
    """In the child: one prompt evaluation and ``tokens`` greedy decodes."""
    from llama_cpp import Llama

    llama = Llama(
        model_path=model_path,
        n_ctx=prompt_tokens + tokens + 16,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    prompt = llama.tokenize(TEXT.encode(), add_bos=True)
    while len(prompt) < prompt_tokens:
        prompt += llama.tokenize(TEXT.encode(), add_bos=False)
    prompt = prompt[:prompt_tokens]
    started = time.perf_counter()
    llama.eval(prompt)
    evaluated = time.perf_counter()
    for _ in range(tokens):
        token = llama.sample(temp=0.0)
        llama.eval([token])
    decoded = time.perf_counter()
    return {
        "prompt_tok_s": prompt_tokens / (evaluated - started),
        "tok_s": tokens / (decoded - evaluated),
    }


def scratch_venv(root: Path, build) -> Path:
    """A venv holding only ``build``'s wheel and what it imports."""
    folder = root / build.name
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *ENGINE_DEPENDENCIES], check=True)
    from scripts import engine

    subprocess.run([*pip, "--no-deps", str(engine.wheel_for(build))], check=True)
    return python


def run_child(python: Path, args: argparse.Namespace, model_path: Path) -> dict | str:
    """The child's figures, or how it died."""
    command = [
        str(python), __file__, "--child", str(model_path),
        "--prompt-tokens", str(args.prompt_tokens), "--tokens", str(args.tokens),
        "--threads", str(args.threads),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        from scripts.engine import describe_exit

        return describe_exit(done.returncode, done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builds", nargs="+", default=["cpu", "x86-64-v3", "native"])
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, help="default: the model host's")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.prompt_tokens, args.tokens, args.threads)))
        return 0

    from schemas.config import load_settings
    from scripts import engine
    from services.modelhost.catalog import locate, lookup
    from services.modelhost.settings import default_threads

    args.threads = args.threads or default_threads()
    native = engine.Build("native", ("-DGGML_NATIVE=ON", *engine.COMMON_ARGS))
    known = {build.name: build for build in [*engine.builds(), native]}
    if unknown := [name for name in args.builds if name not in known]:
        parser.error(f"unknown builds {unknown}; this machine's: {sorted(known)}")
    model_path = locate(lookup(args.model), load_settings().state_dir / "models")
    results: dict[str, list[dict | str]] = {name: [] for name in args.builds}
    with tempfile.TemporaryDirectory() as root:
        pythons = {name: scratch_venv(Path(root), known[name]) for name in args.builds}
        load_before = load_average()
        for _ in range(args.rounds):
            for name, python in pythons.items():
                results[name].append(run_child(python, args, model_path))
        load_after = load_average()

    command = shlex.join(["python", "scripts/bench/bench_engine.py", *sys.argv[1:]])
    print(f"`{command}`, {time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.processor() or ''}")
    print(
        f"{args.model}, {args.threads} thread(s), {args.prompt_tokens}-token prompt, "
        f"{args.tokens} greedy tokens, {args.rounds} rounds interleaved; "
        f"load average {load_before} before, {load_after} after\n"
    )
    print("| build | prompt tok/s, median (min-max) | tok/s, median (min-max) | flags |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        flags = " ".join(arg for arg in known[name].cmake_args if arg.endswith("=ON"))
        figures = [run for run in runs if isinstance(run, dict)]
        if not figures:
            print(f"| {name} | {runs[0]} | | {flags} |")
            continue
        cells = [_spread([run[key] for run in figures]) for key in ("prompt_tok_s", "tok_s")]
        died = f" ({len(runs) - len(figures)} runs died)" if len(figures) < len(runs) else ""
        print(f"| {name}{died} | {cells[0]} | {cells[1]} | {flags} |")
    return 0


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


if __name__ == "__main__":
    sys.exit(main())
