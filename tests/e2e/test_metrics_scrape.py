"""Prometheus scrapes of a real cloud (``cloud up`` stack) and a real device after a round.

One device (a real ``edgefl edge up`` process tree) trains one round; then the cloud's
``/metrics`` and the device's ``/metrics`` are scraped and parsed with
``prometheus_client``'s parser, and every query of docs/grafana-dashboard.json must
name a metric one of them exposes.
"""

from __future__ import annotations

import dataclasses
import time

import grpc
import numpy as np
import pytest

from protos.kserve import grpc_predict_v2_pb2 as kserve_pb
from protos.kserve import grpc_predict_v2_pb2_grpc as kserve_grpc
from tests.e2e.conftest import fleet_spec, wait_served
from tests.grafana import dashboard, metric_names, queries
from tests.prom import Scrape, scrape

pytestmark = pytest.mark.slow


def _cloud_scrape_when(url: str, ready, timeout: float = 90.0) -> Scrape:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        content_type, m = scrape(url)
        assert content_type.startswith("text/plain")
        if ready(m) or time.monotonic() > deadline:
            return m
        time.sleep(1.0)


def test_cloud_and_device_metrics_after_a_round(
    cloud_settings, stack_factory, fleet_factory
) -> None:
    s = cloud_settings
    s.run = dataclasses.replace(s.run, num_rounds=1, min_nodes=1)
    stack = stack_factory(s)
    fleet = fleet_factory(fleet_spec(s, stack, scheme="iid"), 1)
    stack.submit_run()
    assert stack.wait_for_run(timeout=300) == "finished:completed"
    latest = stack.registry.latest_version()
    assert latest is not None
    device = fleet.devices[0]
    wait_served({device.name: device.address}, latest.version, timeout=90)

    rng = np.random.default_rng(0)
    with grpc.insecure_channel(device.address) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(5):
            request = kserve_pb.ModelInferRequest(model_name="digits")
            request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
            request.raw_input_contents.append(rng.random((1, 64)).astype("<f4").tobytes())
            stub.ModelInfer(request, timeout=30)
    metrics_port = int((device.data_dir / "metrics.port").read_text())
    content_type, dev = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    assert content_type.startswith("text/plain")

    web_url = (s.data_dir / "web.url").read_text().strip()
    version = str(latest.version)
    cloud = _cloud_scrape_when(
        f"{web_url}/metrics",
        lambda m: m.labelled("edgefl_devices_serving", "version").get(version) == 1,
    )

    # The cloud: the round, its reply, the releases, the device on the newest version.
    assert cloud.value("edgefl_rounds_completed_total") >= 1
    assert cloud.value("edgefl_round_duration_seconds_count") >= 1
    assert cloud.value("edgefl_round_duration_seconds_sum") > 0
    assert cloud.value("edgefl_round_participants") == 1
    assert cloud.value("edgefl_round_replies_total", outcome="ok") >= 1
    assert cloud.value("edgefl_runs", status="completed") == 1
    assert cloud.value("edgefl_fleet_target_version") == latest.version
    assert cloud.labelled("edgefl_devices_serving", "version") == {version: 1}
    assert cloud.value("edgefl_fleet_version_spread_ratio") == 1
    assert sum(cloud.labelled("edgefl_devices", "state").values()) == 1
    published = cloud.value("edgefl_releases_published_total")
    assert published >= 1
    assert cloud.value("edgefl_release_publish_duration_seconds_count") == published
    assert cloud.value("edgefl_registry_versions") == len(stack.registry.list_versions())
    assert cloud.value("edgefl_registry_artifact_bytes") > 0

    # The device: inference by the served version, the release it installed, its training.
    assert (
        dev.value("edgefl_device_inference_requests_total", model_version=version, outcome="ok")
        >= 5
    )
    assert dev.value("edgefl_device_inference_duration_seconds_count", model_version=version) >= 5
    assert dev.value("edgefl_device_releases_total", outcome="release_installed") >= 1
    assert dev.value("edgefl_device_releases_total", outcome="release_rejected") == 0
    assert dev.value("edgefl_device_training_rounds_total") >= 1
    assert dev.value("edgefl_device_training_duration_seconds_sum") > 0
    assert dev.value("edgefl_device_last_training_round") == 1
    assert dev.value("edgefl_device_local_samples") > 0
    assert dev.value("edgefl_device_serving_version") == latest.version
    assert dev.value("process_resident_memory_bytes") > 20 * 2**20

    exposed = cloud.series_names | dev.series_names
    unknown = {
        (title, name)
        for title, expr in queries(dashboard())
        for name in metric_names(expr) - exposed
    }
    assert unknown == set()
