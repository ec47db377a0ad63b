"""``python -m router [--host H] [--port P]``: the provider router of the profile."""

from __future__ import annotations

import argparse

from router.app import create_app
from router.settings import RouterSettings
from services.common.server import serve, settings_or_exit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m router", description=__doc__)
    parser.add_argument("--host", help="address to bind (default from the profile)")
    parser.add_argument("--port", type=int, help="port to bind (default 6103)")
    args = parser.parse_args(argv)
    swarm = settings_or_exit("router")
    settings = RouterSettings.from_swarm(swarm, host=args.host, port=args.port)
    serve(create_app(settings), swarm, host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
