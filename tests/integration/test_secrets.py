"""Secrets stay secret: not in logs, /metrics, outputs, dead letters, ledger or dedupe records.

The secrets are known: a distinctive application secret (the simulator's home app is given it),
every access and refresh token the simulator issues (captured from its in-process state, and
checked against the fingerprints of the tokens it received in Authorization headers), a SASL
password and the PEM text of the platform client key. The service runs through ``app.run`` (its
"starting" line included) with JSON logs at DEBUG captured; a wrong secret (100208, the login
refused and retried while the input is held) covers the error paths.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from service import app, cli, logs
from service.config import SECRET_MASK, HttpSettings, LogSettings, Settings
from tests.fixtures.kafka import Topics
from tests.fixtures.service import Harness
from tests.fixtures.simulator import SimulatorHandle
from tests.simulator.certs import CertPaths
from tests.simulator.control import SimulatorControl
from tests.simulator.server import Simulator, SimulatorThread
from tests.simulator.state import HOME_APP_ID, App, fingerprint
from tests.support.events import Received, swap_event
from tests.support.exposition import get, scrape
from tests.support.kafka_broker import KafkaBroker
from tests.support.logcapture import captured_logs
from tests.support.prometheus import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

SASL_PASSWORD = "SaslPw-" + secrets.token_hex(8)


@dataclass
class PrivateSimulator:
    """A simulator of this module's own, so its state (the issued tokens) can be read."""

    handle: SimulatorHandle
    simulator: Simulator
    issued: list[str] = field(default_factory=list)

    @property
    def control(self) -> SimulatorControl:
        return self.handle.control


@pytest.fixture
def private_sim() -> Iterator[PrivateSimulator]:
    simulator = Simulator("127.0.0.1", 0)
    runner = SimulatorThread(simulator)
    url = runner.start()
    app_secret = "AppS3cret-" + secrets.token_hex(8)
    state = simulator.state
    state.upsert_app(HOME_APP_ID, app_secret)
    private = PrivateSimulator(
        SimulatorHandle(url=url, control=SimulatorControl(url), secret=app_secret), simulator
    )
    issue = state.issue_tokens

    def recording_issue(target: App) -> dict[str, Any]:
        answer = issue(target)
        private.issued.extend([answer["accessToken"], answer["refreshToken"]])
        return answer

    state.issue_tokens = recording_issue  # type: ignore[method-assign,assignment]
    try:
        yield private
    finally:
        runner.stop()


def key_material(certs: CertPaths) -> list[str]:
    """The client key's PEM text and each of its base64 lines (a partial leak counts too)."""
    pem = certs.client_key.read_text()
    return [pem, *(line for line in pem.splitlines() if line and not line.startswith("-----"))]


def assert_absent(secret_values: list[str], where: str, text: str) -> None:
    for value in secret_values:
        assert value not in text, f"a secret ({value[:6]}...) appears in {where}"


def record_text(record: Received) -> str:
    parts = [
        (record.key or b"").decode("utf-8", "replace"),
        (record.value or b"").decode("utf-8", "replace"),
    ]
    parts.extend(f"{k}={v.decode('utf-8', 'replace')}" for k, v in record.headers)
    return "\n".join(parts)


def settings_with_secrets(harness: Harness, certs: CertPaths, port: int) -> Settings:
    base = harness.settings()
    return base.model_copy(
        update={
            # PLAINTEXT broker: the SASL password is configured (and must not leak) but not used.
            "kafka": base.kafka.model_copy(
                update={"sasl_username": "rebind-svc", "sasl_password": SecretStr(SASL_PASSWORD)}
            ),
            # A real certificate and key: the client loads them into its TLS context.
            "platform": base.platform.model_copy(
                update={"client_cert": certs.client_cert, "client_key": certs.client_key}
            ),
            "http": HttpSettings(host="127.0.0.1", port=port),
            "log": LogSettings(level="DEBUG", format="json"),
        }
    )


async def run_app(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Task[int], Callable[[], None]]:
    """``app.run`` as a task, logging into the capture; returns it and a restore function."""
    monkeypatch.setattr(logs, "configure", lambda *_a, **_k: None)  # keep the capture
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    task = asyncio.create_task(app.run(settings), name="app.run")
    loop = asyncio.get_running_loop()

    def restore() -> None:
        for sig, handler in saved.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)

    return task, restore


async def test_no_secret_leaks_from_a_running_service(
    kafka_broker: KafkaBroker,
    topics: Topics,
    private_sim: PrivateSimulator,
    simulator_certs: CertPaths,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    control = private_sim.control
    harness = Harness(kafka_broker.bootstrap, topics, private_sim.handle)
    port = free_port()
    settings = settings_with_secrets(harness, simulator_certs, port)
    await control.seed_device("dev-sec-ok", "old-ok")
    await control.seed_device("dev-sec-again", "old-again")
    await control.seed_device("dev-sec-online", "old-online", status="ONLINE")

    with captured_logs(level="DEBUG", fmt="json") as cap:
        task, restore = await run_app(settings, monkeypatch)
        try:
            await wait_until(
                lambda: _ready(port, task),
                60,
                "the service ready on /readyz",
                ignore=(httpx.TransportError,),
            )
            await harness.produce([(b"dev-sec-ok", swap_event("dev-sec-ok", "new-ok"))])
            await harness.read(1)
            # the platform forgets the token: 1010005, one re-login, the call repeated
            await control.expire_token(HOME_APP_ID)
            await control.inject_error(401, "1010005", operation="refresh_key", times=1)
            await harness.produce(
                [
                    (b"dev-sec-again", swap_event("dev-sec-again", "new-again")),
                    (b"dev-sec-ghost", swap_event("dev-sec-ghost", "node-ghost")),
                    (b"dev-sec-bad", b'{"not": "a cloud event"}', [("trace", b"t-1")]),
                    (b"dev-sec-online", swap_event("dev-sec-online", "new-online")),
                ]
            )
            outputs = await harness.read(4, topics=[*harness.output_topics])
            # the service's own records: the ledger (a waiting swap carries the whole event) and
            # the duplicate memory (a copy of each outcome)
            retries = await harness.read(3, topics=[topics.ledger])
            retries += await harness.read(2, topics=[topics.dedupe])
            metrics = (await scrape(port)).text
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # app.run's own handler: drain and stop
            try:
                assert await asyncio.wait_for(task, 60) == 0
            finally:
                restore()

    platform_secret = settings.platform.secret.get_secret_value()
    assert len(private_sim.issued) >= 4  # two logins (or a login and a refresh) at least
    # the captured tokens are the ones the service sent as "Authorization: Bearer <token>"
    sent = {c["token_fp"] for c in await control.calls() if c["token_fp"]}
    assert sent
    assert sent <= {fingerprint(t) for t in private_sim.issued}
    known = [platform_secret, SASL_PASSWORD, *private_sim.issued, *key_material(simulator_certs)]

    lines = cap.lines()  # every line is JSON
    [starting] = [line for line in lines if line["event"] == "starting"]
    assert starting["platform"].startswith(private_sim.handle.url)
    assert any(line["event"] == "platform_call_rejected" for line in lines)  # error paths logged
    assert_absent(known, "the logs", cap.text)
    assert_absent(known, "/metrics", metrics)
    assert {o.topic for o in outputs} == {
        topics.credential_updated,
        topics.rebind_failed,
        topics.dead_letter,
    }
    for record in [*outputs, *retries]:
        assert_absent(known, f"a record on {record.topic}", record_text(record))


async def _ready(port: int, task: asyncio.Task[int]) -> bool:
    if task.done():
        task.result()
        pytest.fail(f"app.run returned {task.result()} before it was ready")
    return (await get(port, "/readyz")).status_code == 200


async def test_a_wrong_secret_holds_the_input_and_leaks_nothing(
    kafka_broker: KafkaBroker,
    topics: Topics,
    private_sim: PrivateSimulator,
) -> None:
    control = private_sim.control
    wrong = "WrongS3cret-" + secrets.token_hex(8)
    right = private_sim.handle.secret
    handle = SimulatorHandle(url=private_sim.handle.url, control=control, secret=wrong)
    harness = Harness(kafka_broker.bootstrap, topics, handle)
    await control.seed_device("dev-sec-login", "old-login")

    with captured_logs(level="DEBUG", fmt="json") as cap:
        service = await harness.start_service()
        await harness.produce([(b"dev-sec-login", swap_event("dev-sec-login", "new-login"))])
        port = service.ops.port

        async def retried() -> bool:
            return len(await control.calls(operation="login")) >= 2

        await wait_until(retried, timeout=30, what="the refused login retried")
        metrics = await scrape(port)
        readyz = await get(port, "/readyz")
        await harness.stop_all()

    # no rebind-failed: the swap waits for a secret the platform accepts, the input is held
    assert metrics.value("rebind_outcomes_total", outcome="rebind_failed") == 0
    assert metrics.value("rebind_platform_auth_blocked") == 1
    refused = metrics.value(
        "rebind_platform_requests_total", operation="login", http_status="401", error_code="100208"
    )
    assert refused is not None
    assert refused >= 2
    assert readyz.status_code == 503
    assert "100208" in readyz.text
    assert private_sim.issued == []
    known = [wrong, right]
    assert_absent(known, "the logs", cap.text)
    assert_absent(known, "/metrics", metrics.text)
    assert_absent(known, "/readyz", readyz.text)
    assert any(line.get("error_code") == "100208" for line in cap.lines())


def test_check_config_masks_every_secret(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    simulator_certs: CertPaths,
) -> None:
    app_secret = "AppS3cret-" + secrets.token_hex(8)
    for name, value in {
        "REBIND_PLATFORM__BASE_URL": "https://iot.example.com:8743",
        "REBIND_PLATFORM__APP_ID": "app-1",
        "REBIND_PLATFORM__SECRET": app_secret,
        "REBIND_PLATFORM__CLIENT_CERT": str(simulator_certs.client_cert),
        "REBIND_PLATFORM__CLIENT_KEY": str(simulator_certs.client_key),
        "REBIND_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "REBIND_KAFKA__SASL_MECHANISM": "PLAIN",
        "REBIND_KAFKA__SASL_USERNAME": "rebind-svc",
        "REBIND_KAFKA__SASL_PASSWORD": SASL_PASSWORD,
        "REBIND_HTTP__PORT": "0",  # check-config tries the port: any free one
    }.items():
        monkeypatch.setenv(name, value)
    known = [app_secret, SASL_PASSWORD, *key_material(simulator_certs)]
    for argv in (["check-config"], ["check-config", "--format", "json"]):
        assert cli.main(argv) == 0
        out, err = capsys.readouterr()
        assert_absent(known, f"{' '.join(argv)} output", out + err)
        assert SECRET_MASK in out
        assert "REBIND_PLATFORM__SECRET" in out
        assert "REBIND_KAFKA__SASL_PASSWORD" in out
        assert str(simulator_certs.client_key) in out  # the path is shown, never the key
