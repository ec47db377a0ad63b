#!/usr/bin/env bash
# Stop every daemon of the swarm (wrappers first, so they deregister) and supervisord.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
exec "$VENV/bin/python" -m services.control down
