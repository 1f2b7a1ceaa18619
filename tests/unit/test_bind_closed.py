"""The bind listener is closed by default (issue 19, item 2): configuration and the limits."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from service.bind.listener import PeerLimiter, secret_path_matches
from service.config import BindSettings, ConfigError, load_settings

GOOD_SECRET = "Zr4r2m0d3f7pQx9sK1vB8w"  # 22 url-safe characters: 132 bits
URL = "https://rebind.example.com:443/platform/bind"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name, value in {
        "REBIND_PLATFORM__BASE_URL": "https://iot.example.com:8743",
        "REBIND_PLATFORM__APP_ID": "app",
        "REBIND_PLATFORM__SECRET": "s3cr3t-app",
    }.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_a_callback_url_without_a_path_secret_or_client_certificates_is_refused(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("REBIND_BIND__CALLBACK_URL", URL)
    with pytest.raises(ConfigError, match="REBIND_BIND__PATH_SECRET") as info:
        load_settings()
    assert "REBIND_BIND__CLIENT_CA" in str(info.value)


@pytest.mark.parametrize(
    "weak", ["s3", "p-8d1e0c5b", "a" * 21, "has spaces in it, 22+ chars", "é" * 30]
)
def test_a_short_or_not_url_safe_path_secret_is_refused(env: pytest.MonkeyPatch, weak: str) -> None:
    env.setenv("REBIND_BIND__CALLBACK_URL", URL)
    env.setenv("REBIND_BIND__PATH_SECRET", weak)
    with pytest.raises(ConfigError, match="REBIND_BIND__PATH_SECRET") as info:
        load_settings()
    assert weak not in str(info.value)  # a secret never reaches an error line


def test_a_long_path_secret_or_a_client_ca_opens_it(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env.setenv("REBIND_BIND__CALLBACK_URL", URL)
    env.setenv("REBIND_BIND__PATH_SECRET", GOOD_SECRET)
    assert load_settings().bind.path_secret is not None
    env.delenv("REBIND_BIND__PATH_SECRET")
    for name in ("ca.pem", "tls.crt", "tls.key"):
        (tmp_path / name).write_text("PEM")
    env.setenv("REBIND_BIND__CLIENT_CA", str(tmp_path / "ca.pem"))
    env.setenv("REBIND_BIND__TLS_CERT", str(tmp_path / "tls.crt"))
    env.setenv("REBIND_BIND__TLS_KEY", str(tmp_path / "tls.key"))
    assert load_settings().bind.client_ca == tmp_path / "ca.pem"


def test_a_client_ca_needs_the_listener_to_serve_tls(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("PEM")
    with pytest.raises(ValueError, match="REBIND_BIND__TLS_CERT"):
        BindSettings(callback_url=URL, client_ca=tmp_path / "ca.pem")


def test_plain_http_callbacks_only_when_allowed(env: pytest.MonkeyPatch) -> None:
    env.setenv("REBIND_BIND__CALLBACK_URL", "http://rebind.example.com:80/platform/bind")
    env.setenv("REBIND_BIND__PATH_SECRET", GOOD_SECRET)
    with pytest.raises(ConfigError, match="REBIND_BIND__ALLOW_PLAIN_HTTP"):
        load_settings()
    env.setenv("REBIND_BIND__ALLOW_PLAIN_HTTP", "true")
    assert load_settings().bind.allow_plain_http


def test_without_a_callback_url_nothing_is_required() -> None:
    assert BindSettings().callback_url is None
    assert BindSettings(path_secret=SecretStr("short")).path_secret is not None  # unused


def test_the_secret_path_is_compared_in_constant_time() -> None:
    bind = BindSettings(callback_url=URL, path_secret=SecretStr(GOOD_SECRET))
    assert secret_path_matches(bind, f"/platform/bind/{GOOD_SECRET}")
    assert secret_path_matches(bind, f"/platform/bind/{GOOD_SECRET}/")
    assert not secret_path_matches(bind, f"/platform/bind/{GOOD_SECRET[:-1]}")
    assert not secret_path_matches(bind, "/platform/bind/é")


def test_a_token_bucket_per_peer_and_in_total_with_a_bounded_peer_table() -> None:
    now = [0.0]
    limiter = PeerLimiter(per_peer=2, total=5, max_peers=3, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]  # burst 2 per peer
    assert [limiter.allow(p) for p in ("b", "b", "c")] == [True, True, True]
    assert not limiter.allow("d")  # the total (5) is spent
    now[0] += 1.0  # a second refills both
    assert limiter.allow("a")
    for n in range(100):  # a flood from many addresses keeps the table at its bound
        limiter.allow(f"peer-{n}")
    assert len(limiter) <= 3
