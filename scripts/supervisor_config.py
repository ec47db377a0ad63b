"""Write supervisord's config for the daemons of a swarm profile.

Generated from the profile on every start, so the topology lives in one place.
Usage: python scripts/supervisor_config.py OUTPUT_FILE
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from schemas.config import PROJECT_ROOT, SwarmSettings, profile_path
from services.common.server import settings_or_exit


def programs(settings: SwarmSettings) -> dict[str, str]:
    """Program name -> command line, for every daemon that exists so far."""
    python = shlex.quote(sys.executable)
    return {"registry": f"{python} -m registry"}


def render(settings: SwarmSettings) -> str:
    state = settings.state_dir
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
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
logfile={logs}/supervisord.log
pidfile={state}/supervisord.pid
directory={PROJECT_ROOT}
"""
    ]
    for name, command in programs(settings).items():
        sections.append(
            f"""[program:{name}]
command={command}
directory={PROJECT_ROOT}
environment={env}
autorestart=true
startsecs=2
stopsignal=TERM
stopwaitsecs=15
redirect_stderr=true
stdout_logfile={logs}/{name}.log
stdout_logfile_maxbytes=10MB
stdout_logfile_backups=3
"""
        )
    return "\n".join(sections)


def main() -> None:
    settings = settings_or_exit("start_all")
    Path(sys.argv[1]).write_text(render(settings))
    print(settings.state_dir)


if __name__ == "__main__":
    main()
