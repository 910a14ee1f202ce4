"""Baseline: the registry schema of edgefl-fleet 0.1.0, as ``create_all`` made it.

A database created before migrations existed has these tables and no
``alembic_version``: the registry stamps it with this revision, then upgrades.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("flower_run_id", sa.String(64), nullable=True),
        sa.Column("num_rounds", sa.Integer(), nullable=False),
        sa.Column("strategy", sa.String(64), nullable=False),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
    )
    op.create_table(
        "artifacts",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "round_replies",
        sa.Column("run_id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("round", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("num_examples", sa.Integer(), nullable=False),
        sa.Column("metrics_json", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("fleet", sa.String(128), nullable=False),
        sa.Column("serving_version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("timestamp_ms", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("last_round_trained", sa.Integer(), nullable=False),
        sa.Column("sample_count", sa.BigInteger(), nullable=False),
        sa.Column("cpu_percent", sa.Float(), nullable=False),
        sa.Column("rss_bytes", sa.BigInteger(), nullable=False),
        sa.Column("disk_free_bytes", sa.BigInteger(), nullable=False),
        sa.Column("memory_available_bytes", sa.BigInteger(), nullable=False),
        sa.Column("profile", sa.String(128), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("last_metrics_json", sa.Text(), nullable=False),
        sa.Column("edgefl_version", sa.String(64), nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("timestamp_ms", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
    )
    op.create_index("ix_events_device_id", "events", ["device_id"])
    op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Integer(), nullable=False),
    )
    op.create_table(
        "versions",
        sa.Column("version", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("artifact_sha256", sa.String(64), nullable=False),
        sa.Column("architecture_id", sa.String(128), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        sa.Column("metrics_json", sa.Text(), nullable=False),
        sa.Column("participants_json", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.UniqueConstraint("run_id", "round", name="uq_versions_run_round"),
        sa.ForeignKeyConstraint(["artifact_sha256"], ["artifacts.sha256"]),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"]),
    )
    op.create_table(
        "rounds",
        sa.Column("run_id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("round", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("sampled_json", sa.Text(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("aggregated_metrics_json", sa.Text(), nullable=False),
        sa.Column("eval_metrics_json", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("dropped_json", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"]),
    )
    op.create_table(
        "serving",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("pinned", sa.Boolean(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["version"], ["versions.version"]),
    )


def downgrade() -> None:
    for table in (
        "serving",
        "rounds",
        "versions",
        "meta",
        "events",
        "round_replies",
        "devices",
        "artifacts",
        "runs",
    ):
        op.drop_table(table)
