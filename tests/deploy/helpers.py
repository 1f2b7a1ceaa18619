"""Shared helpers of the deployment tests: paths, helm, manifest checks."""

from __future__ import annotations

import functools
import operator
import os
import re
import subprocess
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import jsonschema
import kubernetes_validate
import yaml
from pydantic import BaseModel

from service.config import ENV_NESTED_DELIMITER, ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "device-rebind"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
REQUIRED_VALUES = CHART / "ci" / "required-values.yaml"
"""The values the chart refuses to render without (platform URL, app id, the secret's name)."""
KUSTOMIZE_BASE = REPO / "deploy" / "kubernetes" / "base"
KUSTOMIZE_OVERLAY = REPO / "deploy" / "kubernetes" / "overlays" / "example"
COMPOSE_FILE = REPO / "deploy" / "compose" / "compose.yaml"
CRD_SCHEMAS = Path(__file__).resolve().parent / "schemas"

# Kubernetes versions the manifests are validated against (the chart's floor is 1.25).
KUBE_VERSIONS = ("1.25", "1.30", "1.37")
APP_UID = 10001

Manifest = dict[str, Any]


def tools_bin() -> Path:
    return Path(os.environ.get("TOOLS_BIN", str(REPO / ".cache" / "bin")))


def helm_binary() -> Path:
    """The project's helm, built from the Go module proxy by scripts/install-helm.sh if missing."""
    helm = tools_bin() / "helm"
    # The script is idempotent and cheap when helm is there; it rebuilds on a changed recipe.
    subprocess.run([str(REPO / "scripts" / "install-helm.sh")], check=True, timeout=1800)
    assert helm.is_file(), f"scripts/install-helm.sh did not produce {helm}"
    return helm


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=300, check=False
    )


def helm_template(
    helm: Path,
    *,
    values_files: Sequence[Path] = (),
    sets: Mapping[str, str] | None = None,
    release: str = "rebind",
    namespace: str = "iot",
    required: bool = True,
) -> list[Manifest]:
    """``helm template``; with ``required`` the required values come first (other files win)."""
    args = ["template", release, str(CHART), "--namespace", namespace]
    for values in ((REQUIRED_VALUES,) if required else ()) + tuple(values_files):
        args += ["-f", str(values)]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    result = run_helm(helm, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def load_manifests(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(manifests: Sequence[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def workload(manifests: Sequence[Manifest]) -> Manifest:
    found = [m for m in manifests if m["kind"] in ("StatefulSet", "Deployment")]
    assert len(found) == 1, [m["kind"] for m in manifests]
    return found[0]


def containers(pod_spec: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


def env_of(container: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def crd_schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = yaml.safe_load((CRD_SCHEMAS / f"{kind.lower()}.yaml").read_text())
    return schema


CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "KafkaTopic"}


def validate_strict(manifest: Manifest, version: str) -> None:
    """Validate against Kubernetes' own schema (strict: no unknown fields) or, for the custom
    resources the chart renders, against the small schemas in tests/deploy/schemas."""
    if manifest["kind"] in CUSTOM_KINDS:
        jsonschema.Draft7Validator(crd_schema(manifest["kind"])).validate(manifest)
        return
    kubernetes_validate.validate(manifest, version, strict=True)


def assert_secure_pod(pod_spec: Mapping[str, Any]) -> None:
    """The security settings every pod of the service must have."""
    assert pod_spec["automountServiceAccountToken"] is False
    psc = pod_spec["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == APP_UID
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for container in containers(pod_spec):
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True, container["name"]
        assert isinstance(sc["runAsUser"], int)
        assert sc["runAsUser"] != 0
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "add" not in sc["capabilities"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert sc.get("privileged", False) is False
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]], "a writable emptyDir at /tmp"
        res = container["resources"]
        assert res["requests"]["cpu"]
        assert res["requests"]["memory"]
        assert res["limits"]["memory"]


def assert_probes(container: Mapping[str, Any]) -> None:
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names


_SECRETISH = re.compile(r"(password|passwd|secret|token|apikey|api_key|private)", re.IGNORECASE)
# Keys that look secret-like but hold names of references or booleans, never secret material.
_REFERENCE_KEYS = {"secretName", "secretKeyRef", "secretRef", "automountServiceAccountToken"}


def secretish_plaintext(node: Any, path: str = "") -> list[str]:
    """Paths of string values stored under secret-looking keys (other than references)."""
    found: list[str] = []
    if isinstance(node, Mapping):
        for key, value in node.items():
            sub = f"{path}.{key}"
            secretish = _SECRETISH.search(str(key)) and key not in _REFERENCE_KEYS
            if isinstance(value, str) and secretish:
                found.append(sub)
            found += secretish_plaintext(value, sub)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            found += secretish_plaintext(item, f"{path}[{index}]")
    return found


def settings_variables(
    model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX
) -> Iterator[tuple[str, Any]]:
    """(REBIND_ variable, field annotation) for every leaf field of the settings model."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        variable = prefix + name.upper()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from settings_variables(annotation, variable + ENV_NESTED_DELIMITER)
        else:
            yield variable, _plain(annotation)


def _plain(annotation: Any) -> Any:
    """The annotation without ``Annotated``: ``Secret | None`` is ``SecretStr | None``."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _plain(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return functools.reduce(operator.or_, (_plain(a) for a in get_args(annotation)))
    return annotation
