"""Running a daemon: settings or one clear line, logging, uvicorn."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import uvicorn

from schemas.config import ConfigError, SwarmSettings, load_settings
from services.common.context import current_request_id


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id() or "-"
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def settings_or_exit(service: str, path: Path | None = None) -> SwarmSettings:
    """Load the profile; on a bad value print one line naming the key and exit 2."""
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def serve(app, *, host: str, port: int, log_level: str) -> None:
    configure_logging(log_level)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
