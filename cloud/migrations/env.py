"""Alembic's entry point for the registry schema: runs on the connection the registry hands in.

The registry upgrades its database itself when it opens (:func:`cloud.migrations.upgrade`),
inside its own write transaction; this file only connects Alembic to that connection.
"""

from __future__ import annotations

from alembic import context

from cloud.registry_models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "the registry's migrations run through cloud.migrations.upgrade(connection) "
        "(opening a cloud.registry.Registry does it), not from the alembic command line"
    )

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
