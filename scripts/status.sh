#!/usr/bin/env bash
# Each daemon's process state (supervisord) and health (its /health). Exit 1 unless all
# are running and healthy. --json for scripts.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
exec "$VENV/bin/python" -m services.control status "$@"
