"""One definition per record: the device status's fields reach the database and the API."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cloud import registry as registry_module
from cloud.registry import Device, Registry, sqlite_url
from cloud.registry_models import DeviceRow
from cloud.web.schemas import DeviceOut, device_out
from protos.codec import DeviceStatus, status_from_bytes, status_to_bytes

STATUS_FIELDS = {f.name for f in dataclasses.fields(DeviceStatus)}


def test_the_row_the_device_and_the_view_follow_the_status_record() -> None:
    columns = {c.name for c in DeviceRow.__table__.columns}
    assert columns == (STATUS_FIELDS - {"last_metrics"}) | {"last_metrics_json", "received_at"}
    assert {f.name for f in dataclasses.fields(Device)} == STATUS_FIELDS | {"received_at"}
    assert set(DeviceOut.model_fields) == (STATUS_FIELDS - {"timestamp_ms"}) | {
        "received_at",
        "online",
        "last_seen_ms",
        "unknown_version",
    }


def test_every_status_field_survives_the_registry_and_the_api(tmp_path: Path) -> None:
    status = DeviceStatus(
        device_id="d1",
        fleet="lab",
        serving_version=3,
        state="TRAINING",
        timestamp_ms=1_000,
        last_round_trained=2,
        sample_count=17,
        cpu_percent=12.5,
        rss_bytes=1 << 20,
        disk_free_bytes=1 << 30,
        memory_available_bytes=1 << 29,
        profile="rpi4",
        last_error="none",
        last_metrics={"train-loss": 0.25},
        edgefl_version="0.1.0",
    )
    assert status_from_bytes(status_to_bytes(status)) == status  # the wire keeps it all
    row = registry_module._status_values(status, status.last_metrics, 2.0, 2_000)
    assert set(row) == set(registry_module._STATUS_COLUMNS)  # the upsert's columns
    with Registry(sqlite_url(tmp_path / "r.db")) as registry:
        registry.upsert_device_status(status, received_ms=2_000)
        device = registry.get_device("d1")
        registry.upsert_device_statuses([dataclasses.replace(status, device_id="d2")])
        batched = registry.get_device("d2")
    assert {n: getattr(device, n) for n in STATUS_FIELDS} == dataclasses.asdict(status)
    assert {n: getattr(batched, n) for n in STATUS_FIELDS - {"device_id"}} == {
        n: v for n, v in dataclasses.asdict(status).items() if n != "device_id"
    }
    view = device_out(device, known_versions={3}).model_dump()
    assert view["last_seen_ms"] == 1_000 and view["online"] and not view["unknown_version"]
    assert {n: view[n] for n in STATUS_FIELDS - {"timestamp_ms"}} == {
        n: v for n, v in dataclasses.asdict(status).items() if n != "timestamp_ms"
    }
