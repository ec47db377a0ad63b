"""``python -m registry [--host HOST] [--port PORT]``"""

from __future__ import annotations

import argparse

from registry.app import create_app
from registry.settings import RegistrySettings
from services.common.server import serve, settings_or_exit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m registry", description=__doc__)
    parser.add_argument("--host", help="address to bind (default from the profile: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default from the profile: 6121)")
    args = parser.parse_args(argv)
    swarm = settings_or_exit("registry")
    settings = RegistrySettings.from_swarm(swarm, host=args.host, port=args.port)
    serve(create_app(settings), swarm, host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
