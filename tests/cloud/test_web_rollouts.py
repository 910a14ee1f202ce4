"""The UI's rollout view and actions: a real controller, registry and Mosquitto behind the API.

The rollout's device check arrives as the fleet monitor hands it over (a ``DeviceEvent``
given to :meth:`cloud.rollout.RolloutController.on_events`); the candidate and the
promoted release are really published on the test broker.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cloud import config as cloud_config
from cloud.broker import Broker
from cloud.publisher import Publisher
from cloud.registry import Registry, sqlite_url
from cloud.releases import publish_version
from cloud.rollout import RolloutController
from cloud.web import create_app
from protos import codec, signing

TOKEN = "operator-secret-token"


@pytest.fixture
def wired(tmp_path: Path, broker: Broker) -> Iterator[tuple[TestClient, RolloutController, int]]:
    registry = Registry(sqlite_url(tmp_path / "registry.db"))
    key = signing.generate_private_key()
    s = cloud_config.CloudSettings()
    s.cloud.fleet = "ui"
    s.rollout = dataclasses.replace(s.rollout, policy="staged", soak_s=60.0, phase_timeout_s=120.0)

    def publisher() -> Publisher:
        return Publisher(host=broker.host, port=broker.port, fleet="ui", signing_key=key)

    def promote(version: int) -> int:
        with publisher() as pub:
            return publish_version(registry, pub, version, pinned=False).sequence

    for rnd in (0, 1):
        registry.add_version(
            package=bytes([rnd]) * 2048,
            architecture_id="x",
            round=rnd,
            run_id=None,
            parent_version=None,
            metrics={},
        )
    registry.set_current(1, pinned=False)
    now = int(time.time() * 1000)
    registry.upsert_device_status(
        codec.DeviceStatus("d1", "ui", serving_version=1, state="SERVING", timestamp_ms=now)
    )
    controller = RolloutController(s, registry, publisher=publisher, promote=promote)
    app = create_app(registry, operator_token=TOKEN, fleet="ui", rollouts=controller)
    try:
        with TestClient(app) as client:
            yield client, controller, 2
    finally:
        controller.stop()
        registry.close()


def test_rollout_view_shows_the_phase_and_actions_need_the_token(wired) -> None:  # type: ignore[no-untyped-def]
    client, controller, version = wired
    controller.submit(version)
    controller.on_events(
        [
            codec.DeviceEvent(
                "d1",
                1,
                "candidate_checked",
                "",
                version,
                {"candidate_accuracy": 0.9, "served_accuracy": 0.8, "examples": 40, "phase": 1},
            )
        ]
    )
    body = client.get("/api/rollouts").json()
    assert body["policy"] == "staged"
    active = body["active"]
    assert (active["version"], active["status"], active["served_version"]) == (2, "running", 1)
    phase = active["phases"][0]
    assert phase["cohort"] == ["d1"] and phase["checked"] == ["d1"] and phase["passed"] is None
    assert phase["figures"] is None  # decided figures only once the gate decides
    so_far = phase["so_far"]
    assert (so_far["checked"], so_far["pending"], so_far["candidate_accuracy"]) == (1.0, 0.0, 0.9)

    path = f"/api/rollouts/{version}/promote"
    assert client.post(path).status_code == 401
    assert client.post(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.post(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and f"version {version} promoted" in ok.json()["message"]
    assert controller.status()["history"][-1]["status"] == "promoted"
    again = client.post(
        f"/api/rollouts/{version}/halt", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert again.status_code == 409 and "no rollout in progress" in again.json()["detail"]


def test_a_server_without_a_controller_answers_501(tmp_path: Path) -> None:
    registry = Registry(sqlite_url(tmp_path / "r.db"))
    try:
        with TestClient(create_app(registry, operator_token=TOKEN, fleet="ui")) as client:
            assert client.get("/api/rollouts").status_code == 501
            auth = {"Authorization": f"Bearer {TOKEN}"}
            assert client.post("/api/rollouts/3/halt", headers=auth).status_code == 501
            assert "/api/rollouts" in client.get("/openapi.json").json()["paths"]
    finally:
        registry.close()
