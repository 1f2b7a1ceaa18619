#!/usr/bin/env bash
# Build a local Debian bookworm + Python 3.11 base image from Debian's packages, for machines that
# cannot pull the Dockerfile's default base (python:3.11-slim-bookworm) from a registry.
#
#   scripts/build-base-image.sh            -> prints the image name, e.g.
#                                             localhost/device-rebind-base:bookworm-py3.11
#
# mmdebstrap writes a minimal root filesystem (minbase: dpkg, apt, coreutils, passwd for useradd)
# with python3, python3-venv and ca-certificates, using this machine's apt sources; buildah
# imports it into the local containers storage as a one-layer image. Needs root, mmdebstrap and
# buildah (apt-get install mmdebstrap buildah: scripts/build-image.sh installs them when missing).
#
# Cached: the root filesystem under ${BASE_IMAGE_CACHE:-<repo>/.cache/base-image} (with the recipe
# it was built from), the image in the containers storage. A second run does nothing; a run after
# the storage was wiped re-imports the cached tarball (seconds); a changed recipe rebuilds (about
# 30 s to 2 min, depending on the mirror). FORCE=1 rebuilds anyway.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUITE="${BASE_SUITE:-bookworm}"
PACKAGES="python3,python3-venv,ca-certificates"
IMAGE="${BASE_IMAGE:-localhost/device-rebind-base:${SUITE}-py3.11}"
CACHE="${BASE_IMAGE_CACHE:-$REPO/.cache/base-image}"
TARBALL="$CACHE/rootfs.tar"
# Whatever changes the root filesystem changes the recipe.
RECIPE="suite=$SUITE variant=minbase packages=$PACKAGES excludes=doc,man,locale,info recipe=1"

log() { printf 'build-base-image: %s\n' "$*" >&2; }

for tool in mmdebstrap buildah; do
  command -v "$tool" >/dev/null 2>&1 || { log "$tool is needed (apt-get install $tool)"; exit 1; }
done
mkdir -p "$CACHE"

recipe_label() {
  buildah inspect --type image --format '{{index .ImageAnnotations "org.device-rebind.base-recipe"}}' \
    "$IMAGE" 2>/dev/null || true
}

if [[ "${FORCE:-0}" != 1 && "$(recipe_label)" == "$RECIPE" ]]; then
  log "$IMAGE is up to date"
  echo "$IMAGE"
  exit 0
fi

if [[ "${FORCE:-0}" == 1 || ! -f "$TARBALL" || "$(cat "$CACHE/recipe" 2>/dev/null)" != "$RECIPE" ]]; then
  log "mmdebstrap $SUITE ($PACKAGES) from this machine's apt sources"
  start=$(date +%s)
  rm -rf "$TARBALL.tmp" "$CACHE/recipe"
  mmdebstrap --quiet --variant=minbase --format=tar --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --aptopt='Acquire::Retries "3"' \
    "$SUITE" "$TARBALL.tmp"
  mv "$TARBALL.tmp" "$TARBALL"
  echo "$RECIPE" > "$CACHE/recipe"
  log "root filesystem built in $(( $(date +%s) - start )) s ($(du -h "$TARBALL" | cut -f1))"
fi

log "importing $TARBALL as $IMAGE"
container="$(buildah from scratch)"
trap 'buildah rm "$container" >/dev/null 2>&1 || true' EXIT
buildah add --quiet "$container" "$TARBALL" / >/dev/null
buildah config \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 \
  --cmd '["python3"]' \
  --annotation "org.device-rebind.base-recipe=$RECIPE" \
  --label "org.opencontainers.image.description=Debian $SUITE minbase with python3 (local base of device-rebind)" \
  "$container"
buildah commit --quiet --rm "$container" "$IMAGE" >/dev/null
trap - EXIT
log "$IMAGE ready"
echo "$IMAGE"
