"""``python -m services.wrapper NAME [--replica N] [--host HOST] [--port PORT]``
(or ``python -m services``)."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from schemas.config import ConfigError
from schemas.errors import describe_validation_errors
from services.common.server import serve, settings_or_exit
from services.wrapper.app import create_app
from services.wrapper.settings import WrapperSettings


def main(argv: list[str] | None = None, prog: str = "python -m services") -> None:
    parser = argparse.ArgumentParser(prog=prog, description="Run one model wrapper of the profile.")
    parser.add_argument("name", help="the wrapper's name in the profile (wrappers.NAME)")
    parser.add_argument("--host", help="address to bind (default from the profile)")
    parser.add_argument("--port", type=int, help="port to bind (default from the profile)")
    parser.add_argument(
        "--replica",
        type=int,
        default=1,
        help="which of the entry's replicas to run (1..replicas; default 1): its port is the "
        "entry's port + N - 1, its agent_id agent_id-N",
    )
    args = parser.parse_args(argv)
    swarm = settings_or_exit(f"wrapper {args.name}")
    if args.name not in swarm.wrappers:
        known = ", ".join(sorted(swarm.wrappers)) or "none"
        print(f"wrapper: no wrappers.{args.name} in the profile (known: {known})", file=sys.stderr)
        raise SystemExit(2)
    try:
        settings = WrapperSettings.from_swarm(
            swarm, args.name, args.replica, host=args.host, port=args.port
        )
    except ConfigError as exc:
        print(f"wrapper {args.name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValidationError as exc:
        problem = describe_validation_errors(exc.errors())
        print(f"wrapper {args.name}: wrappers.{args.name}: {problem}", file=sys.stderr)
        raise SystemExit(2) from None
    app = create_app(settings)
    # httpx logs every backend call at INFO: noise on each model call, and CPU on the hop.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    serve(app, swarm, host=settings.host, port=settings.port)


if __name__ == "__main__":
    main(prog="python -m services.wrapper")
