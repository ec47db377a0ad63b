"""scripts/engine.py: the llama.cpp builds tried on a CPU, and the check that picks one.

The real compile and decode are what ``./scripts/test.sh`` itself goes through on every
fresh machine; here pip and the decode are stood in for, to cover the paths a healthy
machine never takes."""

from __future__ import annotations

import signal

import pytest

from scripts import engine as installer

# A Sapphire Rapids VM's flags: AVX-512 usable, AMX advertised (and refused by the VM).
SAPPHIRE_RAPIDS = {
    "sse4_2", "avx", "avx2", "bmi2", "fma", "f16c", "avx_vnni", "avx512f", "avx512cd",
    "avx512vl", "avx512dq", "avx512bw", "avx512vbmi", "avx512_vnni", "avx512_bf16",
    "amx_tile", "amx_int8", "amx_bf16",
}  # fmt: skip
HASWELL = {"sse4_2", "avx", "avx2", "bmi2", "fma", "f16c"}


def flags_of(build: installer.Build) -> dict[str, str]:
    return dict(arg.removeprefix("-D").split("=") for arg in build.cmake_args)


def test_every_build_names_each_instruction_set_and_never_amx_or_native():
    for build in installer.builds("x86_64", SAPPHIRE_RAPIDS):
        flags = flags_of(build)
        assert flags["GGML_NATIVE"] == "OFF"
        assert flags["GGML_AMX_TILE"] == flags["GGML_AMX_INT8"] == flags["GGML_AMX_BF16"] == "OFF"
        assert set(installer.X86_FEATURES) <= set(flags)


def test_builds_go_from_this_cpu_to_any_x86_64():
    first, v3, baseline = installer.builds("x86_64", SAPPHIRE_RAPIDS)
    assert (first.name, v3.name, baseline.name) == ("cpu", "x86-64-v3", "x86-64")
    assert flags_of(first)["GGML_AVX512"] == flags_of(first)["GGML_AVX512_VNNI"] == "ON"
    assert flags_of(v3)["GGML_AVX2"] == "ON"
    assert flags_of(v3)["GGML_AVX512"] == "OFF"
    assert set(flags_of(baseline).values()) == {"OFF"}
    assert len({first.key, v3.key, baseline.key}) == 3  # a wheel is cached per build


def test_a_cpu_that_is_exactly_x86_64_v3_has_no_duplicate_build():
    assert [b.name for b in installer.builds("x86_64", HASWELL)] == ["cpu", "x86-64"]


def test_other_architectures_build_llama_cpps_portable_default():
    (build,) = installer.builds("aarch64", set())
    assert "-DGGML_NATIVE=OFF" in build.cmake_args


def test_a_sigill_is_named_as_instructions_this_cpu_cannot_run():
    said = installer.describe_exit(-signal.SIGILL)
    assert said == "killed by SIGILL: the llama.cpp build uses instructions this CPU cannot run"
    assert installer.describe_exit(2, "one\nmodelhost: no such model\n") == (
        "modelhost: no such model"
    )


class Machine:
    """pip and the decode, stood in for: builds named in ``crashes`` die in the check."""

    def __init__(self, tmp_path, crashes=(), machine="cpu-a"):
        self.installed: list[str] = []
        self.checked: list[str] = []
        self.crashes = set(crashes)
        self.engine = self.on(tmp_path, machine)

    def on(self, tmp_path, machine: str) -> installer.Engine:
        return installer.Engine(
            state_file=tmp_path / "engine.json",
            machine=machine,
            candidates=installer.builds("x86_64", SAPPHIRE_RAPIDS),
            install=lambda build: self.installed.append(build.name),
            check=self.check,
        )

    def check(self) -> str | None:
        current = self.installed[-1]
        self.checked.append(current)
        return installer.describe_exit(-signal.SIGILL) if current in self.crashes else None


def test_a_build_that_dies_in_its_check_is_replaced_by_the_next(tmp_path):
    machine = Machine(tmp_path, crashes={"cpu"})
    machine.engine.ensure_installed()
    assert machine.engine.ensure_working().name == "x86-64-v3"
    assert machine.installed == ["cpu", "x86-64-v3"]
    assert machine.checked == ["cpu", "x86-64-v3"]
    # Checked once per machine: the next start neither installs nor decodes.
    assert machine.engine.ensure_working().name == "x86-64-v3"
    assert machine.checked == ["cpu", "x86-64-v3"]


def test_the_same_venv_on_another_cpu_is_checked_again(tmp_path):
    machine = Machine(tmp_path, crashes={"cpu"})
    machine.engine.ensure_working()
    other = machine.on(tmp_path, "cpu-b")
    assert other.ensure_working().name == "x86-64-v3"  # kept: it runs there too
    assert machine.checked == ["cpu", "x86-64-v3", "x86-64-v3"]


def test_when_no_build_runs_the_error_says_so(tmp_path):
    machine = Machine(tmp_path, crashes={"cpu", "x86-64-v3", "x86-64"})
    with pytest.raises(installer.EngineError, match=r"no llama\.cpp build runs on this CPU"):
        machine.engine.ensure_working()
    assert machine.checked == ["cpu", "x86-64-v3", "x86-64"]


def test_rebuild_gives_up_the_installed_build(tmp_path):
    machine = Machine(tmp_path)
    assert machine.engine.ensure_working().name == "cpu"
    assert machine.engine.ensure_working(rebuild=True).name == "x86-64-v3"


def test_a_check_that_cannot_run_gives_up_no_build(tmp_path):
    """A bad profile or a missing model fails every build alike: none is blamed for it."""
    machine = Machine(tmp_path)

    def cannot_run() -> str | None:
        raise installer.EngineError("the engine check could not run: modelhost: config …")

    machine.engine.check = cannot_run
    with pytest.raises(installer.EngineError, match="could not run"):
        machine.engine.ensure_working()
    assert machine.engine.remaining()[0].name == "cpu"
    assert "failed" not in machine.engine.state()
