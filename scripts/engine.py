"""Install llama-cpp-python built for the CPU it runs on, and prove that it runs.

``python scripts/engine.py install`` puts an engine in the running venv (before the project's
extras, which would otherwise let pip build one); ``python scripts/engine.py check`` then
decodes a real prompt with a packaged model in a subprocess, and on a crash installs the next,
more conservative build and checks again. One line names the cause when none runs.

Why not ``pip install llama-cpp-python``: its default build is ``-march=native`` and pip's
wheel cache keys on the sdist, not on ``CMAKE_ARGS`` or the CPU. A wheel built on one machine
is then reused on another, and a VM that advertises instructions it does not enable (AMX)
kills the process with SIGILL on the first real prompt. Here every instruction set is named
in the build flags, AMX never, and wheels are cached under a key of version and flags.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pinned_version() -> str:
    """The ``llama-cpp-python==X`` of pyproject's ``embedded`` extra: one version, one key."""
    with (ROOT / "pyproject.toml").open("rb") as file:
        extra = tomllib.load(file)["project"]["optional-dependencies"]["embedded"]
    for requirement in extra:
        name, _, version = requirement.partition("==")
        if name.strip() == "llama-cpp-python" and version:
            return version.strip()
    raise SystemExit("pyproject.toml: the embedded extra must pin llama-cpp-python==VERSION")


VERSION = pinned_version()
CHECK_MODEL = "smollm2:135m"
STATE_FILE = Path(sys.prefix) / ".engine.json"

# GGML option -> the /proc/cpuinfo flags it needs (all of them).
X86_FEATURES = {
    "GGML_SSE42": {"sse4_2"},
    "GGML_AVX": {"avx"},
    "GGML_AVX2": {"avx2"},
    "GGML_BMI2": {"bmi2"},
    "GGML_FMA": {"fma"},
    "GGML_F16C": {"f16c"},
    "GGML_AVX_VNNI": {"avx_vnni"},
    "GGML_AVX512": {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"},
    "GGML_AVX512_VBMI": {"avx512vbmi"},
    "GGML_AVX512_VNNI": {"avx512_vnni"},
    "GGML_AVX512_BF16": {"avx512_bf16"},
}
# x86-64-v3 (Haswell, 2013): what nearly every x86 server of the last decade runs.
X86_64_V3 = ("GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_BMI2", "GGML_FMA", "GGML_F16C")
# Never built: AMX needs a permission the kernel or the VM may refuse after cpuid advertised it.
ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16", "GGML_NATIVE")
# The multimodal library is not used here, and it is a fifth of the build time.
COMMON_ARGS = ("-DLLAVA_BUILD=OFF",)


@dataclass(frozen=True)
class Build:
    name: str
    cmake_args: tuple[str, ...]

    @property
    def key(self) -> str:
        text = json.dumps(
            [VERSION, platform.machine(), sys.implementation.cache_tag, *self.cmake_args]
        )
        return f"{VERSION}-{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def x86_build(name: str, enabled: set[str]) -> Build:
    args = [f"-D{option}={'ON' if option in enabled else 'OFF'}" for option in X86_FEATURES]
    args += [f"-D{option}=OFF" for option in ALWAYS_OFF]
    return Build(name, (*args, *COMMON_ARGS))


def builds() -> list[Build]:
    """The builds to try, fastest first; each one runs on more machines than the last."""
    if platform.machine() not in ("x86_64", "AMD64"):
        # Elsewhere llama.cpp's non-native default is the architecture's baseline.
        return [Build("generic", ("-DGGML_NATIVE=OFF", *COMMON_ARGS))]
    flags = cpu_flags()
    detected = {option for option, needs in X86_FEATURES.items() if needs <= flags}
    candidates = [
        x86_build("cpu", detected),
        x86_build("x86-64-v3", detected & set(X86_64_V3)),
        x86_build("x86-64", set()),
    ]
    unique: dict[tuple[str, ...], Build] = {}
    for build in candidates:
        unique.setdefault(build.cmake_args, build)
    return list(unique.values())


def cache_dir() -> Path:
    base = os.environ.get("SWARM_ENGINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "local-llm-swarm", "engine"
    )
    return Path(base)


def say(message: str) -> None:
    print(f"==> engine: {message}", flush=True)


def wheel_for(build: Build) -> Path:
    """The build's wheel, from the cache or compiled now (minutes)."""
    folder = cache_dir() / build.key
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    if wheels:
        return wheels[-1]
    say(f"compiling llama-cpp-python {VERSION} ({build.name} build; takes about 5-10 minutes)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        env = {**os.environ, "CMAKE_ARGS": " ".join(build.cmake_args), "FORCE_CMAKE": "1"}
        command = [
            sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir",
            "--no-binary", "llama-cpp-python", "--wheel-dir", scratch,
            f"llama-cpp-python=={VERSION}",
        ]  # fmt: skip
        subprocess.run(command, env=env, check=True)
        built = next(Path(scratch).glob("llama_cpp_python-*.whl"))
        folder.mkdir(exist_ok=True)
        return Path(shutil.move(built, folder / built.name))


def read_state() -> dict:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def write_state(**values) -> None:
    STATE_FILE.write_text(json.dumps(read_state() | values, indent=2) + "\n")


def install(build: Build) -> None:
    wheel = wheel_for(build)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall"]
    subprocess.run([*command, str(wheel)], check=True)
    write_state(installed=build.key, checked=None)


def machine_id() -> str:
    """What a check result holds for: this CPU's model and flags."""
    text = json.dumps([platform.machine(), sorted(cpu_flags()), platform.processor()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_check() -> str | None:
    """None when a real decode succeeds in a subprocess, else how it failed (one line)."""
    command = [sys.executable, "-m", "services.modelhost", "--model", CHECK_MODEL, "--check"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return None
    return describe_exit(result.returncode, result.stderr)


def describe_exit(code: int, stderr: str = "") -> str:
    if code < 0:
        name = signal.Signals(-code).name
        if -code == signal.SIGILL:
            return f"killed by {name}: the llama.cpp build uses instructions this CPU cannot run"
        return f"killed by {name}"
    last = stderr.strip().splitlines()[-1:] or [f"exit status {code}"]
    return last[0]


def next_builds(state: dict) -> list[Build]:
    """The builds not known to fail on this machine, the installed one first."""
    failed = set(state.get("failed", {}).get(machine_id(), []))
    remaining = [build for build in builds() if build.key not in failed]
    remaining.sort(key=lambda build: build.key != state.get("installed"))
    return remaining


def command_install() -> int:
    state = read_state()
    if state.get("installed") and _installed_version() == VERSION:
        return 0
    candidates = next_builds(state)
    if not candidates:
        return fail("no llama.cpp build left to try on this machine")
    install(candidates[0])
    return 0


def command_check(*, rebuild: bool = False) -> int:
    if rebuild and (installed := read_state().get("installed")):
        mark_failed(installed)
    while True:
        state = read_state()
        if state.get("checked") == machine_id() and state.get("installed"):
            return 0
        candidates = next_builds(state)
        if not candidates:
            return fail("no llama.cpp build runs on this CPU")
        build = candidates[0]
        if state.get("installed") != build.key or _installed_version() != VERSION:
            install(build)
        say(f"checking the {build.name} build: a {CHECK_MODEL} decode in a subprocess")
        problem = run_check()
        if problem is None:
            write_state(checked=machine_id())
            return 0
        say(f"the {build.name} build failed its check: {problem}")
        mark_failed(build.key)


def mark_failed(key: str) -> None:
    """Never try build ``key`` on this machine again (the next check takes the next one)."""
    failed = read_state().get("failed", {})
    failed.setdefault(machine_id(), []).append(key)
    write_state(failed=failed, installed=None, checked=None)


def _installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def fail(message: str) -> int:
    print(
        f"error: {message}; every build tried is recorded in {STATE_FILE}. Remove that file and"
        f" {cache_dir()} to start over, or report the CPU (lscpu) with this line.",
        file=sys.stderr,
    )
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["install", "check", "builds"])
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="check: give up the installed build on this machine and install the next one",
    )
    args = parser.parse_args()
    if args.command == "builds":
        for build in builds():
            print(build.key, " ".join(build.cmake_args))
        return 0
    if args.command == "install":
        return command_install()
    return command_check(rebuild=args.rebuild)


if __name__ == "__main__":
    sys.exit(main())
