"""``python -m services.modelhost (--model NAME | --backend NAME [--replica N]) [--host H]
[--port P] [--check]``

``--check`` loads the model, runs the warm-up decode and exits: 0 and one line of speeds
when the engine works on this machine (``scripts/engine.py check`` runs it).
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from schemas.config import ConfigError
from schemas.errors import describe_validation_errors
from services.common.server import serve, settings_or_exit
from services.modelhost.app import create_app
from services.modelhost.catalog import CATALOG, ModelUnavailable, lookup, package_dir
from services.modelhost.engine import describe_speed, load_engine
from services.modelhost.settings import ModelHostSettings


def _exit(message: str) -> None:
    print(f"modelhost: {message}", file=sys.stderr)
    raise SystemExit(2)


def check(settings: ModelHostSettings) -> None:
    engine = load_engine(settings)
    try:
        print(f"{settings.model}: {describe_speed(engine.warmed_up)}")
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.modelhost", description=__doc__)
    parser.add_argument("--model", help=f"a packaged model: {', '.join(sorted(CATALOG))}")
    parser.add_argument("--backend", help="take model, host, port, ... from backends.NAME")
    parser.add_argument(
        "--replica",
        type=int,
        default=1,
        help="with --backend: which of its model hosts (1..its wrappers' replicas; default 1), "
        "on the backend's port + N - 1",
    )
    parser.add_argument("--host", help="address to bind (default from the profile: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default 11434)")
    parser.add_argument("--context-length", type=int, help="context to load (default 2048)")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores)")
    parser.add_argument(
        "--max-pending",
        type=int,
        help="generations admitted at once, running and queued, before a 503 (default 64)",
    )
    parser.add_argument(
        "--no-prompt-cache",
        dest="prompt_cache",
        action="store_false",
        default=None,
        help="evaluate every prompt whole, keeping nothing of the last one",
    )
    parser.add_argument(
        "--check", action="store_true", help="load, decode a 128-token prompt, print, exit"
    )
    args = parser.parse_args(argv)
    if not args.model and not args.backend:
        parser.error("give --model NAME or --backend NAME")
    swarm = settings_or_exit("modelhost")
    try:
        settings = ModelHostSettings.from_swarm(
            swarm,
            backend=args.backend,
            replica=args.replica,
            model=args.model,
            host=args.host,
            port=args.port,
            context_length=args.context_length,
            threads=args.threads,
            max_pending=args.max_pending,
            prompt_cache=args.prompt_cache,
        )
        package_dir(lookup(settings.model))  # fail here, in one line, not in the lifespan
    except ConfigError as exc:
        _exit(str(exc))
    except ValidationError as exc:
        _exit(describe_validation_errors(exc.errors()))
    except ModelUnavailable as exc:
        _exit(str(exc))
    if args.check:
        check(settings)
        return
    serve(create_app(settings), swarm, host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
