#!/usr/bin/env bash
# Stop every daemon of the swarm and supervisord itself.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
STATE="$("$VENV/bin/python" -c 'from schemas.config import load_settings; print(load_settings().state_dir)')"
CONF="$STATE/supervisord.conf"
CTL=("$VENV/bin/supervisorctl" -c "$CONF")
if [ -f "$CONF" ] && "${CTL[@]}" pid >/dev/null 2>&1; then
    # Wrappers first, while the registry can still take their deregistration.
    mapfile -t wrappers < <("${CTL[@]}" status | awk '/^wrapper-/ {print $1}')
    [ "${#wrappers[@]}" -gt 0 ] && "${CTL[@]}" stop "${wrappers[@]}"
    "${CTL[@]}" stop all
    "${CTL[@]}" shutdown
else
    echo "the swarm is not running"
fi
