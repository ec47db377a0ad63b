"""Shared fixtures: a fake clock, registry apps on SQLite and PostgreSQL, real processes."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from registry.app import create_app
from registry.settings import RegistrySettings

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


class FakeClock:
    """An injectable clock that only moves when a test moves it."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def load_data(name: str):
    return json.loads((DATA / name).read_text())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def agent() -> dict:
    """A valid agent definition; tests copy and change it."""
    return load_data("agent_reasoner.json")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- databases -------------------------------------------------------------------------


def _postgres_binaries() -> Path | None:
    found = shutil.which("initdb") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None
    )
    return Path(found).resolve().parent if found else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server for the suite: SWARM_TEST_POSTGRES_URL, or a throwaway cluster."""
    if url := os.environ.get("SWARM_TEST_POSTGRES_URL"):
        yield url
        return
    bindir = _postgres_binaries()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb); set SWARM_TEST_POSTGRES_URL")
    # PostgreSQL refuses to run as root: run it as the postgres user in a dir it owns.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    datadir = Path(tempfile.mkdtemp(prefix="swarm-pg-"))
    if as_user:
        shutil.chown(datadir, "postgres", "postgres")
    port = free_port()
    subprocess.run(
        [*as_user, bindir / "initdb", "-D", datadir, "-A", "trust", "-U", "swarm", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {datadir} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [
            *as_user,
            bindir / "pg_ctl",
            "-D",
            datadir,
            "-o",
            options,
            "-w",
            "-l",
            datadir / "log",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://swarm@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, bindir / "pg_ctl", "-D", datadir, "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(datadir, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> Iterator[str]:
    """Each registry contract test runs on SQLite and on PostgreSQL: the same code."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    url = request.getfixturevalue("postgres_server")
    yield url
    from sqlalchemy import create_engine

    from registry.tables import TABLES, AgentRow

    engine = create_engine(url)
    AgentRow.metadata.drop_all(engine, tables=TABLES)
    engine.dispose()


# --- the registry ----------------------------------------------------------------------


@pytest.fixture
def registry_settings(database_url) -> RegistrySettings:
    # The background reaper is tested on its own; here it must not run between steps.
    return RegistrySettings(database_url=database_url, reap_interval_seconds=86_400)


@pytest.fixture
def make_registry(clock):
    """Start registry apps (lifespan included) with settings changed per test."""
    with contextlib.ExitStack() as stack:

        def make(settings: RegistrySettings, **changes) -> TestClient:
            app = create_app(settings.model_copy(update=changes), clock=clock)
            return stack.enter_context(TestClient(app))

        yield make


@pytest.fixture
def registry(make_registry, registry_settings) -> TestClient:
    return make_registry(registry_settings)


# --- real processes --------------------------------------------------------------------


def process_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_")}
    env |= {"SWARM_DATA_DIR": str(tmp_path / "state"), "PYTHONUNBUFFERED": "1"} | overrides
    return env


def wait_healthy(url: str, process: subprocess.Popen, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            raise AssertionError(f"{process.args} exited with {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"{url} did not become healthy within {deadline}s")


@pytest.fixture
def start_registry_process(tmp_path):
    """Run ``python -m registry`` as a real subprocess; returns (process, base URL)."""
    processes: list[subprocess.Popen] = []

    def start(port: int, **env: str) -> tuple[subprocess.Popen, str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "registry", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=process_env(tmp_path, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process)
        return process, url

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()
