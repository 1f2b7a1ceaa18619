#!/usr/bin/env bash
# Install Prometheus and promtool from Debian's "prometheus" package, if promtool is missing.
#
# Idempotent: does nothing when promtool is already on PATH. Never leaves a Prometheus system
# service running: service starts are blocked with policy-rc.d during the install, and any
# instance that started anyway is stopped afterwards. Needs root (or sudo) and a Debian/Ubuntu
# host with apt-get. Used by CI and by the observability tests on a fresh machine.
set -euo pipefail

log() { printf 'install-prometheus: %s\n' "$*"; }

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    log "promtool already on PATH ($(command -v promtool)): nothing to do"
    promtool --version 2>&1 | head -n 1
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    log "promtool is missing and apt-get is not available: install Prometheus by hand" >&2
    exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        log "must run as root (or with sudo available) to install packages" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
POLICY=/usr/sbin/policy-rc.d
policy_created=0

cleanup() {
    if [ "$policy_created" -eq 1 ]; then
        log "removing temporary $POLICY"
        "${SUDO[@]}" rm -f "$POLICY"
    fi
}
trap cleanup EXIT

if [ ! -e "$POLICY" ]; then
    log "blocking service starts during the install with $POLICY (exit 101)"
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 0755 "$POLICY"
    policy_created=1
else
    log "$POLICY already exists: leaving it as is"
fi

log "apt-get update"
"${SUDO[@]}" apt-get update -q
log "apt-get install --no-install-recommends prometheus"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends prometheus

# Belt and braces: stop and disable a service that started despite policy-rc.d.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    if systemctl is-active --quiet prometheus 2>/dev/null; then
        log "stopping the prometheus systemd service"
        "${SUDO[@]}" systemctl stop prometheus || true
    fi
    "${SUDO[@]}" systemctl disable prometheus >/dev/null 2>&1 || true
fi
if [ -x /etc/init.d/prometheus ]; then
    "${SUDO[@]}" /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi

if ! command -v promtool >/dev/null 2>&1; then
    log "install finished but promtool is not on PATH" >&2
    exit 1
fi
log "installed: $(command -v prometheus), $(command -v promtool)"
promtool --version 2>&1 | head -n 1
