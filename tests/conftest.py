"""Shared pytest plugins (fixtures live in tests/fixtures/)."""

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.simulator",
    "tests.fixtures.service",
    "tests.fixtures.prometheus",
    "tests.fixtures.secured_kafka",
]
