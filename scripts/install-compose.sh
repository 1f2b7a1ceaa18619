#!/usr/bin/env bash
# Build Docker Compose v2 (the standalone `docker-compose`) from the Go module proxy into the
# project-local tool cache, so `docker-compose config` can validate deploy/compose/compose.yaml on
# a machine whose docker client has no compose plugin. No Docker engine is needed for that.
#
#   scripts/install-compose.sh   -> ${TOOLS_BIN:-<repo>/.cache/bin}/docker-compose
#
# `go install` refuses modules with replace directives, so the module source is downloaded from
# the proxy and built in a copy (the module cache is read-only). Idempotent.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMPOSE_VERSION="${COMPOSE_VERSION:-v2.40.3}"
TOOLS_BIN="${TOOLS_BIN:-$REPO/.cache/bin}"
OUT="$TOOLS_BIN/docker-compose"
STAMP="$TOOLS_BIN/.compose-build"

log() { printf 'install-compose: %s\n' "$*" >&2; }

if [[ -x "$OUT" && -f "$STAMP" && "$(cat "$STAMP")" == "$COMPOSE_VERSION" ]]; then
  log "docker-compose $COMPOSE_VERSION already at $OUT"
  exit 0
fi
command -v go >/dev/null 2>&1 || { log "the go toolchain is needed"; exit 1; }

GO_CACHE_DIR="${GO_CACHE_DIR:-$REPO/.cache/go}"
mkdir -p "$TOOLS_BIN" "$GO_CACHE_DIR/path" "$GO_CACHE_DIR/build"
export GOPATH="$GO_CACHE_DIR/path" GOCACHE="$GO_CACHE_DIR/build"
export GOMODCACHE="$GOPATH/pkg/mod" GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"

start=$(date +%s)
log "downloading github.com/docker/compose/v2@$COMPOSE_VERSION from the Go module proxy"
dir="$(go mod download -json "github.com/docker/compose/v2@$COMPOSE_VERSION" \
  | sed -n 's/.*"Dir": "\(.*\)",*$/\1/p')"
[[ -d "$dir" ]] || { log "module download failed"; exit 1; }
work="$(mktemp -d)"
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cp -r "$dir/." "$work/"
chmod -R u+w "$work"
log "building (a few minutes the first time; progress: one line per package)"
(cd "$work" && go build -trimpath -v -ldflags "-s -w -X github.com/docker/compose/v2/internal.Version=$COMPOSE_VERSION" \
  -o "$OUT.tmp" ./cmd 2>&1 | awk 'NR % 50 == 0 { printf "." > "/dev/stderr" } END { print "" > "/dev/stderr" }')
mv "$OUT.tmp" "$OUT"
echo "$COMPOSE_VERSION" > "$STAMP"
log "built $("$OUT" version --short 2>/dev/null || echo "$COMPOSE_VERSION") in $(( $(date +%s) - start ))s -> $OUT"
