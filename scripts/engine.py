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
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
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


def builds(machine: str | None = None, flags: set[str] | None = None) -> list[Build]:
    """The builds to try on this machine (or ``machine`` with CPU ``flags``), fastest
    first; each one runs on more machines than the last."""
    machine = machine or platform.machine()
    flags = cpu_flags() if flags is None else flags
    if machine not in ("x86_64", "AMD64"):
        # Elsewhere llama.cpp's non-native default is the architecture's baseline.
        return [Build("generic", ("-DGGML_NATIVE=OFF", *COMMON_ARGS))]
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
        if subprocess.run(command, env=env, check=False).returncode != 0:
            raise EngineError(
                f"compiling llama-cpp-python {VERSION} ({build.name} build) failed, as pip says "
                "above; it needs a C and C++ compiler (Debian: apt-get install build-essential)"
            )
        built = next(Path(scratch).glob("llama_cpp_python-*.whl"))
        folder.mkdir(exist_ok=True)
        return Path(shutil.move(built, folder / built.name))


@dataclass
class Engine:
    """The engine of one venv: the build installed there, and which builds were checked or
    failed on which machine (kept in ``state_file``). ``install`` and ``check`` are the
    slow parts, given so that a test can stand in for pip and the decode."""

    state_file: Path = STATE_FILE
    machine: str = field(default_factory=lambda: machine_id())
    candidates: list[Build] = field(default_factory=lambda: builds())
    install: Callable[[Build], None] = field(default=lambda build: install_wheel(wheel_for(build)))
    check: Callable[[], str | None] = field(default=lambda: run_check())

    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def update(self, **values) -> None:
        self.state_file.write_text(json.dumps(self.state() | values, indent=2) + "\n")

    def remaining(self) -> list[Build]:
        """The builds not known to fail on this machine, the installed one first."""
        state = self.state()
        failed = set(state.get("failed", {}).get(self.machine, []))
        remaining = [build for build in self.candidates if build.key not in failed]
        remaining.sort(key=lambda build: build.key != state.get("installed"))
        return remaining

    def put(self, build: Build) -> None:
        self.install(build)
        self.update(installed=build.key, checked=None)

    def ensure_installed(self) -> None:
        """An engine in the venv before pip sees the project's extras, which would
        otherwise make pip build (or take from its cache) a native one."""
        if self.state().get("installed") and installed_version() == VERSION:
            return
        if not (remaining := self.remaining()):
            raise self.none_left("no llama.cpp build is left to try on this machine")
        self.put(remaining[0])

    def ensure_working(self, *, rebuild: bool = False) -> Build:
        """Check the installed build on this machine once; install the next on failure."""
        if rebuild and (installed := self.state().get("installed")):
            self.give_up(installed)
        while True:
            if not (remaining := self.remaining()):
                raise self.none_left("no llama.cpp build runs on this CPU")
            build, state = remaining[0], self.state()
            if state.get("installed") == build.key and state.get("checked") == self.machine:
                return build
            if state.get("installed") != build.key or installed_version() != VERSION:
                self.put(build)
            say(f"checking the {build.name} build: a {CHECK_MODEL} decode in a subprocess")
            if (problem := self.check()) is None:
                self.update(checked=self.machine)
                return build
            say(f"the {build.name} build failed its check: {problem}")
            self.give_up(build.key)

    def none_left(self, what: str) -> EngineError:
        return EngineError(
            f"{what}; the builds tried are recorded in {self.state_file} (remove it to try "
            "them again); please report this line with the output of lscpu"
        )

    def give_up(self, key: str) -> None:
        """Never try build ``key`` on this machine again."""
        failed = self.state().get("failed", {})
        failed.setdefault(self.machine, []).append(key)
        self.update(failed=failed, installed=None, checked=None)


class EngineError(Exception):
    """No engine can be installed or checked here; the message says why in one line."""


def install_wheel(wheel: Path) -> None:
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall"]
    subprocess.run([*command, str(wheel)], check=True)


def machine_id() -> str:
    """What a check result holds for: this CPU's model and flags."""
    text = json.dumps([platform.machine(), sorted(cpu_flags()), platform.processor()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# The model host's exit status for what the user must fix (a bad profile, a model that is
# not installed): no build would pass the check then, so none is given up for it.
USER_ERROR_STATUS = 2


def run_check() -> str | None:
    """None when a real decode succeeds in a subprocess, else how the build failed (one
    line); EngineError when the check could not run at all."""
    command = [sys.executable, "-m", "services.modelhost", "--model", CHECK_MODEL, "--check"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return None
    if result.returncode == USER_ERROR_STATUS:
        raise EngineError(f"the engine check could not run: {describe_exit(2, result.stderr)}")
    return describe_exit(result.returncode, result.stderr)


def describe_exit(code: int, stderr: str = "") -> str:
    if code < 0:
        name = signal.Signals(-code).name
        if -code == signal.SIGILL:
            return f"killed by {name}: the llama.cpp build uses instructions this CPU cannot run"
        return f"killed by {name}"
    last = stderr.strip().splitlines()[-1:] or [f"exit status {code}"]
    return last[0]


def installed_version() -> str | None:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


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
    engine = Engine()
    try:
        if args.command == "install":
            engine.ensure_installed()
        else:
            engine.ensure_working(rebuild=args.rebuild)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
