"""The command line a newcomer meets: help texts, -V, filters checked before connecting, one line
when Kafka is not there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service import __version__
from service.cli import main
from service.events import INVALID_REASONS
from service.platform.errors import Category

REPO = Path(__file__).resolve().parents[2]


def help_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_version_short_and_long(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("-V", "--version"):
        with pytest.raises(SystemExit):
            main([flag])
        assert capsys.readouterr().out.strip() == f"device-rebind {__version__}"


def test_every_command_has_a_description(capsys: pytest.CaptureFixture[str]) -> None:
    top = help_of(capsys)
    for command in ("run", "check-config", "topics", "replay"):
        assert command in top
    assert "waits" in help_of(capsys, "run")
    check = help_of(capsys, "check-config")
    assert "Validate the REBIND_* environment" in check
    assert "env: NAME=value lines" in check  # --format has a help text
    assert "--defaults" in check
    topics = help_of(capsys, "topics")
    for action in ("plan", "create", "check"):
        assert action in topics
    assert "never changes an existing" in " ".join(topics.split())


def test_replay_help_lists_sources_reasons_and_categories(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = " ".join(help_of(capsys, "replay").split())
    assert "dlq: the dead-letter topic" in text
    assert "rebind-failed: the failure outcomes" in text
    for reason in INVALID_REASONS:
        assert reason in text
    for category in Category:
        assert category.value in text


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["replay", "dlq", "--limit", "-1"], "must be 1 or more"),
        (["replay", "dlq", "--limit", "0"], "must be 1 or more"),
        (["replay", "dlq", "--category", "auth"], "--category applies to rebind-failed only"),
        (["replay", "dlq", "--error-code", "100403"], "unknown: 100403"),
        (["replay", "dlq", "--fresh-time"], "--fresh-time applies to rebind-failed only"),
        (["replay", "rebind-failed", "--category", "sideways"], "invalid choice: 'sideways'"),
        (
            [
                "replay",
                "rebind-failed",
                "--since",
                "2026-02-01T00:00:00Z",
                "--until",
                "2026-01-01T00:00:00Z",
            ],
            "--since must be before --until",
        ),
        (["replay", "rebind-failed", "--since", "yesterday"], "not an RFC 3339 time"),
    ],
)
def test_replay_filters_are_checked_before_connecting(
    argv: list[str],
    words: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A broker address that would hang if anything tried to connect to it.
    monkeypatch.setenv("REBIND_KAFKA__BOOTSTRAP_SERVERS", "192.0.2.1:9092")
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert words in capsys.readouterr().err


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBIND_")}
    env["REBIND_KAFKA__BOOTSTRAP_SERVERS"] = "127.0.0.1:1"  # nothing listens on port 1
    return subprocess.run(
        [sys.executable, "-m", "service", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "argv",
    [("replay", "dlq", "--dry-run"), ("replay", "rebind-failed"), ("topics", "plan")],
)
def test_a_dead_broker_gives_one_line(argv: tuple[str, ...]) -> None:
    result = _run(*argv)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("device-rebind: ")
    assert "Kafka is not reachable (REBIND_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:1)" in lines[0]
    assert "Traceback" not in result.stderr
    assert "Unclosed" not in result.stderr
