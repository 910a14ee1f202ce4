"""The inference error-rate gate with real parts: Mosquitto, the signer's rollout controller,
the registry, the cloud's fleet monitor, and one device (EdgeNode with LiteRT, its MQTT
agent, digits samples in its sample log).

A candidate whose weights are finite (the signer accepts them) but whose outputs are NaN
on real inputs fails its phase on the error rate, with the figures in the decision event
and in ``/api/rollouts``; a trained candidate then passes and is served.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cloud import config as cloud_config
from cloud.broker import Broker
from cloud.fleet_monitor import FleetMonitor
from cloud.registry import Registry
from cloud.releases import package_weights
from cloud.signer import SignerClient, SignerService
from cloud.supervisor import init_cloud
from cloud.telemetry import TelemetryGate
from cloud.web import create_app
from devices.datasets import device_partitions, load_digits
from edge.agent import Agent, AgentSettings
from edge.config import load_settings
from edge.litert_model import LiteRTModel
from edge.node import EdgeNode
from protos import codec
from tests.cloud.test_signer import _add
from tests.edge.helpers import device_config

FLEET = "gated"
WAIT_S = 60.0


@dataclasses.dataclass
class Wired:
    settings: cloud_config.CloudSettings
    registry: Registry
    service: SignerService
    node: EdgeNode
    web: TestClient


@pytest.fixture
def wired(tmp_path: Path, mlp_model_dir: Path, broker: Broker) -> Iterator[Wired]:
    conf = init_cloud(tmp_path / "cloud", fleet=FLEET, model_dir=mlp_model_dir)
    s = cloud_config.load(conf)
    s.broker.port = broker.port
    s.rollout = dataclasses.replace(
        s.rollout,
        policy="staged",
        phases="1.0",
        min_devices="1",
        soak_s=0.0,
        phase_timeout_s=WAIT_S,
        max_inference_error_rate="0",
    )
    with contextlib.ExitStack() as stack:
        registry = Registry(s.registry_url)
        stack.callback(registry.close)
        service = SignerService(s, registry).start()
        stack.callback(service.stop)
        gate = TelemetryGate(registry)

        def on_events(events: list[codec.DeviceEvent]) -> None:
            gate.on_events(events)
            service.signer.rollout.on_events(events)

        monitor = FleetMonitor(
            host="127.0.0.1",
            port=broker.port,
            fleet=FLEET,
            on_status_batch=gate.on_statuses,
            on_event_batch=on_events,
        ).start()
        stack.callback(monitor.stop)
        (tmp_path / "device").mkdir()
        node = EdgeNode(load_settings(device_config(tmp_path / "device")))
        node.start()
        agent = Agent(
            AgentSettings(
                device_id="dev-1",
                fleet=FLEET,
                host="127.0.0.1",
                port=broker.port,
                signing_public_key=s.signing.public_key,
                status_interval_s=0.5,
            ),
            node,
        ).start()
        stack.callback(agent.stop)
        app = create_app(
            registry, operator_token=None, fleet=FLEET, rollouts=service.signer.rollout
        )
        web = stack.enter_context(TestClient(app))
        yield Wired(s, registry, service, node, web)


def _decision(registry: Registry, version: int) -> tuple[str, dict[str, Any]]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for e in registry.list_events(200):
            if e.kind in ("rollout phase failed", "rollout phase passed") and e.version == version:
                return e.kind, json.loads(e.detail)
        time.sleep(0.2)
    raise AssertionError(f"phase of version {version} not decided")


def _wait(what: str, check: Any) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_nan_outputs_fail_the_phase_on_the_error_rate_and_a_good_candidate_passes(
    wired: Wired,
) -> None:
    s, registry, node = wired.settings, wired.registry, wired.node
    signer = SignerClient(s.data_dir)
    run = registry.start_run(num_rounds=3, strategy="fedavg", config={})
    registry.round_reply(run, 1, "dev-1", ok=True, num_examples=1)  # a known device
    v1 = _add(registry, s, run, 0)
    signer.release(v1)  # the fleet's first version goes out at once
    _wait("the device to serve v1", lambda: node.serving_version() == v1)
    digits = load_digits(layout="flat", seed=0)
    part = device_partitions(digits, 5, scheme="iid", seed=0)[0]
    node.data.load_partition(part.x, part.y)
    online = lambda: [d.device_id for d in registry.list_devices() if d.online]  # noqa: E731
    _wait("the device to be online", lambda: online() == ["dev-1"])

    base = codec.package_from_bytes(registry.version_bytes(v1)).weights
    # Finite weights (the signer's check passes), infinite logits on every real input.
    blown = {k: (np.asarray(w) * np.float32(1e30) if "kernel" in k else w) for k, w in base.items()}
    _, data = package_weights(s.model.dir, blown)
    v2 = _add(registry, s, run, 1, package=data)
    signer.release(v2)

    kind, detail = _decision(registry, v2)
    assert kind == "rollout phase failed"
    held = len(node.trainer.split(part.x, part.y).heldout)
    assert detail["candidate_error_rate"] == 1.0 and detail["served_error_rate"] == 0.0
    assert detail["inference_calls"] == held and detail["max_inference_error_rate"] == 0.0
    assert detail["reason"] == (
        f"inference error rate 1.0000 of the candidate (served version 0.0000, {held} calls "
        "each) > 0.0 allowed"
    )
    _wait(
        "the rollback",
        lambda: wired.web.get("/api/rollouts").json()["active"]["status"] != "running",
    )
    body = wired.web.get("/api/rollouts").json()["active"]
    assert (body["version"], body["status"]) == (v2, "rolled back")
    figures = body["phases"][0]["figures"]
    assert figures["candidate_error_rate"] == 1.0 and figures["inference_calls"] == held
    assert node.serving_version() == v1, "the bad candidate was never served"

    model = LiteRTModel.load(s.model.dir)
    model.fit(digits.train.x, digits.train.y, epochs=10, lr=0.2, seed=0)
    _, data = package_weights(s.model.dir, model.get_weights())
    v3 = _add(registry, s, run, 2, package=data)
    signer.release(v3)

    kind, detail = _decision(registry, v3)
    assert kind == "rollout phase passed", detail["reason"]
    assert detail["candidate_error_rate"] == 0.0 and detail["inference_calls"] == held
    _wait("the device to serve v3", lambda: node.serving_version() == v3)
    assert registry.current().version == v3  # type: ignore[union-attr]
