"""Fixtures of the cloud tests: the registry's database, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.registry import Registry, sqlite_url


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty registry database: a SQLite file, or a fresh database on a real PostgreSQL."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "registry.db")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry on an empty SQLite file (test_registry.py overrides it for both databases)."""
    reg = Registry(sqlite_url(tmp_path / "registry.db"))
    yield reg
    reg.close()
