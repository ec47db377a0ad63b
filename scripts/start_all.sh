#!/usr/bin/env bash
# Set up on a fresh machine (once) and run the swarm under supervisord.
# SWARM_CONFIG picks the profile (default config/swarm.yaml). Running it twice is harmless.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_venv ""

PY="$VENV/bin/python"
CONF="$(mktemp)"
STATE="$(PYTHONPATH="$ROOT" "$PY" scripts/supervisor_config.py "$CONF")"
mv "$CONF" "$STATE/supervisord.conf"
CONF="$STATE/supervisord.conf"
CTL=("$VENV/bin/supervisorctl" -c "$CONF")

if "${CTL[@]}" pid >/dev/null 2>&1; then
    echo "==> supervisord already running; applying the current profile"
    "${CTL[@]}" update >/dev/null
    "${CTL[@]}" start all >/dev/null || true
else
    echo "==> starting supervisord (logs in $STATE/logs)"
    "$VENV/bin/supervisord" -c "$CONF"
fi

REGISTRY_URL="$("$PY" -c 'from schemas.config import load_settings; print(load_settings().registry_url)')"
echo "==> waiting for the registry at $REGISTRY_URL"
for _ in $(seq 1 100); do
    if curl -fsS "$REGISTRY_URL/health" >/dev/null 2>&1; then
        echo "registry   $REGISTRY_URL   (docs: $REGISTRY_URL/docs)"
        echo "logs       $STATE/logs"
        echo "stop with  ./scripts/stop_all.sh"
        exit 0
    fi
    sleep 0.2
done
echo "error: the registry did not become healthy in 20 s; last lines of its log:" >&2
tail -n 20 "$STATE/logs/registry.log" >&2 || true
exit 1
