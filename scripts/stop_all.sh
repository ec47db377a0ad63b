#!/usr/bin/env bash
# Stop every daemon of the swarm and supervisord itself.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
STATE="$("$VENV/bin/python" -c 'from schemas.config import load_settings; print(load_settings().state_dir)')"
CONF="$STATE/supervisord.conf"
if [ -f "$CONF" ] && "$VENV/bin/supervisorctl" -c "$CONF" pid >/dev/null 2>&1; then
    "$VENV/bin/supervisorctl" -c "$CONF" stop all
    "$VENV/bin/supervisorctl" -c "$CONF" shutdown
else
    echo "the swarm is not running"
fi
