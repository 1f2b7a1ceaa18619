"""The Helm chart: lint, render, validate (strict), and the properties the service relies on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, get_args

import jsonschema
import pytest
import yaml
from pydantic import SecretStr

from service.config import (
    ENV_NESTED_DELIMITER,
    ENV_PREFIX,
    TopicSettings,
    load_kafka_settings,
    load_settings,
)
from tests.deploy.helpers import (
    ALL_FEATURES,
    CHART,
    KUBE_VERSIONS,
    REPO,
    REQUIRED_VALUES,
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
SECRET_FIELDS = {
    "REBIND_PLATFORM__SECRET",
    "REBIND_KAFKA__SASL_PASSWORD",
    "REBIND_KAFKA__SSL_KEY_PASSWORD",
    "REBIND_BIND__PATH_SECRET",
}
FILE_FIELDS = {
    "REBIND_PLATFORM__SECRET_FILE",
    "REBIND_PLATFORM__CLIENT_CERT",
    "REBIND_PLATFORM__CLIENT_KEY",
    "REBIND_PLATFORM__CA_BUNDLE",
    "REBIND_KAFKA__SSL_CAFILE",
    "REBIND_KAFKA__SSL_CERTFILE",
    "REBIND_KAFKA__SSL_KEYFILE",
    "REBIND_KAFKA__SASL_OAUTH_TOKEN_FILE",
    "REBIND_BIND__TLS_CERT",
    "REBIND_BIND__TLS_KEY",
    "REBIND_BIND__CLIENT_CA",
}
POD_FIELDS = {"REBIND_KAFKA__INSTANCE_ID", "REBIND_HTTP__PORT", "REBIND_BIND__PORT"}
# Left at the service default on purpose: the bind listener must listen on the pod's addresses.
DEFAULT_FIELDS = {"REBIND_BIND__HOST"}

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


@pytest.mark.parametrize(
    "values", [(REQUIRED_VALUES,), (ALL_FEATURES,)], ids=["defaults", "all-features"]
)
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
    assert_probes(pod["containers"][0])  # the service; sidecars are the user's
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


def test_static_membership_is_on_for_a_statefulset_only(helm: Path) -> None:
    def static(**kwargs: Any) -> object:
        container = workload(helm_template(helm, **kwargs))["spec"]["template"]["spec"]
        entry = env_of(container["containers"][0]).get("REBIND_KAFKA__STATIC_MEMBERSHIP")
        return None if entry is None else entry["value"]

    assert static() == "true"  # stable, unique pod names: the instance ids
    assert static(sets={"workload.kind": "Deployment"}) is None  # the service default: off
    assert static(sets={"config.kafka.staticMembership": "false"}) == "false"
    assert static(
        sets={"workload.kind": "Deployment", "config.kafka.staticMembership": "true"}
    ) == ("true")


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
    variables = {name for name, _ in settings_variables()} - DEFAULT_FIELDS
    assert variables, "no settings found"
    missing = sorted(variables - names)
    assert missing == [], f"REBIND_ settings the chart cannot set: {missing}"


def test_values_schema_config_mirrors_the_settings_model() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"]["config"]["properties"]
    expected: dict[str, set[str]] = {}
    for variable, annotation in settings_variables():
        if variable in SECRET_FIELDS | FILE_FIELDS | POD_FIELDS | DEFAULT_FIELDS:
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
            monkeypatch.setenv(name, "from-a-secret-Qm3xT7vKz2Lw9")
        else:
            monkeypatch.setenv(name, "rebind-0")  # the downward API's pod name
    settings = load_settings()
    assert settings.kafka.group_id == "SENTINEL-group"
    assert settings.kafka.instance_id == "rebind-0"
    assert settings.platform.rate_limit_per_minute == 1_000_000
    assert settings.platform.rate_window_seconds == 45
    assert settings.platform.request_timeout_seconds == 7.5
    assert settings.platform.verify_tls is False
    assert settings.topics.device_swapped == "SENTINEL.in"
    assert settings.topics.ledger == "SENTINEL.ledger"
    assert settings.topics.bind_notify == "SENTINEL.bind-notify"
    assert settings.kafka.stuck_partition_seconds == 600
    assert settings.platform.inline_backoff_max_seconds == 1.5
    assert str(settings.platform.client_cert).endswith("/tls.crt")
    assert settings.http.port == 8080
    kafka = settings.kafka
    assert kafka.sasl_mechanism == "OAUTHBEARER"
    assert str(kafka.sasl_oauth_token_file).endswith("/token")
    assert str(kafka.ssl_certfile).endswith("/user.crt")
    assert str(kafka.ssl_keyfile).endswith("/user.key")
    assert kafka.ssl_key_password is not None
    assert kafka.ssl_check_hostname is False
    bind = settings.bind
    assert str(bind.callback_url) == "https://rebind.example.com:8443/SENTINEL-bind"
    assert (bind.host, bind.port) == ("0.0.0.0", 8443)  # the service default
    assert bind.path_secret is not None
    assert str(bind.tls_cert).endswith("/tls.crt")
    assert str(bind.tls_key).endswith("/tls.key")
    assert bind.poll is False
    assert bind.poll_budget_share == 0.1
    assert (bind.poll_initial_seconds, bind.poll_max_seconds) == (20, 600)
    assert bind.watch_deadline_seconds == 43200
    assert bind.expiry_grace_seconds == 45


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
    metrics, bind = policy["spec"]["ingress"]  # bind: config.bind.callbackUrl is set
    assert metrics["ports"] == [{"port": "http-metrics", "protocol": "TCP"}]
    assert bind["ports"] == [{"port": "bind", "protocol": "TCP"}]


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
        helm,
        "template",
        "rebind",
        str(chart),
        "-n",
        "iot",
        "-s",
        "templates/notes.yaml",
        "-f",
        str(REQUIRED_VALUES),
        *args,
    )
    assert result.returncode == 0, result.stderr
    text: str = yaml.safe_load(result.stdout)["notes"]
    return text


def test_notes_render(helm: Path, tmp_path: Path) -> None:
    default = render_notes(helm, tmp_path / "default")
    assert "as a StatefulSet" in default
    assert "helm -n iot test rebind" in default
    assert "Topics: this release creates none" in default
    assert "topics create" in default
    configured = render_notes(
        helm, tmp_path / "all", "-f", str(ALL_FEATURES), "--set", "workload.kind=Deployment"
    )
    assert "WARNING" not in configured
    assert "Topics: this release creates none" not in configured
    assert "pod names (the Kafka instance id) change on every restart" in configured
    assert "Exactly-once is as safe" in configured
    assert "1000000 calls/minute" in configured


# ---- issue 12: required values, helm test, the usual extras, topics ------------------------


def test_required_values_fail_at_template_time_naming_each(helm: Path) -> None:
    result = run_helm(helm, "template", "rebind", str(CHART))
    assert result.returncode != 0
    message = result.stderr
    assert "required values are not set" in message
    for value, variable in [
        ("config.platform.baseUrl", "REBIND_PLATFORM__BASE_URL"),
        ("config.platform.appId", "REBIND_PLATFORM__APP_ID"),
        ("secrets.platformSecret.existingSecret", "REBIND_PLATFORM__SECRET"),
    ]:
        assert f"  - {value}: " in message
        assert variable in message
    partial = run_helm(
        helm,
        "template",
        "rebind",
        str(CHART),
        "--set",
        "config.platform.baseUrl=https://iot.example.com",
        "--set",
        "secrets.platformSecret.existingSecret=s",
    )
    assert partial.returncode != 0
    assert "config.platform.appId" in partial.stderr
    assert "config.platform.baseUrl" not in partial.stderr
    assert "existingSecret" not in partial.stderr


def test_the_schema_requires_the_keys_too() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    props = schema["properties"]
    assert {"config", "secrets"} <= set(schema["required"])
    assert {"baseUrl", "appId"} <= set(props["config"]["properties"]["platform"]["required"])
    assert "platformSecret" in props["secrets"]["required"]
    assert "existingSecret" in props["secrets"]["properties"]["platformSecret"]["required"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    del values["config"]["platform"]["baseUrl"]
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(values))
    assert any("'baseUrl' is a required property" in e.message for e in errors)


def _helm_test_pod(manifests: list[Manifest]) -> Manifest:
    pods = [
        m for m in find(manifests, "Pod") if m["metadata"]["annotations"]["helm.sh/hook"] == "test"
    ]
    assert len(pods) == 1
    return pods[0]


def test_helm_test_pod_checks_readyz_through_the_service(rendered: list[Manifest]) -> None:
    pod = _helm_test_pod(rendered)
    assert_secure_pod(pod["spec"])
    (service,) = [s for s in find(rendered, "Service") if s["spec"].get("clusterIP") != "None"]
    port = service["spec"]["ports"][0]["port"]
    script = pod["spec"]["containers"][0]["command"][2]
    assert f"http://{service['metadata']['name']}.iot.svc:{port}/readyz" in script
    assert pod["spec"]["restartPolicy"] == "Never"


def test_helm_test_script_waits_for_200_and_fails_otherwise(helm: Path) -> None:
    """The rendered script, run against a local server that answers 503 twice, then 200."""
    import http.server  # noqa: PLC0415 - this test only
    import threading  # noqa: PLC0415

    pod = _helm_test_pod(helm_template(helm, sets={"helmTest.attempts": "3"}))
    script: str = pod["spec"]["containers"][0]["command"][2]
    answers = [503, 503, 200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = answers.pop(0) if answers else 503
            body = b"ready" if status == 200 else b"kafka: not connected yet"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None: ...

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = f"http://127.0.0.1:{server.server_address[1]}/readyz"
    script = re.sub(r"http://[^\"]+/readyz", local, script)
    try:
        ok = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert ok.stdout.count("503 kafka: not connected yet") == 2
        assert ok.stdout.strip().endswith("200 ready")
        answers[:] = [503] * 5
        failing = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        assert failing.returncode == 1
    finally:
        server.shutdown()


def test_the_usual_extras_land_in_the_pod(all_features: list[Manifest]) -> None:
    pod = workload(all_features)["spec"]["template"]
    spec = pod["spec"]
    assert pod["metadata"]["labels"]["example.com/tier"] == "backend"
    assert spec["priorityClassName"] == "SENTINEL-priority"
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert [c["name"] for c in spec["initContainers"]] == ["wait-for-dns"]
    assert [c["name"] for c in spec["containers"]] == ["device-rebind", "log-shipper"]
    main = spec["containers"][0]
    assert main["envFrom"] == [{"configMapRef": {"name": "SENTINEL-env"}}]
    assert env_of(main)["TZ"] == {"name": "TZ", "value": "UTC"}
    assert {"name": "SENTINEL-extra", "emptyDir": {}} in spec["volumes"]
    assert {"name": "SENTINEL-extra", "mountPath": "/var/run/extra"} in main["volumeMounts"]
    assert_secure_pod(spec)


def test_topics_job_runs_topics_create_before_install_and_upgrade(
    all_features: list[Manifest], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (job,) = find(all_features, "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    spec = job["spec"]["template"]["spec"]
    assert "serviceAccountName" not in spec  # the chart's account does not exist yet
    assert_secure_pod(spec)
    (container,) = spec["containers"]
    assert container["args"] == [
        "topics", "create", "--partitions", "12", "--replication-factor", "3",
    ]  # fmt: skip
    env = env_of(container)
    rebind = {name for name in env if name.startswith(ENV_PREFIX)}
    assert rebind, "no settings"
    assert all(n.split("__")[0] in ("REBIND_KAFKA", "REBIND_TOPICS", "REBIND_LOG") for n in rebind)
    assert env["REBIND_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == (
        "device-rebind-kafka"
    )
    assert "REBIND_PLATFORM__SECRET" not in env
    assert env["REBIND_TOPICS__LEDGER"]["value"] == "SENTINEL.ledger"
    assert container["envFrom"] == [{"configMapRef": {"name": "SENTINEL-env"}}]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for file in ("CAFILE", "CERTFILE", "KEYFILE"):  # TLS and SASL apply to the Job too
        assert env[f"REBIND_KAFKA__SSL_{file}"]["value"].rsplit("/", 1)[0] in mounts
    assert env["REBIND_KAFKA__SASL_OAUTH_TOKEN_FILE"]["value"].rsplit("/", 1)[0] in mounts
    assert env["REBIND_KAFKA__SSL_KEY_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == (
        "device-rebind-kafka-user"
    )
    # what the Job is given loads into the settings `topics create` reads
    for name, entry in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        if name in FILE_FIELDS:
            stand_in = tmp_path / Path(entry["value"]).name
            stand_in.write_text("PEM")
            monkeypatch.setenv(name, str(stand_in))
        else:
            monkeypatch.setenv(name, entry.get("value", "from-a-secret"))
    settings = load_kafka_settings()
    assert settings.topics.device_swapped == "SENTINEL.in"
    assert settings.kafka.group_id == "SENTINEL-group"


def test_topics_job_is_off_by_default(rendered: list[Manifest], helm: Path) -> None:
    assert not find(helm_template(helm), "Job")


def test_strimzi_topics_follow_the_service_topic_table(helm: Path) -> None:
    from service.topics import SPECS, Partitions  # noqa: PLC0415

    manifests = helm_template(
        helm,
        sets={
            "strimzi.kafkaTopics.enabled": "true",
            "strimzi.kafkaTopics.clusterName": "my-cluster",
            "strimzi.kafkaTopics.partitions": "9",
        },
    )
    topics = {t["spec"]["topicName"]: t for t in find(manifests, "KafkaTopic")}
    defaults = TopicSettings()
    assert set(topics) == {getattr(defaults, spec.setting) for spec in SPECS}
    for spec in SPECS:
        topic = topics[getattr(defaults, spec.setting)]
        validate_strict(topic, KUBE_VERSIONS[-1])
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "my-cluster"
        assert topic["metadata"]["namespace"] == "iot"
        assert topic["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert topic["spec"]["partitions"] == (1 if spec.partitions is Partitions.ONE else 9)
        assert topic["spec"].get("config", {}) == dict(spec.configs), spec.setting
        assert topic["spec"]["replicas"] == 3


def test_strimzi_topics_take_the_configured_names_and_skips(all_features: list[Manifest]) -> None:
    topics = {t["spec"]["topicName"]: t for t in find(all_features, "KafkaTopic")}
    assert "SENTINEL.in" not in topics  # skip: [deviceSwapped]
    assert topics["SENTINEL.ledger"]["metadata"]["name"] == "sentinel.ledger"
    assert topics["SENTINEL.ledger"]["metadata"]["namespace"] == "kafka"
    assert topics["SENTINEL.ledger"]["spec"]["partitions"] == 12


def test_strimzi_topics_need_the_cluster_name(helm: Path) -> None:
    result = run_helm(
        helm,
        "template",
        "rebind",
        str(CHART),
        "-f",
        str(REQUIRED_VALUES),
        "--set",
        "strimzi.kafkaTopics.enabled=true",
    )
    assert result.returncode != 0
    assert "strimzi.kafkaTopics.clusterName is required" in result.stderr


def test_chart_readme_has_a_topics_section() -> None:
    readme = (CHART / "README.md").read_text()
    section = readme.split("## Topics", 1)[1].split("\n## ", 1)[0]
    for words in ("topicsJob.enabled", "strimzi.kafkaTopics.enabled", "topics create"):
        assert words in section


# ---- bind confirmation: the push listener and the watch settings ---------------------------

BIND_VALUES: dict[str, Any] = {
    "config": {
        "bind": {
            "callbackUrl": "https://rebind.example.com:8443/pushes",
            "pollBudgetShare": 0.25,
            "watchDeadlineSeconds": 3600,
        }
    },
    "secrets": {"bindPathSecret": {"existingSecret": "rebind-bind-path"}},
    "secretFiles": {
        "bindTlsCert": {"existingSecret": "rebind-bind-tls"},
        "bindTlsKey": {"existingSecret": "rebind-bind-tls"},
    },
    "networkPolicy": {
        "enabled": True,
        "bindIngressFrom": [{"ipBlock": {"cidr": "198.51.100.0/24"}}],
    },
}


@pytest.fixture
def bind_values(tmp_path: Path) -> Path:
    """BIND_VALUES as a values file (--set would turn 0.25 into a string)."""
    path = tmp_path / "bind-values.yaml"
    path.write_text(yaml.safe_dump(BIND_VALUES))
    return path


def _main_container(manifests: list[Manifest]) -> Mapping[str, Any]:
    container: Mapping[str, Any] = workload(manifests)["spec"]["template"]["spec"]["containers"][0]
    return container


def _metrics_service(manifests: list[Manifest]) -> Manifest:
    (service,) = [s for s in find(manifests, "Service") if s["spec"].get("clusterIP") != "None"]
    return service


@pytest.mark.parametrize("kind", ["StatefulSet", "Deployment"])
def test_bind_listener_renders_with_a_callback_url(
    helm: Path, bind_values: Path, kind: str
) -> None:
    manifests = helm_template(
        helm,
        values_files=(bind_values,),
        sets={"workload.kind": kind, "topicsJob.enabled": "true"},
    )
    for manifest in manifests:
        validate_strict(manifest, KUBE_VERSIONS[-1])
    pod = workload(manifests)["spec"]["template"]["spec"]
    container = _main_container(manifests)
    env = env_of(container)
    assert env["REBIND_BIND__CALLBACK_URL"]["value"] == "https://rebind.example.com:8443/pushes"
    assert env["REBIND_BIND__POLL_BUDGET_SHARE"]["value"] == "0.25"
    assert env["REBIND_BIND__WATCH_DEADLINE_SECONDS"]["value"] == "3600"
    assert env["REBIND_BIND__PORT"]["value"] == "8443"
    assert "REBIND_BIND__HOST" not in env  # the service default, 0.0.0.0
    assert "REBIND_BIND__POLL" not in env  # null: the service default applies
    assert env["REBIND_BIND__PATH_SECRET"] == {
        "name": "REBIND_BIND__PATH_SECRET",
        "valueFrom": {"secretKeyRef": {"name": "rebind-bind-path", "key": "path-secret"}},
    }
    assert {"name": "bind", "containerPort": 8443, "protocol": "TCP"} in container["ports"]
    # the TLS files: mounted read-only from the Secret, the variables point at them
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for variable, key in [
        ("REBIND_BIND__TLS_CERT", "tls.crt"),
        ("REBIND_BIND__TLS_KEY", "tls.key"),
    ]:
        path = Path(env[variable]["value"])
        assert path.name == key
        mount = mounts[str(path.parent)]
        assert mount["readOnly"] is True
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == "rebind-bind-tls"
        assert secret["items"] == [{"key": key, "path": key}]
    assert not find(manifests, "Secret")
    (job,) = find(manifests, "Job")  # the topics Job gets the Kafka settings only
    assert "bind" not in json.dumps(job["spec"]["template"]["spec"]).replace("rebind", "")
    # the Service: metrics first (ServiceMonitor, helm test), then bind
    service = _metrics_service(manifests)
    assert service["spec"]["ports"][1] == {
        "name": "bind", "port": 8443, "targetPort": "bind", "protocol": "TCP",
    }  # fmt: skip
    # the NetworkPolicy admits the bind port from bindIngressFrom only, and nothing else new
    (policy,) = find(manifests, "NetworkPolicy")
    metrics, bind = policy["spec"]["ingress"]
    assert metrics == {"ports": [{"port": "http-metrics", "protocol": "TCP"}]}
    assert bind == {
        "ports": [{"port": "bind", "protocol": "TCP"}],
        "from": [{"ipBlock": {"cidr": "198.51.100.0/24"}}],
    }
    default_policy = find(
        helm_template(helm, sets={"networkPolicy.enabled": "true"}), "NetworkPolicy"
    )
    assert policy["spec"]["egress"] == default_policy[0]["spec"]["egress"]


def test_bind_ports_follow_the_values(helm: Path, bind_values: Path) -> None:
    manifests = helm_template(
        helm,
        values_files=(bind_values,),
        sets={"containerPorts.bind": "9443", "service.ports.bind": "443"},
    )
    container = _main_container(manifests)
    assert env_of(container)["REBIND_BIND__PORT"]["value"] == "9443"
    assert {"name": "bind", "containerPort": 9443, "protocol": "TCP"} in container["ports"]
    bind = _metrics_service(manifests)["spec"]["ports"][1]
    assert (bind["port"], bind["targetPort"]) == (443, "bind")


def test_no_bind_port_without_a_callback_url(helm: Path, bind_values: Path) -> None:
    manifests = helm_template(
        helm, values_files=(bind_values,), sets={"config.bind.callbackUrl": "null"}
    )
    container = _main_container(manifests)
    env = env_of(container)
    assert "REBIND_BIND__PORT" not in env
    assert "REBIND_BIND__CALLBACK_URL" not in env
    assert env["REBIND_BIND__POLL_BUDGET_SHARE"]["value"] == "0.25"  # polling still configured
    assert [p["name"] for p in container["ports"]] == ["http-metrics"]
    for service in find(manifests, "Service"):
        assert [p["name"] for p in service["spec"]["ports"]] == ["http-metrics"]
    (policy,) = find(manifests, "NetworkPolicy")
    assert [r["ports"] for r in policy["spec"]["ingress"]] == [
        [{"port": "http-metrics", "protocol": "TCP"}]
    ]
    # and by default nothing of bind is rendered at all
    default = helm_template(helm)
    assert not [n for n in env_of(_main_container(default)) if n.startswith("REBIND_BIND__")]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("config.bind.pollBudgetShare", "0"),
        ("config.bind.pollBudgetShare", "1.5"),
        ("config.bind.pollBudgetShare", "-0.1"),
        ("config.bind.pollInitialSeconds", "0"),
        ("config.bind.pollMaxSeconds", "-5"),
        ("config.bind.watchDeadlineSeconds", "0"),
        ("config.bind.expiryGraceSeconds", "-1"),
        ("config.bind.callbackUrl", "https://rebind.example.com/pushes"),
        ("config.bind.callbackUrl", "rebind.example.com:443"),
        ("config.bind.poll", "sometimes"),
        ("containerPorts.bind", "70000"),
        ("service.ports.bind", "0"),
    ],
)
def test_schema_refuses_bad_bind_values(helm: Path, key: str, value: str) -> None:
    args = ["template", "rebind", str(CHART), "-f", str(REQUIRED_VALUES)]
    result = run_helm(helm, *args, "--set-json", f"{key}={json.dumps(yaml.safe_load(value))}")
    assert result.returncode != 0, key
    assert "values don't meet the specifications of the schema" in result.stderr, key
    assert f"at '/{key.replace('.', '/')}'" in result.stderr, result.stderr


def test_schema_accepts_good_bind_values(helm: Path) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    bind = schema["properties"]["config"]["properties"]["bind"]
    validator = jsonschema.Draft7Validator(bind)
    for good in [
        {"pollBudgetShare": 1},
        {"pollBudgetShare": 0.05},
        {"expiryGraceSeconds": 0},
        {"callbackUrl": "https://rebind.example.com:443/bind"},
        {"callbackUrl": "http://[2001:db8::1]:8443"},
        {"callbackUrl": None, "poll": None, "pollBudgetShare": None},
    ]:
        assert list(validator.iter_errors(good)) == [], good
    for bad in [{"pollBudgetShare": 0}, {"callbackUrl": "https://rebind.example.com/bind"}]:
        assert list(validator.iter_errors(bad)), bad
    for share in ("1", "0.05"):  # the boundary and a fraction render
        result = run_helm(
            helm,
            "template",
            "rebind",
            str(CHART),
            "-f",
            str(REQUIRED_VALUES),
            "--set-json",
            f"config.bind.pollBudgetShare={share}",
        )
        assert result.returncode == 0, result.stderr
        assert f'value: "{share}"' in result.stdout


def test_chart_readme_explains_bind_pushes() -> None:
    readme = (CHART / "README.md").read_text()
    section = readme.split("## Bind confirmation (pushes)", 1)[1].split("\n## ", 1)[0]
    for words in (
        "config.bind.callbackUrl",
        "Ingress",
        "LoadBalancer",
        "secrets.bindPathSecret",
        "networkPolicy.bindIngressFrom",
    ):
        assert words in section, words
