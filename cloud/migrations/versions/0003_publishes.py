"""Table ``publishes``: one row per release published to the fleet, with its duration.

The ServerApp (and a pin from the UI or the command line) publishes releases in its
own process; recording each publish here lets the cloud's ``/metrics`` report the
publish latency whichever process published.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "publishes",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("pinned", sa.Boolean(), nullable=False),
        sa.Column("published_at", sa.Float(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("publishes")
