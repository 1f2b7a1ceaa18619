"""Shared pytest plugins (fixtures live in tests/fixtures/)."""

from __future__ import annotations

import pytest

from tests.support.parts import Recorder

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.simulator",
    "tests.fixtures.service",
    "tests.fixtures.prometheus",
    "tests.fixtures.secured_kafka",
]


def pytest_configure(config: pytest.Config) -> None:
    """The wall time of each part of the suite and the slowest tests, printed at the end
    (``tests/support/parts.py``)."""
    config.pluginmanager.register(Recorder(), "rebind-parts")
