"""Alembic migrations of the registry, on SQLite and on a real PostgreSQL server.

The 0.1.0 database is built from ``tests/cloud/data/registry-0.1.0.<dialect>.sql``: the
DDL that release's ``create_all`` emitted (main at ac977d0), filled with rows through
plain SQL, then opened by today's :class:`Registry`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, text

from cloud import migrations
from cloud.registry import Registry, SchemaError
from cloud.registry_models import Base
from protos.codec import DeviceStatus, sha256_hex

DATA = Path(__file__).parent / "data"


def _engine(url: str) -> Engine:
    return create_engine(url)


def _schema_diff(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def _load_release_0_1_0(engine: Engine) -> None:
    """Create the 0.1.0 tables and a run, a version with its artifact, a device, an event."""
    ddl = (DATA / f"registry-0.1.0.{engine.dialect.name}.sql").read_text()
    statements = [s.strip() for s in ddl.split(";")]
    package = b"weights of round 1"
    with engine.begin() as conn:
        for statement in statements:
            body = "\n".join(
                line for line in statement.splitlines() if not line.startswith("--")
            ).strip()
            if body:
                conn.execute(text(body))
        conn.execute(
            text(
                "INSERT INTO runs (flower_run_id, num_rounds, strategy, config_json, status,"
                " started_at) VALUES ('77', 3, 'fedavg', :config, 'running', 100.0)"
            ),
            {"config": '{"lr":0.05}'},
        )
        conn.execute(
            text(
                "INSERT INTO artifacts (sha256, size, data, created_at)"
                " VALUES (:sha, :size, :data, 101.0)"
            ),
            {"sha": sha256_hex(package), "size": len(package), "data": package},
        )
        conn.execute(
            text(
                "INSERT INTO versions (version, artifact_sha256, architecture_id, round, run_id,"
                " parent_version, metrics_json, participants_json, created_at)"
                " VALUES (1, :sha, 'mlp', 1, 1, NULL, :metrics, :participants, 102.0)"
            ),
            {"sha": sha256_hex(package), "metrics": '{"loss":0.5}', "participants": '["dev-a"]'},
        )
        conn.execute(
            text(
                "INSERT INTO serving (id, version, pinned, sequence, updated_at)"
                " VALUES (1, 1, :pinned, 4, 103.0)"
            ),
            {"pinned": False},
        )
        conn.execute(
            text(
                "INSERT INTO devices (device_id, fleet, serving_version, state, timestamp_ms,"
                " received_at, last_round_trained, sample_count, cpu_percent, rss_bytes,"
                " disk_free_bytes, memory_available_bytes, profile, last_error,"
                " last_metrics_json, edgefl_version) VALUES ('dev-a', 'demo', 1, 'SERVING',"
                " 5000, 104.0, 1, 120, 3.5, 1000, 2000, 3000, 'rpi4', '', '{}', '0.1.0')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO events (device_id, timestamp_ms, kind, detail, version)"
                " VALUES ('dev-a', 5001, 'release_installed', 'ok', 1)"
            )
        )
        conn.execute(text("INSERT INTO meta (key, value) VALUES ('changes', 9)"))


def test_a_fresh_database_gets_every_revision_and_matches_the_models(registry_url: str) -> None:
    Registry(registry_url).close()
    engine = _engine(registry_url)
    try:
        with engine.connect() as conn:
            assert migrations.current_revision(conn) == migrations.head() == "0004"
        assert _schema_diff(engine) == []
        indexes = {i["name"] for i in inspect(engine).get_indexes("devices")}
        assert {"ix_devices_state", "ix_devices_serving_version"} <= indexes
    finally:
        engine.dispose()


def test_a_release_0_1_0_database_is_upgraded_in_place(registry_url: str) -> None:
    engine = _engine(registry_url)
    try:
        _load_release_0_1_0(engine)
        assert "alembic_version" not in inspect(engine).get_table_names()
        assert _schema_diff(engine) != []  # the 0.1.0 schema lacks the device indexes

        registry = Registry(registry_url)
        try:
            with engine.connect() as conn:
                assert migrations.current_revision(conn) == migrations.head()
            assert _schema_diff(engine) == []
            # Nothing was lost: the run, version, artifact, pointer, device and event.
            run = registry.latest_run()
            assert run is not None and (run.flower_run_id, run.config) == ("77", {"lr": 0.05})
            version = registry.get_version(1)
            assert (version.metrics, version.participants) == ({"loss": 0.5}, ["dev-a"])
            assert registry.version_bytes(1) == b"weights of round 1"
            current = registry.current()
            assert current is not None and (current.version, current.sequence) == (1, 4)
            assert registry.get_device("dev-a").sample_count == 120
            assert [e.kind for e in registry.list_events()] == ["release_installed"]
            assert registry.change_token() == 9
            # And it keeps working: the next version and a status write.
            nxt = registry.add_version(
                package=b"weights of round 2",
                architecture_id="mlp",
                round=2,
                run_id=run.id,
                parent_version=1,
                metrics={},
            )
            assert nxt.version == 2
            assert registry.upsert_device_status(
                DeviceStatus(
                    device_id="dev-a",
                    fleet="demo",
                    serving_version=2,
                    state="SERVING",
                    timestamp_ms=6000,
                )
            )
            assert registry.spread(2) == {"serving": 1, "online": 1, "total": 1}
        finally:
            registry.close()
        # Opening again is a no-op.
        Registry(registry_url).close()
        with engine.connect() as conn:
            assert migrations.current_revision(conn) == migrations.head()
    finally:
        engine.dispose()


def test_a_database_from_a_newer_release_is_refused_untouched(registry_url: str) -> None:
    Registry(registry_url).close()
    engine = _engine(registry_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0099_future'"))
        with pytest.raises(SchemaError, match=r"'0099_future'.*newer edgefl-fleet release"):
            Registry(registry_url)
        with engine.connect() as conn:
            assert migrations.current_revision(conn) == "0099_future"
    finally:
        engine.dispose()


def test_a_database_with_some_foreign_tables_is_refused(registry_url: str) -> None:
    engine = _engine(registry_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE devices (device_id VARCHAR(10) PRIMARY KEY)"))
        with pytest.raises(SchemaError, match="some registry tables but not others"):
            Registry(registry_url)
        assert set(inspect(engine).get_table_names()) == {"devices"}
    finally:
        engine.dispose()
