"""The swarm's life: bring every daemon of the profile (or of this host's part of a fleet:
see :mod:`services.control.daemons`) up under supervisord, wait until each is healthy,
report their state, and take them down again. One supervisord per state directory runs one
part: three "hosts" on one machine each have their own SWARM_DATA_DIR."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from schemas.config import BackendConfig, SwarmSettings
from services.control.daemons import EVERYTHING, Daemon, Part, daemons, external_backends
from services.control.supervisor import (
    Supervisor,
    config_path,
    log_path,
    log_size,
    render_config,
    unexpected_exits,
)
from services.control.token_file import TokenFileError, ensure_token_file, token_path

LOG_LINES = 20  # of a daemon that did not come up
DEATHS_BEFORE_GIVING_UP = 2  # one death can be bad luck; two in one start is a cause


class SwarmError(Exception):
    """Something the user must fix; the message is one line that says what."""


class KeepsDying(SwarmError):
    def __init__(self, message: str, daemon: str) -> None:
        super().__init__(message)
        self.daemon = daemon


@dataclass(frozen=True)
class DaemonStatus:
    name: str
    state: str  # supervisord's: RUNNING, STARTING, BACKOFF, STOPPED, FATAL... or NOT_STARTED
    pid: int | None
    health: str  # the daemon's own /health status, or why it gave none
    url: str


def up(
    settings: SwarmSettings,
    *,
    timeout: float,
    say: Callable[[str], None],
    part: Part = EVERYTHING,
) -> None:
    """Start (or bring in line with the profile) every daemon of ``part``; return once all
    are healthy."""
    if part != EVERYTHING and settings.registry_token is None:
        # A token generated here would be this host's alone: the others' writes would fail.
        raise SwarmError(
            f"--role {part.role}: the hosts of a fleet share one registry token: set "
            "SWARM_REGISTRY_TOKEN (or registry_token_file), the same on every host"
        )
    supervisor = Supervisor(settings)
    running = supervisor.running()
    if not running:
        check_ports(settings, part)
    check_models(settings, part)
    new_token = settings.registry_token is None and not token_path(settings).exists()
    write_config(settings, part)
    since = log_size(settings)
    if running:
        say("supervisord already running; applying the current profile")
        supervisor.update()
        if new_token:  # its file was removed: the daemons hold the old token
            say(f"a new swarm token in {token_path(settings)}: restarting every daemon")
            supervisor.restart_all()
    else:
        say(f"starting supervisord (logs in {settings.state_dir / 'logs'})")
        supervisor.start()
    check_external_backends(settings, say, part)
    say("waiting until every daemon is healthy")
    try:
        wait_healthy(settings, timeout, since=since, part=part)
    except KeepsDying as exc:
        # Restarting it again would only burn the CPU; `status` still says how it died.
        supervisor.keep_stopped(exc.daemon)
        raise


def write_config(settings: SwarmSettings, part: Part = EVERYTHING) -> Path:
    """supervisord's config for the profile's daemons of ``part``, with the swarm token's
    file (created when the profile configures no token); its path."""
    try:
        token_file = ensure_token_file(settings)
    except TokenFileError as exc:
        raise SwarmError(f"swarm token: {exc}") from None
    path = config_path(settings)
    path.write_text(render_config(settings, daemons(settings, part=part), token_file=token_file))
    return path


def down(settings: SwarmSettings, *, say: Callable[[str], None], part: Part = EVERYTHING) -> bool:
    """Stop the daemons of ``part``, and supervisord once it runs no other; False if the
    swarm was not running."""
    supervisor = Supervisor(settings)
    if not supervisor.running():
        return False
    processes = supervisor.processes()
    mine = [d.name for d in daemons(settings, part=part) if d.name in processes]
    others = [
        name
        for name, info in processes.items()
        if name not in mine and info.get("statename") in ("RUNNING", "STARTING", "BACKOFF")
    ]
    # Wrappers first, while the registry can still take their deregistration.
    supervisor.stop([name for name in mine if name.startswith("wrapper-")])
    if others:
        supervisor.stop([name for name in mine if not name.startswith("wrapper-")])
        say(f"stopped {part.describe()}; supervisord still runs {', '.join(sorted(others))}")
        return True
    supervisor.shutdown()
    say("stopped")
    return True


def status(settings: SwarmSettings, part: Part = EVERYTHING) -> list[DaemonStatus]:
    supervisor = Supervisor(settings)
    processes = supervisor.processes() if supervisor.running() else {}
    exits = unexpected_exits(settings) if processes else {}
    found = []
    for daemon in daemons(settings, part=part):
        info = processes.get(daemon.name, {})
        healthy, health = _health(daemon.health_url)
        if not healthy and (died := exits.get(daemon.name)):
            health = f"{health}; last exit: {describe_exit(died[-1], daemon.name)}"
        found.append(
            DaemonStatus(
                name=daemon.name,
                state=info.get("statename", "NOT_STARTED"),
                pid=info.get("pid") or None,
                health=health,
                url=daemon.health_url,
            )
        )
    return found


def wait_healthy(
    settings: SwarmSettings,
    timeout: float,
    *,
    since: int | None = None,
    part: Part = EVERYTHING,
) -> None:
    """Poll every daemon's health until all answer 200; else name the first one that kept
    dying (since byte ``since`` of supervisord's log; default: from now) and how, or that
    did not come up in time, with the last lines of its log."""
    since = log_size(settings) if since is None else since
    wanted = daemons(settings, part=part)
    pending = wanted
    deadline = time.monotonic() + timeout
    while True:
        pending = [daemon for daemon in pending if not _health(daemon.health_url)[0]]
        if not pending:
            # supervisord says RUNNING only startsecs after a start: until then `status`
            # would call a daemon that answers STARTING (within the deadline: health is
            # what counts).
            if time.monotonic() > deadline or not _starting(settings, wanted):
                return
            time.sleep(0.25)
            continue
        exits = unexpected_exits(settings, since=since)
        for daemon in pending:
            if len(died := exits.get(daemon.name, ())) >= DEATHS_BEFORE_GIVING_UP:
                raise KeepsDying(_keeps_dying(settings, daemon, died), daemon.name)
        if time.monotonic() > deadline:
            raise SwarmError(_not_healthy(settings, daemon=pending[0], timeout=timeout))
        time.sleep(0.25)


def _starting(settings: SwarmSettings, wanted: list[Daemon]) -> bool:
    supervisor = Supervisor(settings)
    processes = supervisor.processes() if supervisor.running() else {}
    return any(processes.get(d.name, {}).get("statename") == "STARTING" for d in wanted)


REBUILD = "rebuild it for this CPU with .venv/bin/python scripts/engine.py check --rebuild"


def describe_exit(how: str, daemon: str = "") -> str:
    """supervisord's "terminated by SIGILL" or "exit status 2", said for a user."""
    if "SIGILL" in how:
        cause = "the llama.cpp build uses instructions this CPU cannot run"
        return f"killed by SIGILL: {cause}; {REBUILD}"
    said = how.replace("terminated by ", "killed by ", 1)
    if "SIGSEGV" in how and daemon.startswith("modelhost-"):
        # What a -march=native build does here in the AMX kernel of a VM that refuses AMX.
        cause = "llama.cpp crashed; if its build uses instructions this CPU does not allow"
        return f"{said}: {cause}, {REBUILD}"
    return said


def check_ports(settings: SwarmSettings, part: Part = EVERYTHING) -> None:
    """Before a fresh start: a port the profile wants that something else holds."""
    for daemon in daemons(settings, part=part):
        address = urlsplit(daemon.health_url)
        if _listening(address.hostname or "127.0.0.1", address.port or 80):
            raise SwarmError(
                f"port {address.port} ({daemon.name}) is in use by another process: "
                f"stop it, or give {daemon.name} another port in the profile"
            )


def check_models(settings: SwarmSettings, part: Part = EVERYTHING) -> None:
    """An embedded backend of ``part`` whose packaged model is not installed."""
    # Only the catalog: no llama.cpp import for a check.
    from services.modelhost.catalog import ModelUnavailable, lookup, package_dir

    hosted = {daemon.section for daemon in daemons(settings, part=part)}
    for name, backend in settings.backends.items():
        if backend.kind != "embedded" or f"backends.{name}" not in hosted:
            continue
        try:
            package_dir(lookup(backend.model))
        except ModelUnavailable as exc:
            raise SwarmError(f"backend {name!r}: {exc}") from None


def check_external_backends(
    settings: SwarmSettings, say: Callable[[str], None], part: Part = EVERYTHING
) -> None:
    """Warn about an Ollama or OpenAI-compatible server that does not answer, or lacks a
    model a wrapper serves on it. The server is the user's: the swarm starts anyway, those
    wrappers unhealthy."""
    for name, url in external_backends(settings, part).items():
        backend = settings.backends[name]
        what = "Ollama" if backend.kind == "ollama" else "OpenAI-compatible"
        try:
            installed = _served_models(url, backend)
        except (httpx.HTTPError, ValueError):
            say(f"warning: backend {name!r} ({what}) does not answer at {url}")
            continue
        wanted = {
            wrapper.model for wrapper in settings.wrappers.values() if wrapper.backend == name
        }
        listed = ", ".join(sorted(installed)) or "none"
        for model in sorted(wanted):
            if _canonical(model, backend) not in installed:
                fix = f"ollama pull {model}" if backend.kind == "ollama" else f"it lists {listed}"
                say(f"warning: backend {name!r} ({what} at {url}) has no model {model!r}: {fix}")


def _served_models(url: str, backend: BackendConfig) -> set[str]:
    """The model names a server lists: Ollama's ``/api/tags``, OpenAI's ``/models``."""
    from schemas.ollama import ListResponse
    from schemas.openai import ModelList

    if backend.kind == "ollama":
        response = httpx.get(f"{url}/api/tags", timeout=2.0)
        response.raise_for_status()
        listing = ListResponse.model_validate_json(response.content)
        return {_canonical(item.model, backend) for item in listing.models}
    key = os.environ.get(backend.api_key_env or "")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(f"{url}/models", headers=headers, timeout=2.0)
    response.raise_for_status()
    return {item.id for item in ModelList.model_validate_json(response.content).data}


def _canonical(model: str, backend: BackendConfig) -> str:
    # Ollama adds ":latest" to a bare name; an OpenAI server's ids are taken as they are.
    from services.wrapper.backend import canonical_model_name

    return canonical_model_name(model) if backend.kind == "ollama" else model


def _keeps_dying(settings: SwarmSettings, daemon: Daemon, died: list[str]) -> str:
    log = log_path(settings, daemon.name)
    said = ""
    if not died[-1].startswith("terminated by"):  # it exited: its last line says why
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        said = next((f": {line.strip()}" for line in reversed(lines) if line.strip()), "")
    return (
        f"{daemon.name} keeps dying ({len(died)} times since start): "
        f"{describe_exit(died[-1], daemon.name)}{said} (log: {log})"
    )


def _not_healthy(settings: SwarmSettings, daemon: Daemon, timeout: float) -> str:
    log = log_path(settings, daemon.name)
    lines = log.read_text(errors="replace").splitlines()[-LOG_LINES:] if log.exists() else []
    tail = "\n".join(f"  {line}" for line in lines or ["(no log)"])
    return (
        f"{daemon.name} is not healthy after {timeout:g} s ({daemon.health_url})\n"
        f"last lines of {log}:\n{tail}"
    )


def _health(url: str) -> tuple[bool, str]:
    """(healthy, what it said): its ``status`` field, or why there was none."""
    try:
        response = httpx.get(url, timeout=2.0)
    except httpx.HTTPError as exc:
        return False, f"no answer ({type(exc).__name__})"
    try:
        said = response.json().get("status")
    except ValueError:
        said = None
    healthy = response.status_code == 200
    return healthy, str(said or ("healthy" if healthy else f"HTTP {response.status_code}"))


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
