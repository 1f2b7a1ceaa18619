#!/usr/bin/env bash
# Build the real Dockerfile into a local image without a Docker engine (`make image`).
#
#   scripts/build-image.sh      -> the image localhost/device-rebind:<version> in the containers
#                                  storage; prints its name and size on the last two lines
#
#   1. buildah and mmdebstrap from Debian's packages when missing (root only);
#   2. the base image: $PYTHON_IMAGE if given (e.g. python:3.11-slim-bookworm where a registry can
#      be reached), else the local Debian base of scripts/build-base-image.sh;
#   3. a wheelhouse of requirements/runtime.lock (hash-checked) plus the build backend, downloaded
#      on this machine into .cache/wheels, so the build itself needs no network: it is mounted
#      read-only into the RUN steps and pip is told PIP_NO_INDEX=1, PIP_FIND_LINKS=/wheels;
#   4. buildah bud --isolation chroot --layers (cached layers: a rebuild after a code change
#      redoes only the project's own layer), docker format so HEALTHCHECK is kept.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)"
IMAGE="${IMAGE:-localhost/device-rebind:$VERSION}"
WHEELS="${WHEELS_DIR:-$REPO/.cache/wheels}"
PIP="${PIP:-python3 -m pip}"

log() { printf 'build-image: %s\n' "$*" >&2; }

missing=()
command -v buildah >/dev/null 2>&1 || missing+=(buildah)
if [[ -z "${PYTHON_IMAGE:-}" ]] && ! command -v mmdebstrap >/dev/null 2>&1; then
  missing+=(mmdebstrap)
fi
if (( ${#missing[@]} )); then
  if [[ $(id -u) -ne 0 ]]; then
    log "needs ${missing[*]} (apt-get install ${missing[*]})"
    exit 1
  fi
  log "installing ${missing[*]} from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi

base="${PYTHON_IMAGE:-$(bash "$REPO/scripts/build-base-image.sh")}"

# The wheelhouse: the lock's wheels (pip checks their hashes) and the build backend.
stamp="$WHEELS/.lock-sha256"
want="$(sha256sum requirements/runtime.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  log "downloading the locked wheels into $WHEELS"
  rm -rf "$WHEELS"
  mkdir -p "$WHEELS"
  $PIP download --quiet --no-deps --require-hashes --only-binary=:all: \
    --python-version 3.11 --implementation cp --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform linux_x86_64 \
    -r requirements/runtime.lock -d "$WHEELS"
  backend="$(sed -n 's/^requires = \[\(.*\)\]/\1/p' pyproject.toml | tr -d '"' | tr ',' ' ')"
  # shellcheck disable=SC2086 # one argument per requirement
  $PIP download --quiet --only-binary=:all: -d "$WHEELS" $backend
  echo "$want" > "$stamp"
fi

log "building $IMAGE on $base"
start=$(date +%s)
buildah bud --isolation chroot --layers --format docker --quiet \
  --build-arg "PYTHON_IMAGE=$base" \
  --build-arg PIP_NO_INDEX=1 \
  --build-arg PIP_FIND_LINKS=/wheels \
  --volume "$WHEELS:/wheels:ro" \
  --tag "$IMAGE" \
  -f Dockerfile . >/dev/null
log "built in $(( $(date +%s) - start )) s"
size="$(buildah images --format '{{.Size}}' "$IMAGE" | head -n 1)"
echo "$IMAGE"
echo "size: $size"
