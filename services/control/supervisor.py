"""supervisord: its config, generated from the profile on every start (one source of
truth), and a client for its XML-RPC interface on the state directory's unix socket."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shlex
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

from schemas.config import PROJECT_ROOT, SwarmSettings, profile_path
from services.control.daemons import Daemon


def log_path(settings: SwarmSettings, daemon: str) -> Path:
    return settings.state_dir / "logs" / f"{daemon}.log"


def supervisord_log_path(settings: SwarmSettings) -> Path:
    return settings.state_dir / "logs" / "supervisord.log"


def log_size(settings: SwarmSettings) -> int:
    """Where supervisord's log ends now: read :func:`unexpected_exits` from here on."""
    try:
        return supervisord_log_path(settings).stat().st_size
    except FileNotFoundError:
        return 0


# supervisord logs each death it did not ask for as
# "exited: NAME (terminated by SIGILL (core dumped); not expected)" or "(exit status 2; ...)".
_UNEXPECTED_EXIT = re.compile(r" exited: (?P<name>\S+) \((?P<how>.+); not expected\)$")
_STARTED = " supervisord started with pid "
_LOG_TAIL_BYTES = 1 << 20


def unexpected_exits(settings: SwarmSettings, *, since: int | None = None) -> dict[str, list[str]]:
    """How each program died unexpectedly, oldest first ("terminated by SIGILL", "exit
    status 2"), from supervisord's log: after byte ``since``, else since supervisord's
    last start. supervisord knows it only as a log line; its XML-RPC keeps no signal."""
    path = supervisord_log_path(settings)
    try:
        with path.open("rb") as file:
            start = since if since is not None else max(0, log_size(settings) - _LOG_TAIL_BYTES)
            file.seek(start)
            text = file.read().decode(errors="replace")
    except FileNotFoundError:
        return {}
    if since is None and (started := text.rfind(_STARTED)) >= 0:
        text = text[started:]
    exits: dict[str, list[str]] = {}
    for line in text.splitlines():
        if match := _UNEXPECTED_EXIT.search(line):
            exits.setdefault(match["name"], []).append(match["how"])
    return exits


def socket_path(settings: SwarmSettings) -> Path:
    return settings.state_dir / "supervisor.sock"


def pid_path(settings: SwarmSettings) -> Path:
    return settings.state_dir / "supervisord.pid"


def config_path(settings: SwarmSettings) -> Path:
    return settings.state_dir / "supervisord.conf"


def render_config(
    settings: SwarmSettings, daemons: list[Daemon], *, token_file: Path | None = None
) -> str:
    """The config for ``daemons``; ``token_file``, the swarm token's file, goes to each by
    its path (SWARM_REGISTRY_TOKEN_FILE): the token itself is never written here."""
    state = settings.state_dir
    (state / "logs").mkdir(parents=True, exist_ok=True)
    env = f'SWARM_CONFIG="{profile_path().resolve()}",PYTHONUNBUFFERED="1"'
    if token_file is not None:
        env += f',SWARM_REGISTRY_TOKEN_FILE="{token_file.resolve()}"'
    sections = [
        f"""[unix_http_server]
file={socket_path(settings)}
chmod=0700

[supervisorctl]
serverurl=unix://{socket_path(settings)}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisord]
logfile={state}/logs/supervisord.log
pidfile={pid_path(settings)}
directory={PROJECT_ROOT}
"""
    ]
    for daemon in daemons:
        sections.append(
            f"""[program:{daemon.name}]
command={shlex.join(daemon.argv)}
directory={PROJECT_ROOT}
environment={env}
priority={daemon.priority}
autorestart=true
startsecs=2
stopsignal=TERM
stopwaitsecs=15
redirect_stderr=true
stdout_logfile={log_path(settings, daemon.name)}
stdout_logfile_maxbytes=10MB
stdout_logfile_backups=3
"""
        )
    return "\n".join(sections)


class Supervisor:
    """supervisord of one state directory, through its XML-RPC interface."""

    def __init__(self, settings: SwarmSettings) -> None:
        self.settings = settings
        self.rpc = self._connect()

    def _connect(self):
        transport = SupervisorTransport(None, None, f"unix://{socket_path(self.settings)}")
        # The host is ignored: the transport talks to the unix socket.
        return xmlrpc.client.ServerProxy("http://localhost", transport=transport).supervisor

    def running(self) -> bool:
        # A new connection each time: one that failed cannot send again.
        try:
            return self._connect().getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error, http.client.HTTPException):
            return False

    def start(self, *, timeout: float = 30.0) -> None:
        """Start supervisord (it daemonizes) with the config written for this profile."""
        conf = config_path(self.settings)
        subprocess.run([sys.executable, "-m", "supervisor.supervisord", "-c", conf], check=True)
        deadline = time.monotonic() + timeout
        while not self.running():
            if time.monotonic() > deadline:
                raise TimeoutError(f"supervisord did not answer on {socket_path(self.settings)}")
            time.sleep(0.1)

    def update(self) -> None:
        """Apply a rewritten config, as ``supervisorctl update`` does: programs that
        changed restart, new ones start, removed ones stop."""
        added, changed, removed = self.rpc.reloadConfig()[0]
        for name in removed + changed:
            self.rpc.stopProcessGroup(name)
            self.rpc.removeProcessGroup(name)
        for name in changed + added:
            self.rpc.addProcessGroup(name)
        self.rpc.startAllProcesses()

    def restart_all(self) -> None:
        """Stop every program, then start them again in priority order."""
        self.rpc.stopAllProcesses()
        self.rpc.startAllProcesses()

    def processes(self) -> dict[str, dict]:
        """Each program's state (``statename``, ``pid``, ``description``...) by name."""
        return {info["name"]: info for info in self.rpc.getAllProcessInfo()}

    def stop(self, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(xmlrpc.client.Fault):  # it is not running: nothing to do
                self.rpc.stopProcess(name)

    def keep_stopped(self, name: str, *, timeout: float = 10.0) -> None:
        """Stop ``name`` for good: one caught between a death and its restart would
        otherwise be restarted by ``autorestart``."""
        deadline = time.monotonic() + timeout
        while self.processes()[name]["statename"] not in ("STOPPED", "FATAL"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"supervisord did not stop {name} in {timeout:g} s")
            self.stop([name])
            time.sleep(0.1)

    def shutdown(self, *, timeout: float = 60.0) -> None:
        """Stop every program and supervisord itself; return once its process is gone."""
        pid = self.rpc.getPID()
        self.rpc.stopAllProcesses()
        self.rpc.shutdown()
        deadline = time.monotonic() + timeout
        while process_alive(pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"supervisord (pid {pid}) did not exit in {timeout:g} s")
            time.sleep(0.1)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
