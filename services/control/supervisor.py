"""supervisord: its config, generated from the profile on every start (one source of
truth), and a client for its XML-RPC interface on the state directory's unix socket."""

from __future__ import annotations

import http.client
import os
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


def socket_path(settings: SwarmSettings) -> Path:
    return settings.state_dir / "supervisor.sock"


def pid_path(settings: SwarmSettings) -> Path:
    return settings.state_dir / "supervisord.pid"


def config_path(settings: SwarmSettings) -> Path:
    return settings.state_dir / "supervisord.conf"


def render_config(settings: SwarmSettings, daemons: list[Daemon]) -> str:
    state = settings.state_dir
    (state / "logs").mkdir(parents=True, exist_ok=True)
    env = f'SWARM_CONFIG="{profile_path().resolve()}",PYTHONUNBUFFERED="1"'
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

    def processes(self) -> dict[str, dict]:
        """Each program's state (``statename``, ``pid``, ``description``...) by name."""
        return {info["name"]: info for info in self.rpc.getAllProcessInfo()}

    def stop(self, names: list[str]) -> None:
        for name in names:
            self.rpc.stopProcess(name)

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
