#!/usr/bin/env bash
# Build the helm CLI from the Go module proxy into a project-local cache (no prebuilt downloads).
#
#   scripts/install-helm.sh            -> ${TOOLS_BIN:-<repo>/.cache/bin}/helm
#   HELM_VERSION=v3.19.0 scripts/install-helm.sh
#   TOOLS_BIN=/opt/tools GO_CACHE_DIR=/var/cache/go scripts/install-helm.sh
#
# Idempotent: does nothing when the wanted version is already there. The first build takes
# several minutes (it compiles helm and the Kubernetes client libraries); GOPATH and GOCACHE live
# under <repo>/.cache/go so a second build, or a build of another version, is mostly cached.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
TOOLS_BIN="${TOOLS_BIN:-$REPO/.cache/bin}"
HELM="$TOOLS_BIN/helm"

log() { printf 'install-helm: %s\n' "$*" >&2; }

STAMP="$TOOLS_BIN/.helm-build"
# The stamp records what was built (version + ldflags recipe) so a changed recipe rebuilds.
RECIPE="helm $HELM_VERSION recipe 2"

if [[ -x "$HELM" && -f "$STAMP" && "$(cat "$STAMP")" == "$RECIPE" ]] \
  && "$HELM" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
  log "helm $HELM_VERSION already at $HELM"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  log "the go toolchain is needed to build helm (apt-get install golang-go, or a Go >= 1.24)"
  exit 1
fi

GO_CACHE_DIR="${GO_CACHE_DIR:-$REPO/.cache/go}"
mkdir -p "$TOOLS_BIN" "$GO_CACHE_DIR/path" "$GO_CACHE_DIR/build"
export GOPATH="$GO_CACHE_DIR/path"
export GOCACHE="$GO_CACHE_DIR/build"
export GOMODCACHE="$GOPATH/pkg/mod"
export GOBIN="$TOOLS_BIN"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"

BUILD_LOG="$GO_CACHE_DIR/helm-build.log"
start=$(date +%s)
log "resolving helm.sh/helm/v3@$HELM_VERSION from the Go module proxy"
# Like helm's Makefile: the default Kubernetes version of `helm template`/`lint` (Capabilities)
# comes from the client-go it is built with; without these ldflags it would be v1.20.
gomod="$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*$/\1/p')"
client_go="$(awk '$1 == "k8s.io/client-go" { print $2 }' "$gomod")"
k8s_minor="$(echo "$client_go" | cut -d. -f2)"
k8s_major=$(( $(echo "${client_go#v}" | cut -d. -f1) + 1 ))
log "client-go $client_go -> default Kubernetes version v$k8s_major.$k8s_minor"
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags+=" -X $pkg.k8sVersionMajor=$k8s_major -X $pkg.k8sVersionMinor=$k8s_minor"
done
log "building helm.sh/helm/v3/cmd/helm@$HELM_VERSION with $(go version | cut -d' ' -f3) (takes a few minutes the first time)"
# -v prints each package as it is compiled: progress for a long first build.
go install -v \
  -trimpath -ldflags "$ldflags" \
  "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" 2>&1 \
  | tee "$BUILD_LOG" \
  | awk '{ n++; if (n % 50 == 0) { printf "install-helm: %d packages compiled (%s)\n", n, $0; fflush() } }' >&2
status=${PIPESTATUS[0]}
if [[ $status -ne 0 ]]; then
  tail -n 40 "$BUILD_LOG" >&2
  log "go install failed with status $status (full log: $BUILD_LOG)"
  exit "$status"
fi
echo "$RECIPE" > "$STAMP"
log "built $("$HELM" version --short) in $(( $(date +%s) - start ))s -> $HELM"
