"""The cloud's ``/metrics``: figures computed from the registry, served by the real web app."""

from __future__ import annotations

import time

import pytest

from cloud.metrics import cloud_collectors, families, render
from cloud.registry import InvalidRecordError, Registry, RegistryStats
from cloud.web import WebServer, create_app
from protos.codec import DeviceStatus
from tests.prom import parse, scrape


def _status(device: str, version: int, state: str, ts: int = 1000) -> DeviceStatus:
    return DeviceStatus(
        device_id=device, fleet="demo", serving_version=version, state=state, timestamp_ms=ts
    )


def _fill(registry: Registry) -> int:
    """Two rounds of one run, two versions, one publish, four devices, one event."""
    run = registry.start_run(num_rounds=3, strategy="fedavg", config={})
    for rnd in (1, 2):
        registry.add_version(
            package=f"weights {rnd}".encode(),
            architecture_id="mlp",
            round=rnd,
            run_id=run,
            parent_version=rnd - 1 or None,
            metrics={},
        )
    # Round 1: 15 s ago, three sampled; a answers, b fails, c times out.
    registry.round_started(run, 1, sampled=["a", "b", "c"], started_at=time.time() - 15)
    registry.round_reply(run, 1, "a", ok=True, num_examples=10)
    registry.round_reply(run, 1, "b", ok=False, error="no local data")
    registry.round_finished(run, 1, aggregated_metrics={}, version=1, dropped=["c"])
    # Round 2: running, two sampled.
    registry.round_started(run, 2, sampled=["a", "b"])
    registry.set_current(2, pinned=False, sequence=1_796_000_000_000, publish_seconds=0.03)
    registry.upsert_device_status(_status("a", 2, "SERVING"))
    registry.upsert_device_status(_status("b", 2, "TRAINING"))
    registry.upsert_device_status(_status("c", 1, "SERVING"))
    registry.upsert_device_status(_status("d", 1, "OFFLINE"))
    return run


def test_the_web_app_serves_registry_figures(registry_url: str) -> None:
    registry = Registry(registry_url)
    try:
        _fill(registry)
        app = create_app(registry, operator_token=None, fleet="demo")
        with WebServer(app) as server:
            content_type, m = scrape(f"{server.url}/metrics")
    finally:
        registry.close()

    assert content_type.startswith("text/plain")
    assert m.value("edgefl_rounds_completed_total") == 1
    assert m.value("edgefl_rounds_running") == 1
    assert m.value("edgefl_latest_round") == 2
    assert m.value("edgefl_round_participants") == 2
    assert m.value("edgefl_round_duration_seconds_count") == 1
    # 15 s (plus the test's own time): above the 10 s bucket, within the 20 s one.
    assert m.value("edgefl_round_duration_seconds_bucket", le="10.0") == 0
    assert m.value("edgefl_round_duration_seconds_bucket", le="20.0") == 1
    assert m.labelled("edgefl_round_replies_total", "outcome") == {
        "ok": 1,
        "failed": 1,
        "dropped": 1,
    }
    assert m.value("edgefl_runs", status="running") == 1
    assert m.value("edgefl_runs", status="failed") == 0
    assert m.value("edgefl_fleet_target_version") == 2
    devices = m.labelled("edgefl_devices", "state")
    assert (devices["SERVING"], devices["TRAINING"], devices["OFFLINE"]) == (2, 1, 1)
    assert devices["UPDATING"] == 0
    assert m.labelled("edgefl_devices_serving", "version") == {"1": 1, "2": 2}
    assert m.value("edgefl_fleet_version_spread_ratio") == pytest.approx(2 / 3)
    assert m.value("edgefl_releases_published_total") == 1
    assert m.value("edgefl_release_publish_duration_seconds_bucket", le="0.025") == 0
    assert m.value("edgefl_release_publish_duration_seconds_bucket", le="0.05") == 1
    assert m.value("edgefl_release_publish_duration_seconds_sum") == pytest.approx(0.03)
    assert m.value("edgefl_registry_versions") == 2
    assert m.value("edgefl_registry_artifacts") == 2
    assert m.value("edgefl_registry_artifact_bytes") == len(b"weights 1") + len(b"weights 2")
    assert m.value("edgefl_registry_events") == 0
    assert m.value("process_resident_memory_bytes") > 0


def test_an_empty_registry_gives_zeros_not_errors(tmp_path) -> None:
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        m = parse(render(cloud_collectors(registry)).decode())
    finally:
        registry.close()
    assert m.value("edgefl_rounds_completed_total") == 0
    assert m.value("edgefl_round_duration_seconds_count") == 0
    assert m.value("edgefl_fleet_version_spread_ratio") == 0
    assert m.labelled("edgefl_devices_serving", "version") == {}


def test_histograms_are_cumulative_from_raw_observations() -> None:
    stats = RegistryStats(
        runs_by_status={},
        rounds_finished=4,
        rounds_running=0,
        round_durations=[0.5, 5.0, 7.0, 4000.0],
        replies={},
        latest_round=4,
        latest_round_sampled=3,
        devices_by_state={},
        online_by_version={},
        current_version=0,
        versions=0,
        artifacts=0,
        artifact_bytes=0,
        events=0,
        publish_durations=[],
    )
    (hist,) = [f for f in families(stats) if f.name == "edgefl_round_duration_seconds"]
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    # le is inclusive: 5.0 falls in the 5 s bucket.
    assert (buckets["1.0"], buckets["5.0"], buckets["10.0"], buckets["3600.0"]) == (1, 2, 3, 3)
    assert buckets["+Inf"] == 4
    (total,) = [s.value for s in hist.samples if s.name.endswith("_sum")]
    assert total == pytest.approx(4012.5)


def test_a_negative_publish_duration_is_refused(tmp_path) -> None:
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        registry.add_version(
            package=b"w",
            architecture_id="mlp",
            round=0,
            run_id=None,
            parent_version=None,
            metrics={},
        )
        with pytest.raises(InvalidRecordError, match="publish_seconds"):
            registry.set_current(1, pinned=False, publish_seconds=-1.0)
        assert registry.current() is None and registry.stats().publish_durations == []
    finally:
        registry.close()
