"""Kafka security settings and client options, without a broker: TLS files, mutual TLS, SASL,
OAUTHBEARER's token file, how refusals are explained, and the ACL set the docs show."""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import pytest
import yaml
from aiokafka import errors as kafka_errors
from pydantic import SecretStr

from service import cli, logs
from service.config import (
    SECRET_MASK,
    BindSettings,
    ConfigError,
    KafkaSettings,
    SecurityProtocol,
    TopicSettings,
    variables,
)
from service.config import load_settings as load
from service.kafka import (
    FileTokenProvider,
    KafkaAccessError,
    KafkaAuthenticationError,
    KafkaTlsError,
    KafkaTokenFileError,
    classify_startup_error,
    client_options,
)
from service.kafka_access import (
    AclRequirement,
    kafka_acls_commands,
    replay_acls,
    service_acls,
    strimzi_acls,
    transactional_id_prefix,
)
from service.kafka_access import main as kafka_access_main
from service.kafka_connection import explain_connection_error
from tests.support.secured_kafka import Pki, generate_pki

REPO = Path(__file__).resolve().parents[2]
ADDRESS = "kafka-0:9093"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return generate_pki(tmp_path_factory.mktemp("pki"))


def tls(pki: Pki, **fields: object) -> KafkaSettings:
    return KafkaSettings(
        **{"security_protocol": SecurityProtocol.SSL, "ssl_cafile": pki.ca, **fields}
    )


# ---------------------------------------------------------------------------- settings


ALL_SECURITY_ENV = {
    "REBIND_KAFKA__BOOTSTRAP_SERVERS": ADDRESS,
    "REBIND_KAFKA__SECURITY_PROTOCOL": "sasl_ssl",
    "REBIND_KAFKA__SASL_MECHANISM": "oauthbearer",
    "REBIND_KAFKA__SASL_OAUTH_TOKEN_FILE": "{token}",
    "REBIND_KAFKA__SASL_USERNAME": "rebind",  # (PLAIN and SCRAM; OAUTHBEARER ignores them)
    "REBIND_KAFKA__SASL_PASSWORD": "sasl-password-1",
    "REBIND_KAFKA__SSL_CAFILE": "{pki.ca}",
    "REBIND_KAFKA__SSL_CERTFILE": "{pki.service.cert}",
    "REBIND_KAFKA__SSL_KEYFILE": "{pki.service_encrypted_key}",
    "REBIND_KAFKA__SSL_KEY_PASSWORD": "{pki.key_password}\n",
    "REBIND_KAFKA__SSL_CHECK_HOSTNAME": "false",
}
"""Every Kafka security variable, as an operator would set them (case-insensitive enums, a
trailing newline on a secret from a file)."""


def test_environment_variables_reach_every_security_setting(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_text("header.payload.")
    env = {name: value.format(pki=pki, token=token) for name, value in ALL_SECURITY_ENV.items()}
    env |= {
        "REBIND_PLATFORM__BASE_URL": "https://iot.example.com:8743",
        "REBIND_PLATFORM__APP_ID": "app",
        "REBIND_PLATFORM__SECRET": "app-secret-123",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    kafka = load().kafka
    assert kafka.security_protocol is SecurityProtocol.SASL_SSL
    assert kafka.sasl_mechanism == "OAUTHBEARER"
    assert kafka.sasl_oauth_token_file == token
    assert kafka.ssl_certfile == pki.service.cert
    assert kafka.ssl_keyfile == pki.service_encrypted_key
    assert kafka.ssl_key_password is not None
    assert kafka.ssl_key_password.get_secret_value() == pki.key_password  # stripped
    assert kafka.ssl_check_hostname is False
    assert KafkaSettings().ssl_check_hostname is True


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"ssl_certfile": "CERT"},
            "SSL_CERTFILE and REBIND_KAFKA__SSL_KEYFILE must be set together",
        ),
        ({"ssl_keyfile": "KEY"}, "SSL_CERTFILE and REBIND_KAFKA__SSL_KEYFILE must be set together"),
        (
            {"ssl_key_password": "pw-pw-pw-pw"},
            "REBIND_KAFKA__SSL_KEY_PASSWORD is set without REBIND_KAFKA__SSL_KEYFILE",
        ),
        (
            {"security_protocol": "PLAINTEXT", "ssl_cafile": "CA"},
            "REBIND_KAFKA__SSL_CAFILE need REBIND_KAFKA__SECURITY_PROTOCOL=SSL or SASL_SSL",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"},
            "needs REBIND_KAFKA__SASL_OAUTH_TOKEN_FILE",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512"},
            "needs REBIND_KAFKA__SASL_USERNAME, REBIND_KAFKA__SASL_PASSWORD",
        ),
        (
            {"sasl_mechanism": "PLAIN", "sasl_oauth_token_file": "CA"},
            "REBIND_KAFKA__SASL_OAUTH_TOKEN_FILE is used only with "
            "REBIND_KAFKA__SASL_MECHANISM=OAUTHBEARER",
        ),
    ],
)
def test_incomplete_or_unused_security_settings_are_refused(
    pki: Pki, fields: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = {"CERT": pki.service.cert, "KEY": pki.service.key, "CA": pki.ca}
    monkeypatch.setenv("REBIND_PLATFORM__BASE_URL", "https://iot.example.com:8743")
    monkeypatch.setenv("REBIND_PLATFORM__APP_ID", "app")
    monkeypatch.setenv("REBIND_PLATFORM__SECRET", "app-secret-123")
    monkeypatch.setenv("REBIND_KAFKA__SECURITY_PROTOCOL", "SSL")
    for name, value in fields.items():
        monkeypatch.setenv(f"REBIND_KAFKA__{name.upper()}", str(paths.get(value, value)))
    with pytest.raises(ConfigError) as raised:
        load()
    assert message in str(raised.value)


# ---------------------------------------------------------------------------- client options


def test_plaintext_options_carry_no_tls_and_no_sasl() -> None:
    options = client_options(KafkaSettings(bootstrap_servers=ADDRESS))
    assert options["security_protocol"] == "PLAINTEXT"
    assert "ssl_context" not in options
    assert "sasl_mechanism" not in options


def test_tls_context_trusts_the_ca_file_and_checks_host_names(pki: Pki) -> None:
    context = client_options(tls(pki))["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert any("device-rebind test Kafka CA" in str(c) for c in context.get_ca_certs())
    relaxed = client_options(tls(pki, ssl_check_hostname=False))["ssl_context"]
    assert relaxed.check_hostname is False
    assert relaxed.verify_mode == ssl.CERT_REQUIRED  # the chain is still verified


def test_mutual_tls_loads_an_encrypted_key_with_its_password(pki: Pki) -> None:
    settings = tls(
        pki,
        ssl_certfile=pki.service.cert,
        ssl_keyfile=pki.service_encrypted_key,
        ssl_key_password=SecretStr(pki.key_password),
    )
    assert isinstance(client_options(settings)["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize(
    ("key", "password", "message"),
    [
        (
            "encrypted",
            None,
            "REBIND_KAFKA__SSL_KEYFILE is encrypted: set REBIND_KAFKA__SSL_KEY_PASSWORD",
        ),
        ("encrypted", "wrong-password", "REBIND_KAFKA__SSL_KEY_PASSWORD does not decrypt"),
        ("other", None, "the private key does not belong to the certificate"),
    ],
)
def test_unusable_key_pairs_are_named(
    pki: Pki, key: str, password: str | None, message: str
) -> None:
    keyfile = pki.service_encrypted_key if key == "encrypted" else pki.admin.key
    settings = tls(
        pki,
        ssl_certfile=pki.service.cert,
        ssl_keyfile=keyfile,
        ssl_key_password=SecretStr(password) if password else None,
    )
    with pytest.raises(KafkaTlsError) as raised:
        client_options(settings)
    assert message in raised.value.reason
    assert raised.value.retry  # files: the next attempt reads them again


def test_files_are_read_again_for_every_set_of_clients(pki: Pki, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca.read_bytes())
    settings = tls(pki, ssl_cafile=ca)
    assert client_options(settings)["ssl_context"]
    ca.write_text("not a certificate\n")  # a Secret being rotated, half written
    with pytest.raises(KafkaTlsError, match=r"REBIND_KAFKA__SSL_CAFILE: .* holds no usable CA"):
        client_options(settings)
    ca.unlink()
    with pytest.raises(KafkaTlsError, match="REBIND_KAFKA__SSL_CAFILE: cannot read"):
        client_options(settings)
    ca.write_bytes(pki.ca.read_bytes())
    assert client_options(settings)["ssl_context"]


def test_scram_options(pki: Pki) -> None:
    settings = tls(
        pki,
        security_protocol=SecurityProtocol.SASL_SSL,
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="rebind",
        sasl_password=SecretStr("scram-password-1"),
    )
    options = client_options(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "rebind"
    assert options["sasl_plain_password"] == "scram-password-1"


async def test_the_oauth_token_file_is_read_at_every_connection_and_redacted(
    pki: Pki, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    settings = tls(
        pki,
        security_protocol=SecurityProtocol.SASL_SSL,
        sasl_mechanism="OAUTHBEARER",
        sasl_oauth_token_file=token_file,
    )
    provider = client_options(settings)["sasl_oauth_token_provider"]
    assert isinstance(provider, FileTokenProvider)
    with pytest.raises(KafkaTokenFileError, match="cannot read the token") as missing:
        await provider.token()
    assert isinstance(missing.value, kafka_errors.KafkaConnectionError)  # aiokafka retries
    token_file.write_text("\n")
    with pytest.raises(KafkaAuthenticationError, match="is empty"):
        await provider.token()
    token_file.write_text("first-token-value\n")
    assert await provider.token() == "first-token-value"
    token_file.write_text("second-token-value")
    assert await provider.token() == "second-token-value"
    assert logs.redact_text("got first-token-value and second-token-value") == (
        f"got {logs.MASK} and {logs.MASK}"
    )


# ---------------------------------------------------------------------------- explanations


def _verify_error(message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_message = message
    error.reason = "CERTIFICATE_VERIFY_FAILED"
    return error


def _alert(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] alert (_ssl.c:2580)")
    error.reason = reason
    return error


def _wrapped(cause: BaseException) -> kafka_errors.KafkaConnectionError:
    """As aiokafka reports a connection the peer broke: the cause is chained."""
    error = kafka_errors.KafkaConnectionError(f"Connection at {ADDRESS} closed")
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("cause", "fields", "words", "retry"),
    [
        (
            _verify_error("unable to get local issuer certificate"),
            {},
            "the broker's certificate at kafka-0:9093 is not trusted (unable to get local issuer "
            "certificate): REBIND_KAFKA__SSL_CAFILE",
            True,
        ),
        (
            _verify_error("certificate has expired"),
            {},
            "the broker's certificate at kafka-0:9093 has expired",
            True,
        ),
        (
            _verify_error("IP address mismatch, certificate is not valid for '10.0.0.1'."),
            {},
            "does not name that host",
            True,
        ),
        (
            _wrapped(_alert("TLSV13_ALERT_CERTIFICATE_REQUIRED")),
            {},
            "it asks for a client certificate (mutual TLS); set REBIND_KAFKA__SSL_CERTFILE",
            True,
        ),
        (
            _wrapped(_alert("SSLV3_ALERT_CERTIFICATE_UNKNOWN")),
            {"mtls": True},
            "refused the client certificate REBIND_KAFKA__SSL_CERTFILE (CN=rebind-mtls",
            True,
        ),
        (
            _alert("WRONG_VERSION_NUMBER"),
            {},
            "does not speak TLS",
            False,
        ),
        (
            kafka_errors.SaslAuthenticationFailed(
                "Authentication failed during authentication due to invalid credentials with "
                "SASL mechanism SCRAM-SHA-512"
            ),
            {"scram": True},
            "kafka: SASL SCRAM-SHA-512: the broker at kafka-0:9093 refused user 'rebind': "
            "Authentication failed",
            False,
        ),
        (
            kafka_errors.UnsupportedSaslMechanismError("Enabled mechanisms are: ['PLAIN']"),
            {"scram": True},
            "does not offer SCRAM-SHA-512",
            False,
        ),
    ],
)
def test_refusals_are_explained_in_one_line(
    pki: Pki, cause: BaseException, fields: dict[str, bool], words: str, retry: bool
) -> None:
    settings = tls(pki)
    if fields.get("mtls"):
        settings = tls(pki, ssl_certfile=pki.service.cert, ssl_keyfile=pki.service.key)
    if fields.get("scram"):
        settings = tls(
            pki,
            security_protocol=SecurityProtocol.SASL_SSL,
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="rebind",
            sasl_password=SecretStr("scram-password-1"),
        )
    problem = explain_connection_error(cause, ADDRESS, settings)
    assert isinstance(problem, KafkaAccessError)
    assert words in problem.reason
    assert "\n" not in problem.reason
    assert "scram-password-1" not in problem.reason
    assert problem.retry is retry
    permanent, line = classify_startup_error(problem)
    assert (permanent, line) == (not retry, problem.reason)


def test_an_unreachable_broker_is_not_an_access_problem(pki: Pki) -> None:
    assert (
        explain_connection_error(ConnectionRefusedError(111, "refused"), ADDRESS, tls(pki)) is None
    )


# ---------------------------------------------------------------------------- ACLs


def test_the_service_acl_set_is_exactly_the_documented_one() -> None:
    kafka, topics = KafkaSettings(), TopicSettings()
    acls = service_acls(kafka, topics)
    assert transactional_id_prefix(kafka) == "device-rebind-device-rebind-"
    table = {(a.resource, a.name, a.pattern, a.operation) for a in acls}
    assert len(table) == len(acls) == 18
    assert ("Topic", topics.device_swapped, "LITERAL", "Read") in table
    # the urgent lane: read, and written when a misrouted urgent swap is forwarded (issue 23)
    assert {("Topic", topics.device_swapped_urgent, "LITERAL", op) for op in ("Read", "Write")} <= (
        table
    )
    # misrouted swaps are forwarded to their key's partition of the input (issue 19, item 4)
    assert ("Topic", topics.device_swapped, "LITERAL", "Write") in table
    outputs = (topics.credential_updated, topics.rebind_failed, topics.dead_letter)
    for output in (*outputs, topics.device_rebound):
        assert ("Topic", output, "LITERAL", "Write") in table
        assert ("Topic", output, "LITERAL", "Read") not in table
    for own in (topics.ledger, topics.dedupe, topics.token, topics.budget):
        assert {("Topic", own, "LITERAL", op) for op in ("Read", "Write")} <= table
    assert ("Group", "device-rebind", "LITERAL", "Read") in table
    assert ("TransactionalId", "device-rebind-device-rebind-", "PREFIXED", "Write") in table
    # no Describe (implied by Read/Write), no Create (topics are created beforehand), no
    # IdempotentWrite (implied by Write on a topic since Kafka 2.8)
    assert not {a.operation for a in acls} & {"Describe", "Create", "IdempotentWrite"}
    # the transactional ids of every partition fall under the prefix
    from service.pipeline.committer import transactional_id  # noqa: PLC0415

    assert transactional_id(kafka, topics.device_swapped, 11).startswith(
        transactional_id_prefix(kafka)
    )


def _acl_line(line: str) -> set[tuple[str, str, str, str]]:
    """(resource, name, pattern, operation) of one ``kafka-acls.sh --add`` command or one line
    of the docs' ``acl`` shell function."""
    resource = re.search(r"--(topic|group|transactional-id) '?([^' ]+)'?", line)
    assert resource is not None, line
    kind = {"topic": "Topic", "group": "Group", "transactional-id": "TransactionalId"}
    pattern = "PREFIXED" if "--resource-pattern-type prefixed" in line else "LITERAL"
    return {
        (kind[resource.group(1)], resource.group(2), pattern, operation)
        for operation in re.findall(r"--operation (\w+)", line)
    }


def _documented_acls(text: str) -> set[tuple[str, str, str, str]]:
    """The ``acl ...`` lines of the docs' "the service's ACLs" shell block."""
    block = re.search(r"# the service's ACLs \(default names\)\n(.*?)```", text, re.S)
    assert block is not None, "the kafka-acls example is missing"
    found: set[tuple[str, str, str, str]] = set()
    for line in block.group(1).splitlines():
        if line.startswith("acl --"):
            found |= _acl_line(line)
    return found


def _documented_strimzi(text: str) -> set[tuple[str, str, str, str]]:
    block = re.search(r"# device-rebind KafkaUser\n(.*?)```", text, re.S)
    assert block is not None, "the Strimzi KafkaUser example is missing"
    user = yaml.safe_load(block.group(1))
    kinds = {"topic": "Topic", "group": "Group", "transactionalId": "TransactionalId"}
    return {
        (
            kinds[a["resource"]["type"]],
            a["resource"]["name"],
            a["resource"]["patternType"].upper(),
            op,
        )
        for a in user["spec"]["authorization"]["acls"]
        for op in a["operations"]
    }


@pytest.mark.parametrize("doc", ["docs/deploying.md", "helm/device-rebind/README.md"])
def test_the_docs_grant_exactly_the_service_acl_set(doc: str) -> None:
    text = (REPO / doc).read_text()
    expected = {
        (a.resource, a.name, a.pattern, a.operation)
        for a in service_acls(KafkaSettings(), TopicSettings())
    }
    assert _documented_acls(text) == expected
    assert _documented_strimzi(text) == expected


def test_rendered_commands_and_strimzi_block_cover_every_entry() -> None:
    acls = [*service_acls(KafkaSettings(), TopicSettings()), *replay_acls(TopicSettings())]
    commands = kafka_acls_commands(acls)
    rendered = set().union(*(_acl_line(c) for c in commands))
    assert rendered == {(a.resource, a.name, a.pattern, a.operation) for a in acls}
    assert all("--add --allow-principal 'User:device-rebind'" in c for c in commands)
    entries = strimzi_acls(acls)
    assert sum(len(e["operations"]) for e in entries) == len(acls)
    prefixed = [e for e in entries if e["resource"]["type"] == "transactionalId"]
    assert prefixed == [
        {
            "resource": {
                "type": "transactionalId",
                "name": "device-rebind-device-rebind-",
                "patternType": "prefixed",
            },
            "operations": ["Write"],
            "host": "*",
        }
    ]


def test_acl_descriptions_name_the_resource() -> None:
    assert AclRequirement("Topic", "t", "Read").describe() == "Read on topic 't'"
    assert AclRequirement("Group", "g", "Read").describe() == "Read on group 'g'"
    assert (
        AclRequirement("TransactionalId", "p-g-", "Write", "PREFIXED").describe()
        == "Write on transactional ids prefixed 'p-g-'"
    )


def test_a_callback_url_adds_the_bind_notify_topic_and_no_watch_drops_device_rebound() -> None:
    kafka, topics = KafkaSettings(), TopicSettings()
    pushed = BindSettings(
        callback_url="https://rebind.example.com:8443/push",
        path_secret=SecretStr("Zr4r2m0d3f7pQx9sK1vB8w-x"),
    )
    names = {(a.name, a.operation) for a in service_acls(kafka, topics, pushed)}
    assert {(topics.bind_notify, "Read"), (topics.bind_notify, "Write")} <= names
    quiet = BindSettings(poll=False)
    assert topics.device_rebound not in {a.name for a in service_acls(kafka, topics, quiet)}


def test_the_acl_printer_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REBIND_TOPICS__LEDGER", "acme.ledger")
    monkeypatch.setenv("REBIND_KAFKA__GROUP_ID", "acme")
    assert kafka_access_main(["--principal", "User:acme-rebind"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 12
    assert "--operation Read --operation Write --topic 'acme.ledger'" in out
    assert "--transactional-id 'device-rebind-acme-' --resource-pattern-type prefixed" in out
    assert all("--allow-principal 'User:acme-rebind'" in line for line in lines)
    assert kafka_access_main(["--format", "strimzi"]) == 0
    block = yaml.safe_load(capsys.readouterr().out)
    assert {"type": "group", "name": "acme", "patternType": "literal"} in [
        e["resource"] for e in block["acls"]
    ]
    assert kafka_access_main(["--for", "replay"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


SECURED_SECTION = re.compile(r"^## Connecting to a secured cluster$(.*?)^## ", re.S | re.M)


def test_every_variable_of_the_secured_cluster_docs_exists_and_is_tested() -> None:
    text = (REPO / "docs/deploying.md").read_text()
    section = SECURED_SECTION.search(text)
    assert section is not None
    named = set(re.findall(r"REBIND_[A-Z0-9_]+", section.group(1)))
    named = {n for n in named if not n.endswith("_")}  # prefixes such as CONNECT_BACKOFF_*
    known = set(variables())
    assert named - known == set(), "the docs name variables the service does not have"
    security = {n for n in named if re.match(r"REBIND_KAFKA__(SSL|SASL|SECURITY)", n)}
    assert security <= set(ALL_SECURITY_ENV), "a documented security variable is not tested"
    # the examples' other variables are plain settings, loaded by every env-driven test
    assert named - security <= {
        "REBIND_KAFKA__BOOTSTRAP_SERVERS",
        "REBIND_KAFKA__GROUP_ID",
        "REBIND_KAFKA__TRANSACTIONAL_ID_PREFIX",
        "REBIND_BIND__CALLBACK_URL",
    }


def test_check_config_masks_the_kafka_secrets(
    pki: Pki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJub25lIn0.eyJzdWIiOiJyZWJpbmQifQ.\n")
    for name, value in ALL_SECURITY_ENV.items():
        monkeypatch.setenv(name, value.format(pki=pki, token=token))
    monkeypatch.setenv("REBIND_PLATFORM__BASE_URL", "https://iot.example.com:8743")
    monkeypatch.setenv("REBIND_PLATFORM__APP_ID", "app")
    monkeypatch.setenv("REBIND_PLATFORM__SECRET", "app-secret-123")
    assert cli.main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert f"REBIND_KAFKA__SSL_KEY_PASSWORD={SECRET_MASK}" in out
    assert f"REBIND_KAFKA__SASL_PASSWORD={SECRET_MASK}" in out
    assert f"REBIND_KAFKA__SASL_OAUTH_TOKEN_FILE={token}" in out  # the path, never the token
    for secret in (pki.key_password, "sasl-password-1", token.read_text().strip()):
        assert secret not in out
