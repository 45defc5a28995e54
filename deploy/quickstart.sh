#!/usr/bin/env bash
# Run siterecovery on embedded defaults: SQLite catalog + local-folder vault in ./siterecovery-data.
# Usage: bash deploy/quickstart.sh [extra 'siterecovery serve' options]
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if [ ! -x .venv/bin/python ]; then
  if ! python3 -m venv .venv 2>/dev/null; then
    rm -rf .venv
    echo "quickstart: installing python3-venv" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e . 2>&1 \
  | grep -v -e '^WARNING: Location' -e '^ *$' || true
exec .venv/bin/siterecovery serve --data-dir "${SITERECOVERY_DATA_DIR:-$PWD/siterecovery-data}" "$@"
