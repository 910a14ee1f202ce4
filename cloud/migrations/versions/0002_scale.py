"""Scale: 64-bit release sequences and change counter; indexes on device state and version.

- ``serving.sequence`` holds the publisher's release sequence, a millisecond timestamp
  (> 2**31): PostgreSQL's INTEGER refused it, so no release could be recorded there.
  ``meta.value`` (the change counter) gets the same width.
- With thousands of devices, the rollout spread (online devices serving a version), the
  devices-by-state counts of ``/metrics`` and state filters of the device list scan the
  whole ``devices`` table without ``ix_devices_state`` and ``ix_devices_serving_version``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("serving") as batch:
        batch.alter_column(
            "sequence", existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=False
        )
    with op.batch_alter_table("meta") as batch:
        batch.alter_column(
            "value", existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=False
        )
    op.create_index("ix_devices_state", "devices", ["state"])
    op.create_index("ix_devices_serving_version", "devices", ["serving_version"])


def downgrade() -> None:
    op.drop_index("ix_devices_serving_version", table_name="devices")
    op.drop_index("ix_devices_state", table_name="devices")
    with op.batch_alter_table("meta") as batch:
        batch.alter_column(
            "value", existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=False
        )
    with op.batch_alter_table("serving") as batch:
        batch.alter_column(
            "sequence", existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=False
        )
