# Sourced by scripts/demo and scripts/test: find Python 3.11+, create .venv if missing, and
# install the project (with the extras named in $KEYSTONE_EXTRAS) when pyproject.toml changed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if [ ! -x .venv/bin/python ]; then
  py=""
  for cand in python3.13 python3.12 python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 &&
      "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      py="$cand"
      break
    fi
  done
  if [ -z "$py" ]; then
    echo "Keystone needs Python 3.11 or newer (python3 --version says: $(python3 --version 2>&1))." >&2
    exit 2
  fi
  echo "creating .venv with $py" >&2
  "$py" -m venv .venv
fi
extras="${KEYSTONE_EXTRAS:-}"
stamp=".venv/.keystone-installed${extras:+-$extras}"
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing keystone${extras:+[$extras]} into .venv" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
  echo "$want" >"$stamp"
fi
