"""The Helm chart: lint, render, validate (strict), and the properties the service relies on."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import SecretStr

from service.config import ENV_NESTED_DELIMITER, ENV_PREFIX, load_settings
from tests.deploy.helpers import (
    ALL_FEATURES,
    CHART,
    KUBE_VERSIONS,
    REPO,
    Manifest,
    assert_probes,
    assert_secure_pod,
    env_of,
    find,
    helm_template,
    run_helm,
    secretish_plaintext,
    settings_variables,
    validate_strict,
    workload,
)

pytestmark = pytest.mark.helm

ALERTS_SOURCE = REPO / "deploy" / "observability" / "alerts.yaml"
ALERTS_COPY = CHART / "files" / "alerts.yaml"

# Settings fields that do not come from `config:` but from secrets, mounted files or the pod.
SECRET_FIELDS = {"REBIND_PLATFORM__SECRET", "REBIND_KAFKA__SASL_PASSWORD"}
FILE_FIELDS = {
    "REBIND_PLATFORM__CLIENT_CERT",
    "REBIND_PLATFORM__CLIENT_KEY",
    "REBIND_PLATFORM__CA_BUNDLE",
    "REBIND_KAFKA__SSL_CAFILE",
}
POD_FIELDS = {"REBIND_KAFKA__INSTANCE_ID", "REBIND_HTTP__PORT"}

RENDER_CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "all-features": {"values_files": (ALL_FEATURES,)},
    "deployment": {"values_files": (ALL_FEATURES,), "sets": {"workload.kind": "Deployment"}},
}


def camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.capitalize() for part in rest)


@pytest.fixture(scope="module", params=list(RENDER_CASES))
def rendered(request: pytest.FixtureRequest, helm: Path) -> list[Manifest]:
    return helm_template(helm, **RENDER_CASES[request.param])


@pytest.fixture(scope="module")
def all_features(helm: Path) -> list[Manifest]:
    return helm_template(helm, values_files=(ALL_FEATURES,))


@pytest.mark.parametrize("values", [(), (ALL_FEATURES,)], ids=["defaults", "all-features"])
def test_helm_lint_strict(helm: Path, values: tuple[Path, ...]) -> None:
    args = ["lint", "--strict", str(CHART)]
    for path in values:
        args += ["-f", str(path)]
    result = run_helm(helm, *args)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_manifest_validates_strictly(rendered: list[Manifest], version: str) -> None:
    kinds = []
    for manifest in rendered:
        validate_strict(manifest, version)
        kinds.append(manifest["kind"])
    assert "Service" in kinds
    assert "PodDisruptionBudget" in kinds


def test_all_features_render_every_optional_object(all_features: list[Manifest]) -> None:
    kinds = {m["kind"] for m in all_features}
    assert {
        "StatefulSet",
        "Service",
        "ServiceAccount",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
        "ScaledObject",
    } <= kinds


def test_pods_are_locked_down_and_probed(rendered: list[Manifest]) -> None:
    pod = workload(rendered)["spec"]["template"]["spec"]
    assert_secure_pod(pod)
    for container in pod["containers"]:
        assert_probes(container)
    accounts = find(rendered, "ServiceAccount")
    assert all(sa["automountServiceAccountToken"] is False for sa in accounts)


def test_instance_id_is_the_pod_name(rendered: list[Manifest]) -> None:
    container = workload(rendered)["spec"]["template"]["spec"]["containers"][0]
    instance = env_of(container)["REBIND_KAFKA__INSTANCE_ID"]
    assert instance["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_statefulset_is_the_default_and_deployment_is_offered(helm: Path) -> None:
    default = helm_template(helm)
    sts = workload(default)
    assert sts["kind"] == "StatefulSet"
    headless = [s for s in find(default, "Service") if s["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in headless] == [sts["spec"]["serviceName"]]
    deployment = helm_template(helm, sets={"workload.kind": "Deployment"})
    assert workload(deployment)["kind"] == "Deployment"
    assert all(s["spec"].get("clusterIP") != "None" for s in find(deployment, "Service"))


def test_no_secret_is_created_or_inlined(all_features: list[Manifest]) -> None:
    assert not find(all_features, "Secret")
    assert secretish_plaintext(all_features) == []
    container = workload(all_features)["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    for name in SECRET_FIELDS:
        assert set(env[name]) == {"name", "valueFrom"}, name
        assert set(env[name]["valueFrom"]) == {"secretKeyRef"}, name
    # every SecretStr of the settings model comes from a Secret, and nothing else does
    secret_settings = {
        name
        for name, annotation in settings_variables()
        if SecretStr in (annotation, *get_args(annotation))
    }
    assert secret_settings == SECRET_FIELDS
    for name in secret_settings:
        assert "secretKeyRef" in env[name]["valueFrom"], name


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("config.platform.secret", "SENTINEL-s3cr3t"),
        ("config.kafka.saslPassword", "SENTINEL-s3cr3t"),
        ("secrets.platformSecret.value", "SENTINEL-s3cr3t"),
        ("secretFiles.platformClientKey.content", "SENTINEL-s3cr3t"),
    ],
)
def test_values_have_no_place_for_a_secret(helm: Path, key: str, value: str) -> None:
    result = run_helm(helm, "template", "rebind", str(CHART), "--set", f"{key}={value}")
    assert result.returncode != 0
    assert "additional properties" in result.stderr
    assert "SENTINEL-s3cr3t" not in result.stdout


def test_secret_files_are_mounted_and_pointed_at(all_features: list[Manifest]) -> None:
    pod = workload(all_features)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = env_of(container)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for name in FILE_FIELDS:
        path = Path(env[name]["value"])
        mount = next(m for m in mounts.values() if Path(m["mountPath"]) == path.parent)
        assert mount["readOnly"] is True
        secret = volumes[mount["name"]]["secret"]
        assert [item["path"] for item in secret["items"]] == [path.name]
        assert secret["secretName"].startswith("device-rebind-")


def test_every_setting_is_reachable_from_values(all_features: list[Manifest]) -> None:
    container = workload(all_features)["spec"]["template"]["spec"]["containers"][0]
    names = set(env_of(container))
    variables = {name for name, _ in settings_variables()}
    assert variables, "no settings found"
    missing = sorted(variables - names)
    assert missing == [], f"REBIND_ settings the chart cannot set: {missing}"


def test_values_schema_config_mirrors_the_settings_model() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"]["config"]["properties"]
    expected: dict[str, set[str]] = {}
    for variable, annotation in settings_variables():
        if variable in SECRET_FIELDS | FILE_FIELDS | POD_FIELDS:
            continue
        assert SecretStr not in (annotation, *get_args(annotation))
        section, field = variable.removeprefix(ENV_PREFIX).split(ENV_NESTED_DELIMITER)
        expected.setdefault(section.lower(), set()).add(camel(field.lower()))
    assert {s: set(p["properties"]) for s, p in config.items()} == expected
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert {s: set(f) for s, f in values["config"].items()} == expected


def test_rendered_configuration_is_accepted_by_the_service(
    all_features: list[Manifest], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The env the chart renders, secrets filled in, loads into the service's settings (the
    mounted files are stand-ins of the same names: the service checks that they exist)."""
    container = workload(all_features)["spec"]["template"]["spec"]["containers"][0]
    for name, entry in env_of(container).items():
        if not name.startswith(ENV_PREFIX):
            continue
        if name in FILE_FIELDS and "value" in entry:
            stand_in = tmp_path / name / Path(entry["value"]).name
            stand_in.parent.mkdir()
            stand_in.write_text("PEM")
            monkeypatch.setenv(name, str(stand_in))
        elif "value" in entry:
            monkeypatch.setenv(name, entry["value"])
        elif "secretKeyRef" in entry["valueFrom"]:
            monkeypatch.setenv(name, "from-a-secret")
        else:
            monkeypatch.setenv(name, "rebind-0")  # the downward API's pod name
    settings = load_settings()
    assert settings.kafka.group_id == "SENTINEL-group"
    assert settings.kafka.instance_id == "rebind-0"
    assert settings.platform.rate_limit_per_minute == 1_000_000
    assert settings.platform.request_timeout_seconds == 7.5
    assert settings.platform.verify_tls is False
    assert settings.topics.device_swapped == "SENTINEL.in"
    assert settings.topics.ledger == "SENTINEL.ledger"
    assert settings.kafka.stuck_partition_seconds == 600
    assert settings.platform.inline_backoff_max_seconds == 1.5
    assert str(settings.platform.client_cert).endswith("/tls.crt")
    assert settings.http.port == 8080


def test_wrong_types_are_rejected_by_the_schema(helm: Path) -> None:
    for key, value in [
        ("replicaCount", "abc"),
        ("config.platform.rateLimitPerMinute", "many"),
        ("workload.kind", "DaemonSet"),
        ("networkPolicy.enabled", "maybe"),
    ]:
        result = run_helm(helm, "template", "rebind", str(CHART), "--set", f"{key}={value}")
        assert result.returncode != 0, key
        assert "values don't meet the specifications of the schema" in result.stderr, key


def test_keda_refuses_more_replicas_than_partitions(helm: Path) -> None:
    result = run_helm(
        helm,
        "template",
        "rebind",
        str(CHART),
        "-f",
        str(ALL_FEATURES),
        "--set",
        "autoscaling.keda.maxReplicaCount=13",
    )
    assert result.returncode != 0
    assert "exceeds autoscaling.keda.inputTopicPartitions (12)" in result.stderr


def test_keda_targets_the_workload_and_leaves_replicas_to_it(all_features: list[Manifest]) -> None:
    (scaled,) = find(all_features, "ScaledObject")
    target = workload(all_features)
    assert scaled["spec"]["scaleTargetRef"]["kind"] == target["kind"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == target["metadata"]["name"]
    assert "replicas" not in target["spec"]
    trigger = scaled["spec"]["triggers"][0]["metadata"]
    assert trigger["consumerGroup"] == "SENTINEL-group"
    assert trigger["topic"] == "SENTINEL.in"
    assert scaled["spec"]["maxReplicaCount"] <= 12


def test_network_policy_allows_only_dns_kafka_platform(all_features: list[Manifest]) -> None:
    (policy,) = find(all_features, "NetworkPolicy")
    egress = policy["spec"]["egress"]
    ports = [sorted(p["port"] for p in rule["ports"]) for rule in egress]
    assert ports == [[53, 53], [9093], [8743]]
    assert egress[1]["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    assert egress[2]["to"] == [{"ipBlock": {"cidr": "203.0.113.0/24"}}]
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "http-metrics", "protocol": "TCP"}]


def test_service_monitor_scrapes_the_metrics_service_only(all_features: list[Manifest]) -> None:
    (monitor,) = find(all_features, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    matching = [
        s
        for s in find(all_features, "Service")
        if all(s["metadata"]["labels"].get(k) == v for k, v in selector.items())
    ]
    assert len(matching) == 1
    assert matching[0]["spec"].get("clusterIP") != "None"
    assert monitor["spec"]["endpoints"][0]["port"] == matching[0]["spec"]["ports"][0]["name"]


def test_prometheus_rule_embeds_the_alerts_file(all_features: list[Manifest]) -> None:
    (rule,) = find(all_features, "PrometheusRule")
    alerts: Mapping[str, Any] = yaml.safe_load(ALERTS_COPY.read_text())
    assert rule["spec"]["groups"] == alerts["groups"]


def test_alerts_copy_matches_source() -> None:
    assert ALERTS_COPY.read_bytes() == ALERTS_SOURCE.read_bytes(), (
        f"copy {ALERTS_SOURCE.relative_to(REPO)} to {ALERTS_COPY.relative_to(REPO)}"
    )


def value_paths(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from value_paths(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def test_readme_lists_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [path for path in value_paths(values) if f"`{path}`" not in readme]
    assert missing == []


def render_notes(helm: Path, tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` would print it (which needs a cluster): rendered through a
    copy of the chart where it is wrapped in a named template."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "notes" -}}' + notes + "{{- end }}")
    (chart / "templates" / "notes.yaml").write_text('notes: {{ include "notes" . | quote }}\n')
    result = run_helm(
        helm, "template", "rebind", str(chart), "-n", "iot", "-s", "templates/notes.yaml", *args
    )
    assert result.returncode == 0, result.stderr
    text: str = yaml.safe_load(result.stdout)["notes"]
    return text


def test_notes_render(helm: Path, tmp_path: Path) -> None:
    default = render_notes(helm, tmp_path / "default")
    assert "as a StatefulSet" in default
    assert "REBIND_PLATFORM__BASE_URL" in default
    assert "secrets.platformSecret.existingSecret" in default
    configured = render_notes(
        helm, tmp_path / "all", "-f", str(ALL_FEATURES), "--set", "workload.kind=Deployment"
    )
    assert "WARNING" not in configured
    assert "pod names (the Kafka instance id) change on every restart" in configured
    assert "Exactly-once is as safe" in configured
    assert "1000000 calls/minute" in configured
