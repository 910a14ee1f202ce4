"""The registry's database tables (SQLAlchemy 2 declarative mapping).

Only :mod:`cloud.registry` uses these classes; everything it hands out is a plain
dataclass, never one of these ORM objects. JSON-valued columns hold small documents
(metrics, lists of device ids, run configuration) as text, which keeps the schema
portable across SQLite and server databases.

Tables::

    runs            one row per federated run (Flower run id, strategy, rounds, status)
    artifacts       content-addressed blobs: SHA-256 hex -> bytes (model packages)
    versions        model versions 1, 2, 3 ... pointing at an artifact; unique (run, round)
    serving         a single row: the version the fleet should serve, pinned or not
    rounds          one row per (run, round): sampled devices, metrics, version, dropped
    round_replies   one row per (run, round, device): ok / failed, examples, metrics
    devices         the latest status each device reported
    events          device events (release installed / rejected ...), newest last
    meta            key/value counters; ``changes`` grows with every write
    publishes       one row per release published to the fleet: version, sequence, duration
    rollouts        one row per staged rollout (by candidate version): status, state document

The schema's history lives in :mod:`cloud.migrations` (Alembic): a change here needs a
new revision there, and a test checks that both describe the same schema.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base of the registry schema."""


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    flower_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    num_rounds: Mapped[int] = mapped_column(Integer)
    strategy: Mapped[str] = mapped_column(String(64))
    config_json: Mapped[str] = mapped_column(Text, default="{}")
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class ArtifactRow(Base):
    __tablename__ = "artifacts"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("run_id", "round", name="uq_versions_run_round"),)

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    artifact_sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"))
    architecture_id: Mapped[str] = mapped_column(String(128))
    round: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), nullable=True)
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    metrics_json: Mapped[str] = mapped_column(Text, default="{}")
    participants_json: Mapped[str] = mapped_column(Text, default="[]")
    created_at: Mapped[float] = mapped_column(Float)


class ServingRow(Base):
    __tablename__ = "serving"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(ForeignKey("versions.version"))
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The publisher's release sequence: a millisecond timestamp, hence 64 bits.
    sequence: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[float] = mapped_column(Float)


class RoundRow(Base):
    __tablename__ = "rounds"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    sampled_json: Mapped[str] = mapped_column(Text, default="[]")
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    aggregated_metrics_json: Mapped[str] = mapped_column(Text, default="{}")
    eval_metrics_json: Mapped[str] = mapped_column(Text, default="{}")
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    dropped_json: Mapped[str] = mapped_column(Text, default="[]")


class RoundReplyRow(Base):
    __tablename__ = "round_replies"

    run_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    round: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    ok: Mapped[bool] = mapped_column(Boolean)
    num_examples: Mapped[int] = mapped_column(Integer, default=0)
    metrics_json: Mapped[str] = mapped_column(Text, default="{}")
    error: Mapped[str] = mapped_column(Text, default="")
    received_at: Mapped[float] = mapped_column(Float)


class DeviceRow(Base):
    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    fleet: Mapped[str] = mapped_column(String(128), default="")
    serving_version: Mapped[int] = mapped_column(Integer, default=0, index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    timestamp_ms: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[float] = mapped_column(Float)
    last_round_trained: Mapped[int] = mapped_column(Integer, default=0)
    sample_count: Mapped[int] = mapped_column(BigInteger, default=0)
    cpu_percent: Mapped[float] = mapped_column(Float, default=0.0)
    rss_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    disk_free_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    memory_available_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    profile: Mapped[str] = mapped_column(String(128), default="")
    last_error: Mapped[str] = mapped_column(Text, default="")
    last_metrics_json: Mapped[str] = mapped_column(Text, default="{}")
    edgefl_version: Mapped[str] = mapped_column(String(64), default="")


class EventRow(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    timestamp_ms: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[int] = mapped_column(Integer, default=0)


class MetaRow(Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class PublishRow(Base):
    __tablename__ = "publishes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[int] = mapped_column(Integer)
    sequence: Mapped[int] = mapped_column(BigInteger)
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    published_at: Mapped[float] = mapped_column(Float)
    #: Seconds from the first chunk sent to the manifest acknowledged by the broker.
    duration_s: Mapped[float] = mapped_column(Float)


class RolloutRow(Base):
    __tablename__ = "rollouts"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    status: Mapped[str] = mapped_column(String(16))
    #: The rollout controller's own JSON document (phases, cohorts, reports, decisions).
    state_json: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[float] = mapped_column(Float)
