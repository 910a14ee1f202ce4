"""docs/grafana-dashboard.json queries only metrics that the cloud and the devices expose.

Here the names come from the collectors built in-process (fast); the slow end-to-end
test (tests/e2e/test_metrics_scrape.py) checks the same queries against scrapes of a
real cloud and a real device.
"""

from __future__ import annotations

from pathlib import Path

from cloud.metrics import cloud_collectors, render
from cloud.registry import Registry
from edge.metrics import DeviceMetrics
from tests.grafana import dashboard, metric_names, queries
from tests.prom import parse


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model_version) (rate(a_bucket{job="x", le!="1"}'
        "[$__rate_interval]))) / on (instance) group_left b_total + 2 * c"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def test_every_dashboard_query_names_an_exposed_metric(tmp_path: Path) -> None:
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        exposed = parse(render(cloud_collectors(registry)).decode()).series_names
    finally:
        registry.close()
    exposed |= parse(render(DeviceMetrics().registry).decode()).series_names

    board = dashboard()
    found = queries(board)
    assert len(found) >= 20, "the dashboard lost its queries"
    unknown = {(title, name) for title, expr in found for name in metric_names(expr) - exposed}
    assert unknown == set()
    used = {name for _, expr in found for name in metric_names(expr)}
    # Every family of the list is on the dashboard.
    for required in (
        "edgefl_rounds_completed_total",
        "edgefl_round_duration_seconds_bucket",
        "edgefl_round_participants",
        "edgefl_round_replies_total",
        "edgefl_devices",
        "edgefl_devices_serving",
        "edgefl_release_publish_duration_seconds_bucket",
        "edgefl_registry_artifact_bytes",
        "edgefl_device_inference_requests_total",
        "edgefl_device_inference_duration_seconds_bucket",
        "edgefl_device_releases_total",
        "edgefl_device_training_duration_seconds_sum",
        "edgefl_device_local_samples",
        "process_resident_memory_bytes",
    ):
        assert required in used, required
    assert all(
        p.get("datasource", {}).get("type") == "prometheus"
        for p in board["panels"]
        if p["type"] != "row"
    )
