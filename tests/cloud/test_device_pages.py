"""Devices at fleet scale: batched status writes, filtered pages in the registry and the API.

Issue 18: the cloud must ingest 10,000 devices' statuses (one transaction per batch, not
per status) and the device list must stay usable at that size (pages and filters, and
counts that never load every device).
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from cloud.registry import InvalidRecordError, Registry
from cloud.web import create_app
from protos.codec import DeviceEvent, DeviceStatus


def _status(device: str, version: int, state: str = "SERVING", ts: int = 5000) -> DeviceStatus:
    return DeviceStatus(
        device_id=device, fleet="demo", serving_version=version, state=state, timestamp_ms=ts
    )


@pytest.mark.parametrize("in_sql", [True, False], ids=["on-conflict", "row-by-row"])
def test_a_batch_follows_the_single_status_rules_and_skips_only_bad_statuses(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, in_sql: bool
) -> None:
    if not in_sql:  # the path of databases without INSERT ... ON CONFLICT
        monkeypatch.setattr(Registry, "_status_upsert", lambda _self: None)
    registry.upsert_device_status(_status("a", 1, ts=2000))
    batch = [
        _status("a", 0, ts=1000),  # older than the stored one: ignored
        _status("b", 1, ts=1000),
        _status("b", 2, ts=3000),  # the same device twice in one batch: newest wins
        _status("b", 1, ts=2000),  # ... and an older one after it is still ignored
        _status("", 1),  # invalid: skipped, the rest is stored
        _status("c", 1, state="EXPLODING"),  # invalid state: skipped
        _status("a", 1, state="OFFLINE", ts=1500),  # an older Last Will still marks OFFLINE
        DeviceStatus("d", "demo", 1, "SERVING", 1000, last_metrics={"loss": float("nan")}),
    ]
    assert registry.upsert_device_statuses(batch) == 3
    stored = {
        d.device_id: (d.serving_version, d.state, d.timestamp_ms) for d in registry.list_devices()
    }
    assert stored == {"a": (1, "OFFLINE", 2000), "b": (2, "SERVING", 3000)}
    assert registry.upsert_device_statuses([]) == 0


def test_events_are_stored_in_one_batch_and_bad_ones_skipped(registry: Registry) -> None:
    events = [
        DeviceEvent("a", 1, "release_installed", "round 1", 1),
        DeviceEvent("", 2, "release_installed", "", 1),
        DeviceEvent("b", 3, "", "", 1),
        DeviceEvent("b", 4, "install_failed", "disk full", 2),
    ]
    assert registry.record_events(events) == 2
    assert [(e.device_id, e.kind) for e in registry.list_events()] == [
        ("b", "install_failed"),
        ("a", "release_installed"),
    ]


def test_device_pages_filter_and_count(registry: Registry) -> None:
    registry.upsert_device_statuses(
        [
            _status(f"pi-{i:03d}", 1 + i % 2, "OFFLINE" if i % 5 == 0 else "SERVING")
            for i in range(50)
        ]
        + [_status("gw_1", 2), _status("gw%2", 2)]
    )
    assert registry.count_devices() == 52
    page = registry.list_devices(offset=12, limit=5)  # by id: gw%2, gw_1, pi-000, ...
    assert [d.device_id for d in page] == ["pi-010", "pi-011", "pi-012", "pi-013", "pi-014"]
    assert registry.count_devices(state="OFFLINE") == 10
    offline = registry.list_devices(state="OFFLINE", limit=3)
    assert [d.device_id for d in offline] == ["pi-000", "pi-005", "pi-010"]
    assert registry.count_devices(search="PI-04") == 10  # case-insensitive substring
    assert registry.count_devices(version=2, state="SERVING") == 22
    # LIKE wildcards in the search text are literal characters.
    assert [d.device_id for d in registry.list_devices(search="_")] == ["gw_1"]
    assert [d.device_id for d in registry.list_devices(search="%")] == ["gw%2"]
    assert registry.list_devices(offset=100) == []
    with pytest.raises(InvalidRecordError):
        registry.list_devices(state="EXPLODING")
    with pytest.raises(InvalidRecordError):
        registry.list_devices(offset=-1)


def test_api_device_pages_total_and_bad_parameters(registry: Registry) -> None:
    registry.upsert_device_statuses(
        [_status(f"pi-{i:04d}", 1, "OFFLINE" if i % 4 == 0 else "SERVING") for i in range(250)]
    )
    with TestClient(create_app(registry, fleet="demo", operator_token=None)) as client:
        first = client.get("/api/devices")
        assert first.status_code == 200
        assert first.headers["X-Total-Count"] == "250"
        assert len(first.json()) == 100  # the default page
        page = client.get("/api/devices", params={"offset": 240, "limit": 50})
        assert [d["device_id"] for d in page.json()] == [f"pi-{i:04d}" for i in range(240, 250)]
        offline = client.get("/api/devices", params={"state": "OFFLINE", "q": "pi-00", "limit": 5})
        assert offline.headers["X-Total-Count"] == "25"
        assert [d["device_id"] for d in offline.json()] == [
            "pi-0000",
            "pi-0004",
            "pi-0008",
            "pi-0012",
            "pi-0016",
        ]
        assert all(not d["online"] for d in offline.json())
        for bad in ({"state": "EXPLODING"}, {"limit": 0}, {"limit": 5000}, {"offset": -1}):
            answer = client.get("/api/devices", params=bad)
            assert answer.status_code == 422, bad
            assert answer.json()["detail"]
        overview = client.get("/api/overview").json()
        assert overview["devices"] == {"online": 187, "total": 250}
