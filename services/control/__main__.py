"""``python -m services.control config OUTPUT | wait [--timeout S]`` for the start script."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx

from services.common.server import settings_or_exit
from services.control.daemons import daemons, external_backends
from services.control.supervisor import log_path, render_config


def write_config(output: Path) -> int:
    settings = settings_or_exit("start_all")
    output.write_text(render_config(settings, daemons(settings)))
    print(settings.state_dir)
    return 0


def wait_healthy(timeout: float) -> int:
    """Poll every daemon's health until all answer 200; name the first one that did not."""
    settings = settings_or_exit("start_all")
    for name, url in external_backends(settings).items():
        if not _answers(f"{url}/api/version"):
            print(f"warning: backend {name!r} (Ollama) does not answer at {url}", file=sys.stderr)
    pending = daemons(settings)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = [daemon for daemon in pending if not _answers(daemon.health_url)]
        if pending:
            time.sleep(0.25)
    if not pending:
        return 0
    late = pending[0]
    print(f"error: {late.name} is not healthy after {timeout:g} s ({late.health_url})")
    print(f"last lines of {log_path(settings, late.name)}:")
    log = log_path(settings, late.name)
    lines = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else ["(no log)"]
    print("\n".join(f"  {line}" for line in lines))
    return 1


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.control")
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="write supervisord's config for the profile")
    config.add_argument("output", type=Path)
    wait = commands.add_parser("wait", help="wait until every daemon is healthy")
    wait.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    if args.command == "config":
        return write_config(args.output)
    return wait_healthy(args.timeout)


if __name__ == "__main__":
    sys.exit(main())
