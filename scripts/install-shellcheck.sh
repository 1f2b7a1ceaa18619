#!/usr/bin/env bash
# Install Debian's shellcheck (the tests lint the project's install scripts with it). Idempotent.
set -euo pipefail
if command -v shellcheck >/dev/null 2>&1; then
  echo "install-shellcheck: shellcheck already on PATH ($(command -v shellcheck)): nothing to do" >&2
  exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
echo "install-shellcheck: apt-get install shellcheck" >&2
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends shellcheck >/dev/null
echo "install-shellcheck: installed $(shellcheck --version | sed -n 's/^version: //p')" >&2
