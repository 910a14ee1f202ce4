"""Shared pytest configuration: fixtures that start real components on loopback."""

pytest_plugins = [
    "tests.fixtures.agents",
    "tests.fixtures.broker",
    "tests.fixtures.flower",
    "tests.fixtures.models",
    "tests.fixtures.postgres",
]
