from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from service.cli import main
from service.config import (
    ConfigError,
    HttpSettings,
    load_kafka_settings,
    load_settings,
    masked,
    variables,
)

REQUIRED = {
    "REBIND_PLATFORM__BASE_URL": "https://iot.example.test:8743",
    "REBIND_PLATFORM__APP_ID": "app-1",
    "REBIND_PLATFORM__SECRET": "s3cr3t-value",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name, value in REQUIRED.items():
        monkeypatch.setenv(name, value)
    # check-config tries the ops port: any free port, so a busy 8080 on the machine is no failure
    monkeypatch.setenv("REBIND_HTTP__PORT", "0")
    return monkeypatch


def test_defaults_match_the_contracts(env: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert s.kafka.bootstrap_servers == "localhost:9092"
    assert s.kafka.group_id == "device-rebind"
    assert s.topics.device_swapped == "asset.device-swapped.v1"
    assert s.topics.credential_updated == "iot.credential-updated.v1"
    assert s.topics.rebind_failed == "iot.rebind-failed.v1"
    assert s.topics.dead_letter == "asset.device-swapped.v1.dlq"
    assert s.topics.retry == "device-rebind.retry.v1"
    assert s.platform.rate_limit_per_minute == 100
    assert s.platform.rate_window_seconds == 60.0
    assert s.platform.default_timeout == 0
    assert s.http.port == 0  # the fixture's; the default is checked below
    assert HttpSettings().port == 8080
    assert (s.log.level, s.log.format) == ("INFO", "json")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REBIND_PLATFORM__RATE_LIMIT_PER_MINUTE", "0"),
        ("REBIND_PLATFORM__RATE_LIMIT_PER_MINUTE", "lots"),
        ("REBIND_PLATFORM__RATE_WINDOW_SECONDS", "0"),
        ("REBIND_PLATFORM__RATE_WINDOW_SECONDS", "3601"),
        ("REBIND_PLATFORM__DEFAULT_TIMEOUT", "-1"),
        ("REBIND_PLATFORM__BASE_URL", "not a url"),
        ("REBIND_HTTP__PORT", "70000"),
        ("REBIND_LOG__FORMAT", "xml"),
        ("REBIND_KAFKA__SECURITY_PROTOCOL", "CARRIER_PIGEON"),
    ],
)
def test_a_bad_value_names_its_variable(env: pytest.MonkeyPatch, name: str, value: str) -> None:
    env.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert name in str(info.value)
    assert "s3cr3t-value" not in str(info.value)


def test_missing_required_variables_are_each_named(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in REQUIRED:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as info:
        load_settings()
    for name in REQUIRED:
        assert name in str(info.value)


def test_sasl_needs_credentials(env: pytest.MonkeyPatch) -> None:
    env.setenv("REBIND_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    env.setenv("REBIND_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    with pytest.raises(ConfigError, match="REBIND_KAFKA__SASL_USERNAME"):
        load_settings()


def test_client_cert_and_key_go_together(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "client.pem").write_text("x")
    env.setenv("REBIND_PLATFORM__CLIENT_CERT", str(tmp_path / "client.pem"))
    with pytest.raises(ConfigError, match="REBIND_PLATFORM__CLIENT_KEY"):
        load_settings()


def test_check_config_masks_secrets(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("REBIND_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    env.setenv("REBIND_KAFKA__SASL_MECHANISM", "PLAIN")
    env.setenv("REBIND_KAFKA__SASL_USERNAME", "svc")
    env.setenv("REBIND_KAFKA__SASL_PASSWORD", "kafka-pa55")
    assert main(["check-config"]) == 0
    printed = capsys.readouterr().out
    assert "s3cr3t-value" not in printed
    assert "kafka-pa55" not in printed
    assert "REBIND_PLATFORM__SECRET=**********" in printed
    assert "REBIND_KAFKA__SASL_PASSWORD=**********" in printed
    assert "REBIND_PLATFORM__APP_ID=app-1" in printed
    assert masked(load_settings())["REBIND_PLATFORM__RATE_LIMIT_PER_MINUTE"] == 100


def test_check_config_fails_with_one_message(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("REBIND_HTTP__PORT", "http")
    assert main(["check-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "REBIND_HTTP__PORT" in err[0]


# ---- issue 12: validation an operator can act on -------------------------------------------


@pytest.mark.parametrize("value", ["", "   ", "\n"])
def test_an_empty_secret_is_refused(env: pytest.MonkeyPatch, value: str) -> None:
    env.setenv("REBIND_PLATFORM__SECRET", value)
    with pytest.raises(ConfigError, match=r"REBIND_PLATFORM__SECRET: is empty"):
        load_settings()


def test_secrets_lose_surrounding_whitespace(env: pytest.MonkeyPatch) -> None:
    """`echo s3cr3t > f; kubectl create secret --from-file=f` mounts 's3cr3t\\n'."""
    env.setenv("REBIND_PLATFORM__SECRET", "  s3cr3t-value\n")
    env.setenv("REBIND_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    env.setenv("REBIND_KAFKA__SASL_MECHANISM", "PLAIN")
    env.setenv("REBIND_KAFKA__SASL_USERNAME", "svc")
    env.setenv("REBIND_KAFKA__SASL_PASSWORD", "kafka-pa55\r\n")
    s = load_settings()
    assert s.platform.secret.get_secret_value() == "s3cr3t-value"
    assert s.kafka.sasl_password is not None
    assert s.kafka.sasl_password.get_secret_value() == "kafka-pa55"


@pytest.mark.parametrize(
    ("wrong", "nearest"),
    [
        ("REBIND_PLATFROM__SECRET", "REBIND_PLATFORM__SECRET"),
        ("REBIND_KAFKA__BOOTSTRAP_SERVER", "REBIND_KAFKA__BOOTSTRAP_SERVERS"),
        ("rebind_platform__rate_limit_per_minut", "REBIND_PLATFORM__RATE_LIMIT_PER_MINUTE"),
    ],
)
def test_unknown_variables_are_refused_with_the_nearest_name(
    env: pytest.MonkeyPatch, wrong: str, nearest: str
) -> None:
    env.setenv(wrong, "1")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert f"{wrong}: unknown variable; did you mean {nearest}?" in message
    assert "Extra inputs" not in message


def test_an_unknown_variable_without_a_near_name_points_at_the_list(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("REBIND_SOMETHING_ELSE", "1")
    with pytest.raises(ConfigError, match=r"REBIND_SOMETHING_ELSE: unknown variable; no setting"):
        load_settings()


def test_the_kafka_tools_refuse_unknown_variables_too(env: pytest.MonkeyPatch) -> None:
    env.setenv("REBIND_KAFAK__GROUP_ID", "g")
    with pytest.raises(ConfigError, match="did you mean REBIND_KAFKA__GROUP_ID"):
        load_kafka_settings()


@pytest.mark.parametrize(
    ("low", "high", "low_value"),
    [
        ("RETRY_BACKOFF_INITIAL_SECONDS", "RETRY_BACKOFF_MAX_SECONDS", "31"),
        ("ONLINE_RETRY_INITIAL_SECONDS", "ONLINE_RETRY_MAX_SECONDS", "901"),
        ("REQUEST_TIMEOUT_SECONDS", "ATTEMPT_DEADLINE_SECONDS", "301"),
    ],
)
def test_cross_field_rules_name_both_variables(
    env: pytest.MonkeyPatch, low: str, high: str, low_value: str
) -> None:
    if low == "REQUEST_TIMEOUT_SECONDS":
        env.setenv("REBIND_PLATFORM__ATTEMPT_DEADLINE_SECONDS", "200")
        low_value = "250"
    env.setenv(f"REBIND_PLATFORM__{low}", low_value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert f"REBIND_PLATFORM__{low}={low_value} is more than REBIND_PLATFORM__{high}=" in message
    assert "invalid configuration: REBIND_PLATFORM__" in message  # a variable, not a section
    assert "Value error" not in message


def test_kafka_connect_backoff_order(env: pytest.MonkeyPatch) -> None:
    env.setenv("REBIND_KAFKA__CONNECT_BACKOFF_INITIAL_SECONDS", "60")
    with pytest.raises(ConfigError, match="CONNECT_BACKOFF_INITIAL_SECONDS=60 is more than"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("REBIND_KAFKA__SECURITY_PROTOCOL", "plaintext", "PLAINTEXT"),
        ("REBIND_KAFKA__SECURITY_PROTOCOL", "Ssl", "SSL"),
        ("REBIND_LOG__LEVEL", "debug", "DEBUG"),
        ("REBIND_LOG__FORMAT", "JSON", "json"),
        ("REBIND_KAFKA__SASL_MECHANISM", "scram-sha-512", "SCRAM-SHA-512"),
    ],
)
def test_enums_ignore_case(env: pytest.MonkeyPatch, name: str, value: str, expected: str) -> None:
    env.setenv(name, value)
    assert masked(load_settings())[name] == expected


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("REBIND_PLATFORM__BASE_URL", "iot.example.com", "is not a URL; expected e.g. https://"),
        ("REBIND_PLATFORM__BASE_URL", "ftp://iot.example.com", "must start with http"),
        ("REBIND_PLATFORM__RATE_LIMIT_PER_MINUTE", "0", "must be 1 or more"),
        ("REBIND_PLATFORM__RATE_LIMIT_PER_MINUTE", "lots", "must be a whole number"),
        ("REBIND_PLATFORM__VERIFY_TLS", "perhaps", "must be true or false"),
        ("REBIND_LOG__FORMAT", "xml", "must be one of 'json' or 'console' (any case)"),
        ("REBIND_KAFKA__GROUP_ID", "", "is empty"),
    ],
)
def test_messages_are_plain_words(
    env: pytest.MonkeyPatch, name: str, value: str, words: str
) -> None:
    env.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert f"{name}: {words}" in str(info.value)
    assert "relative URL without a base" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("kafka:notaport", "'kafka:notaport' is not host:port"),
        (" , ", "names no broker"),
        ("kafka", "'kafka' is not host:port"),
        ("kafka:0", "'kafka:0' is not host:port"),
        ("kafka:70000", "'kafka:70000' is not host:port"),
    ],
)
def test_bootstrap_servers_are_host_port_lists(
    env: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    env.setenv("REBIND_KAFKA__BOOTSTRAP_SERVERS", value)
    with pytest.raises(ConfigError, match=f"REBIND_KAFKA__BOOTSTRAP_SERVERS: {problem}"):
        load_settings()


def test_bootstrap_servers_are_normalised(env: pytest.MonkeyPatch) -> None:
    env.setenv("REBIND_KAFKA__BOOTSTRAP_SERVERS", " kafka-0:9092 , [::1]:9093,")
    assert load_settings().kafka.bootstrap_servers == "kafka-0:9092,[::1]:9093"


@pytest.mark.parametrize(
    "name",
    [
        "REBIND_PLATFORM__CA_BUNDLE",
        "REBIND_KAFKA__SSL_CAFILE",
    ],
)
def test_files_must_exist(env: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    env.setenv("REBIND_KAFKA__SECURITY_PROTOCOL", "SSL")
    env.setenv(name, str(tmp_path / "absent.pem"))
    with pytest.raises(ConfigError, match=f"{name}: no such file: .*absent.pem"):
        load_settings()
    env.setenv(name, str(tmp_path))
    with pytest.raises(ConfigError, match=f"{name}: not a file"):
        load_settings()
    (tmp_path / "ca.pem").write_text("x")
    env.setenv(name, str(tmp_path / "ca.pem"))
    load_settings()


def test_client_cert_and_key_must_be_readable(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("x")
    env.setenv("REBIND_PLATFORM__CLIENT_CERT", str(cert))
    env.setenv("REBIND_PLATFORM__CLIENT_KEY", str(tmp_path / "client.key"))
    assert main(["check-config"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "REBIND_PLATFORM__CLIENT_KEY: no such file" in line
    assert "REBIND_PLATFORM__CLIENT_CERT" not in line


def test_check_config_refuses_an_http_port_in_use(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env.setenv("REBIND_HTTP__HOST", "127.0.0.1")
        env.setenv("REBIND_HTTP__PORT", str(taken.getsockname()[1]))
        assert main(["check-config"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "REBIND_HTTP__PORT: port" in line
    assert "is already in use" in line


def test_check_config_defaults_needs_no_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in REQUIRED:
        monkeypatch.delenv(name, raising=False)
    assert main(["check-config", "--defaults"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = dict(line.split("=", 1) for line in lines)
    assert set(table) == set(variables())
    assert table["REBIND_PLATFORM__BASE_URL"] == "<required>"
    assert table["REBIND_PLATFORM__SECRET"] == "<required>"
    assert table["REBIND_KAFKA__BOOTSTRAP_SERVERS"] == "localhost:9092"
    assert table["REBIND_KAFKA__INSTANCE_ID"] == "<host name>"
    assert table["REBIND_PLATFORM__VERIFY_TLS"] == "true"
    assert table["REBIND_KAFKA__SASL_PASSWORD"] == ""
    assert main(["check-config", "--defaults", "--format", "json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["REBIND_PLATFORM__RATE_LIMIT_PER_MINUTE"] == 100
