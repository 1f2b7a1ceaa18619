"""The plain manifests (kustomize base and example overlay), validated file by file.

kustomize/kubectl are not needed: the base is plain YAML, so every file is validated strictly as
it is, and the overlay's patches are checked to target objects of the base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import ENV_PREFIX
from tests.deploy.helpers import (
    KUBE_VERSIONS,
    KUSTOMIZE_BASE,
    KUSTOMIZE_OVERLAY,
    Manifest,
    assert_probes,
    assert_secure_pod,
    env_of,
    load_manifests,
    settings_variables,
    validate_strict,
    workload,
)


def kustomization(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert data["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert data["kind"] == "Kustomization"
    return data


def resources(directory: Path) -> list[Manifest]:
    manifests: list[Manifest] = []
    for entry in kustomization(directory)["resources"]:
        path = directory / entry
        if path.is_dir():
            manifests += resources(path)
        else:
            manifests += load_manifests(path)
    return manifests


@pytest.fixture(scope="module")
def base() -> list[Manifest]:
    return resources(KUSTOMIZE_BASE)


def test_every_file_is_listed() -> None:
    for directory in (KUSTOMIZE_BASE, KUSTOMIZE_OVERLAY):
        data = kustomization(directory)
        listed = {r for r in data["resources"] if not r.startswith("..")}
        listed |= {p["path"] for p in data.get("patches", [])}
        on_disk = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == on_disk, directory


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_base_and_overlay_validate_strictly(version: str) -> None:
    manifests = resources(KUSTOMIZE_OVERLAY)
    assert {m["kind"] for m in manifests} >= {
        "StatefulSet",
        "Service",
        "ServiceAccount",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    for manifest in manifests:
        validate_strict(manifest, version)


def test_base_pod_is_locked_down(base: list[Manifest]) -> None:
    pod = workload(base)["spec"]["template"]["spec"]
    assert_secure_pod(pod)
    container = pod["containers"][0]
    assert_probes(container)
    env = env_of(container)
    assert env["REBIND_KAFKA__INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "secretKeyRef" in env["REBIND_PLATFORM__SECRET"]["valueFrom"]
    assert not [m for m in base if m["kind"] == "Secret"]


def test_every_variable_is_a_setting_of_the_service(base: list[Manifest]) -> None:
    """A misspelt REBIND_ variable would be ignored silently by the service."""
    known = {name for name, _ in settings_variables()}
    containers = list(workload(base)["spec"]["template"]["spec"]["containers"])
    for patch in kustomization(KUSTOMIZE_OVERLAY)["patches"]:
        for doc in load_manifests(KUSTOMIZE_OVERLAY / patch["path"]):
            containers += doc["spec"]["template"]["spec"]["containers"]
    names = {name for c in containers for name in env_of(c) if name.startswith(ENV_PREFIX)}
    assert "REBIND_TOPICS__LEDGER" in names
    assert names - known == set()


def test_overlay_patches_target_the_base(base: list[Manifest]) -> None:
    data = kustomization(KUSTOMIZE_OVERLAY)
    names = {(m["kind"], m["metadata"]["name"]) for m in base}
    for patch in data["patches"]:
        for doc in load_manifests(KUSTOMIZE_OVERLAY / patch["path"]):
            assert (doc["kind"], doc["metadata"]["name"]) in names
            # a strategic-merge patch of the container must name an existing container
            patched = {c["name"] for c in doc["spec"]["template"]["spec"]["containers"]}
            target = next(
                m
                for m in base
                if (m["kind"], m["metadata"]["name"]) == (doc["kind"], doc["metadata"]["name"])
            )
            assert patched <= {c["name"] for c in target["spec"]["template"]["spec"]["containers"]}
    for replica in data.get("replicas", []):
        assert any(name == replica["name"] for _, name in names)
    pod = workload(base)["spec"]["template"]["spec"]
    images = {c["image"].split(":")[0] for c in pod["containers"]}
    assert {i["name"] for i in data["images"]} <= images


def test_kafka_tls_files_are_mounted_read_only_from_optional_secrets(base: list[Manifest]) -> None:
    pod = workload(base)["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    paths: list[str] = []
    for patch in kustomization(KUSTOMIZE_OVERLAY)["patches"]:
        for doc in load_manifests(KUSTOMIZE_OVERLAY / patch["path"]):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                env = env_of(container)
                paths += [
                    env[f"REBIND_KAFKA__SSL_{name}"]["value"]
                    for name in ("CAFILE", "CERTFILE", "KEYFILE")
                    if f"REBIND_KAFKA__SSL_{name}" in env
                ]
    assert len(paths) == 3
    for path in paths:
        directory, name = path.rsplit("/", 1)
        mount = mounts[directory]
        assert mount["readOnly"] is True
        secret = volumes[mount["name"]]["secret"]
        assert secret["optional"] is True  # a PLAINTEXT deployment needs no such Secret
        assert name in {item["path"] for item in secret["items"]}
