from __future__ import annotations

import pytest

from service.cli import main
from service.config import ConfigError, load_settings, masked

REQUIRED = {
    "REBIND_PLATFORM__BASE_URL": "https://iot.example.test:8743",
    "REBIND_PLATFORM__APP_ID": "app-1",
    "REBIND_PLATFORM__SECRET": "s3cr3t-value",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name, value in REQUIRED.items():
        monkeypatch.setenv(name, value)
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
    assert s.platform.default_timeout == 0
    assert s.http.port == 8080
    assert (s.log.level, s.log.format) == ("INFO", "json")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REBIND_PLATFORM__RATE_LIMIT_PER_MINUTE", "0"),
        ("REBIND_PLATFORM__RATE_LIMIT_PER_MINUTE", "lots"),
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


def test_client_cert_and_key_go_together(env: pytest.MonkeyPatch) -> None:
    env.setenv("REBIND_PLATFORM__CLIENT_CERT", "/etc/certs/client.pem")
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
