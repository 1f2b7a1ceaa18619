# syntax=docker/dockerfile:1
# device-rebind container image.
#
#   docker build -t device-rebind:0.1.0 .
#   docker run --rm -e REBIND_PLATFORM__BASE_URL=... device-rebind:0.1.0 check-config
#   make image    (no Docker engine: buildah, on a local Debian base; see docs/deploying.md)
#
# Two stages on the same Python base (the venv's interpreter path must match):
#   build:   a venv at /opt/venv with the locked, hash-checked dependencies (own layer, rebuilt
#            only when requirements/runtime.lock changes), then the project's wheel on top.
#   runtime: the venv only; no pip cache, no compilers, no source tree; numeric non-root user.
# The install steps live in scripts/install-app.sh, which tests/deploy runs outside Docker too.
#
# PYTHON_IMAGE: any Debian-based image with python3 (>= 3.11) and its venv module. The default is
# the official slim image; scripts/build-base-image.sh builds a local equivalent from Debian's
# packages for machines that cannot pull it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Offline builds (make image) pass PIP_NO_INDEX=1 and PIP_FIND_LINKS=<a mounted wheelhouse>;
# unset, pip uses its index as usual.
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first: this layer survives every change to the service's code.
COPY scripts/install-app.sh scripts/install-app.sh
COPY requirements/runtime.lock requirements/runtime.lock
RUN scripts/install-app.sh --deps-only /opt/venv
# Then the project itself (pyproject.toml names README.md as its readme).
COPY pyproject.toml README.md LICENSE ./
COPY service/ service/
RUN scripts/install-app.sh --app-only /opt/venv /src

FROM ${PYTHON_IMAGE} AS runtime
ARG APP_UID=10001
LABEL org.opencontainers.image.title="device-rebind" \
      org.opencontainers.image.description="Refreshes device keys on the IoT platform when a device is swapped" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1
# A numeric user (Kubernetes' runAsNonRoot can only verify a numeric USER) without a home or shell.
RUN groupadd --system --gid "${APP_UID}" app \
 && useradd --system --uid "${APP_UID}" --gid "${APP_UID}" --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
USER ${APP_UID}:${APP_UID}
WORKDIR /tmp
EXPOSE 8080
# For Compose and plain Docker (Kubernetes uses the chart's probes): /healthz on the ops port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REBIND_HTTP__PORT', '8080'), timeout=4)"]
# Exec form: the Python process is PID 1 and receives SIGTERM itself; the service installs its own
# SIGTERM handler (drain, commit, exit), so no init shim is needed.
STOPSIGNAL SIGTERM
ENTRYPOINT ["device-rebind"]
CMD ["run"]
