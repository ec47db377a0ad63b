"""supervisord's config, generated from the profile on every start (one source of truth)."""

from __future__ import annotations

import shlex
from pathlib import Path

from schemas.config import PROJECT_ROOT, SwarmSettings, profile_path
from services.control.daemons import Daemon


def log_path(settings: SwarmSettings, daemon: str) -> Path:
    return settings.state_dir / "logs" / f"{daemon}.log"


def render_config(settings: SwarmSettings, daemons: list[Daemon]) -> str:
    state = settings.state_dir
    (state / "logs").mkdir(parents=True, exist_ok=True)
    env = f'SWARM_CONFIG="{profile_path().resolve()}",PYTHONUNBUFFERED="1"'
    sections = [
        f"""[unix_http_server]
file={state}/supervisor.sock
chmod=0700

[supervisorctl]
serverurl=unix://{state}/supervisor.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisord]
logfile={state}/logs/supervisord.log
pidfile={state}/supervisord.pid
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
