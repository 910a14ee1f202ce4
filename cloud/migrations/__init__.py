"""The registry's schema history, as Alembic revisions in ``versions/``.

:class:`cloud.registry.Registry` calls :func:`upgrade` when it opens a database, in its
own write transaction (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: under an advisory
lock), so several processes opening one database at once upgrade it once:

- an empty database gets every revision, from the baseline (``0001``) on;
- a database created before migrations existed (edgefl-fleet 0.1.0 called
  ``create_all``: the baseline's tables and no ``alembic_version``) is stamped with
  the baseline, then upgraded;
- a database at a revision this edgefl does not know (made by a newer release) is
  refused with :class:`UnknownRevisionError`, never touched.

A schema change is a new file in ``versions/`` (its ``down_revision`` the previous head)
plus the matching change in :mod:`cloud.registry_models`;
``tests/cloud/test_registry_migrations.py`` checks that the two agree.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from cloud.errors import CloudError

logger = logging.getLogger(__name__)

#: The revision that describes edgefl-fleet 0.1.0's schema (made by ``create_all``).
BASELINE = "0001"
#: The tables of the baseline: their presence without ``alembic_version`` means 0.1.0.
BASELINE_TABLES = frozenset(
    {
        "runs",
        "artifacts",
        "versions",
        "serving",
        "rounds",
        "round_replies",
        "devices",
        "events",
        "meta",
    }
)
#: Key of the PostgreSQL advisory lock held while a registry checks or upgrades its schema.
PG_LOCK_KEY = 0x0EDF_1001

_HERE = Path(__file__).resolve().parent


class MigrationError(CloudError, RuntimeError):
    """The database's schema cannot be brought to this edgefl's revision."""


class UnknownRevisionError(MigrationError):
    """The database is at a revision this edgefl does not know (a newer release made it)."""


@functools.cache
def script_directory() -> ScriptDirectory:
    """The revisions shipped in this package."""
    return ScriptDirectory(str(_HERE))


def head() -> str:
    """The newest revision this edgefl knows."""
    current = script_directory().get_current_head()
    if current is None:  # pragma: no cover - the package always ships revisions
        raise MigrationError("cloud/migrations has no revisions")
    return current


def known_revisions() -> set[str]:
    return {s.revision for s in script_directory().walk_revisions()}


def current_revision(connection: Connection) -> str | None:
    """The revision stored in ``alembic_version``, ``None`` if there is none."""
    return MigrationContext.configure(connection).get_current_revision()


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.attributes["connection"] = connection
    return config


def upgrade(connection: Connection) -> tuple[str | None, str]:
    """Bring the schema on ``connection`` to :func:`head`; returns (revision before, after).

    Runs inside the caller's transaction (DDL is transactional on SQLite and
    PostgreSQL, so a failed upgrade leaves the database as it was).
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
    before = current_revision(connection)
    target = head()
    if before is None:
        tables = set(inspect(connection).get_table_names())
        present = tables & BASELINE_TABLES
        if present == BASELINE_TABLES:
            logger.info("registry created before schema migrations: stamping %s", BASELINE)
            command.stamp(_config(connection), BASELINE)
            before = BASELINE
        elif present:
            raise MigrationError(
                "the database has some registry tables but not others "
                f"(has {sorted(present)}, lacks {sorted(BASELINE_TABLES - present)}) "
                "and no schema revision: not a registry edgefl can upgrade"
            )
    elif before not in known_revisions():
        raise UnknownRevisionError(
            f"the registry database is at schema revision {before!r}, which this edgefl "
            f"does not know (its newest is {target!r}): it was written by a newer "
            "edgefl-fleet release; upgrade edgefl-fleet, or point [registry] url at "
            "another database"
        )
    if before != target:
        logger.info("upgrading the registry schema from %s to %s", before or "empty", target)
        command.upgrade(_config(connection), target)
    return before, target
