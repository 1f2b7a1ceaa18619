#!/usr/bin/env bash
# Install device-rebind into a virtual environment, from the pinned lock. Used by the Dockerfile
# (build stage) and by tests/deploy/test_docker.py, so the image's install steps are tested
# without a Docker engine.
#
#   scripts/install-app.sh [--deps-only | --app-only] <venv-dir> [<wheel-or-source-dir>]
#
#   --deps-only  create the venv and install requirements/runtime.lock (a cacheable image layer)
#   --app-only   install the package itself into an existing venv
#   (neither)    both
#
# Every dependency comes from the lock with --no-deps and --require-hashes: nothing unpinned or
# altered can slip in. The package is installed with --no-deps too, so its own (looser)
# requirements never re-resolve the lock. Offline builds set PIP_NO_INDEX=1 and PIP_FIND_LINKS to
# a wheelhouse (scripts/build-image.sh does).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mode=all
case "${1:-}" in
  --deps-only) mode=deps; shift ;;
  --app-only) mode=app; shift ;;
esac
if [[ $# -lt 1 ]]; then
  echo "usage: $0 [--deps-only | --app-only] <venv-dir> [<wheel-or-source-dir>]" >&2
  exit 2
fi
VENV="$1"
APP="${2:-$REPO}"
LOCK="${LOCK:-$REPO/requirements/runtime.lock}"
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ $mode != app ]]; then
  # Refuse a lock with anything but exact pins ("name==version") and their hashes (comments and
  # blank lines aside); pip's --require-hashes then refuses a pin without a matching hash.
  unpinned="$(grep -Ev '^[[:space:]]*(#|$)' "$LOCK" \
    | grep -Ev '^[[:space:]]+--hash=sha256:[0-9a-f]{64}([[:space:]]+\\)?$' \
    | grep -Ev '^[A-Za-z0-9._-]+(\[[^]]*\])?==[^ =]+([[:space:]]*;.*)?([[:space:]]+\\)?$' || true)"
  if [[ -n $unpinned ]]; then
    echo "install-app: $LOCK has entries that are not exact pins:" >&2
    echo "$unpinned" >&2
    exit 1
  fi
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --no-deps --require-virtualenv --require-hashes \
    --only-binary=:all: -r "$LOCK"
fi

if [[ $mode != deps ]]; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "install-app: $VENV is not a virtual environment (run with --deps-only first)" >&2
    exit 1
  fi
  "$VENV/bin/python" -m pip install --no-deps --require-virtualenv "$APP"
  # The lock must satisfy the package's own requirements.
  "$VENV/bin/python" -m pip check
fi
