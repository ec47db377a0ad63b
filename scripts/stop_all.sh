#!/usr/bin/env bash
# Stop every daemon of the swarm (wrappers first, so they deregister) and supervisord.
# Arguments go to `swarm down` (--role, --host: as given to start_all.sh).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
exec "$VENV/bin/python" -m services.control down "$@"
