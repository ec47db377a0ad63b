#!/usr/bin/env bash
# Set everything up on a fresh machine and run the whole suite: lint, format, tests.
# Extra arguments go to pytest (./scripts/test.sh -k registry -x).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_venv dev

echo "==> ruff check"
"$VENV/bin/ruff" check .
echo "==> ruff format --check"
"$VENV/bin/ruff" format --check .
echo "==> pytest"
"$VENV/bin/python" -m pytest "$@"
