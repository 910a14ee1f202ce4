"""The device agent against a real Mosquitto: releases reach every device, late or offline.

Devices are :class:`StoreNode` objects: a small real implementation of
``edge.agent.ReleaseInstaller`` backed by the real on-disk ``edge.model_store.ModelStore``
(without the inference and training services of ``edge.node.EdgeNode``). The cloud side is the real :class:`cloud.publisher.Publisher`; convergence is
observed through the real :class:`cloud.fleet_monitor.FleetMonitor`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.broker import Broker
from cloud.fleet_monitor import FleetMonitor
from cloud.publisher import Publisher
from edge.agent import EVENT_INSTALLED, STATE_SEQUENCE_KEY, Agent, AgentSettings
from edge.errors import ConfigError, InstallError
from edge.model_store import ModelStore
from edge.mqtt_util import backoff_delay
from protos import codec, signing

FLEET = "lab"
WAIT_S = 20.0


# --- helpers shared by the agent, publisher and monitor tests ------------------------------


class StoreNode:
    """A device whose releases and agent state live in a real :class:`ModelStore`.

    It implements ``edge.agent.ReleaseInstaller`` without the inference/training
    services of ``edge.node.EdgeNode``: enough to observe what the agent installs.
    """

    def __init__(self, device_id: str, root: Path, *, fleet: str = FLEET) -> None:
        self.device_id = device_id
        self.fleet = fleet
        self.store = ModelStore(root / device_id)
        self.installed: list[int] = []
        self.fail_installs = False

    def serving_version(self) -> int:
        return self.store.current_version() or 0

    def install_release(self, version: int, data: bytes, sha256: str) -> None:
        codec.package_from_bytes(data)  # a real device refuses an unparsable package
        if self.fail_installs:
            raise InstallError(f"cannot store version {version}: disk full (test node)")
        self.store.install(version, data, sha256)
        self.installed.append(version)

    def status(self) -> codec.DeviceStatus:
        version = self.serving_version()
        return codec.DeviceStatus(
            device_id=self.device_id,
            fleet=self.fleet,
            serving_version=version,
            state="SERVING" if version else "DEGRADED",
            timestamp_ms=0,
        )

    def read_state(self) -> dict[str, Any]:
        return self.store.read_state()

    def write_state(self, state: dict[str, Any]) -> None:
        self.store.write_state(state)


def make_package(version: int, *, size: int = 4096) -> bytes:
    """A small, valid, version-specific release artifact of roughly ``size`` bytes."""
    rng = np.random.default_rng(version)
    return codec.package_to_bytes(
        codec.ModelPackage(
            architecture_id="mlp-test",
            tflite=rng.bytes(size),
            card_json='{"name": "test"}',
            weights={"dense/kernel": rng.standard_normal((4, 3)).astype(np.float32)},
        )
    )


@dataclass
class FleetKeys:
    private: Ed25519PrivateKey
    public_path: Path


@pytest.fixture
def fleet_keys(tmp_path: Path) -> FleetKeys:
    key = signing.generate_private_key()
    path = tmp_path / "keys" / "fleet.pub"
    signing.write_public_key(key.public_key(), path)
    return FleetKeys(key, path)


AgentFactory = Callable[..., Agent]


@pytest.fixture
def agent_factory(broker: Broker, fleet_keys: FleetKeys) -> Iterator[AgentFactory]:
    """Start agents on the test broker; every one still running is stopped at teardown."""
    started: list[Agent] = []

    def start(node: StoreNode, *, on: Broker | None = None, **overrides: Any) -> Agent:
        b = on or broker
        options: dict[str, Any] = {
            "device_id": node.device_id,
            "fleet": node.fleet,
            "host": b.host,
            "port": b.port,
            "signing_public_key": fleet_keys.public_path,
            "status_interval_s": 1.0,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 2.0,
        }
        options.update(overrides)
        agent = Agent(AgentSettings(**options), node).start()
        started.append(agent)
        assert agent.wait_connected(WAIT_S)
        return agent

    yield start
    for agent in started:
        agent.stop()


@pytest.fixture
def monitor(broker: Broker) -> Iterator[FleetMonitor]:
    mon = FleetMonitor(host=broker.host, port=broker.port, fleet=FLEET).start()
    yield mon
    mon.stop()


def publish(
    broker: Broker, keys: FleetKeys, version: int, *, chunk_size: int = 1024, **kw: Any
) -> codec.Manifest:
    """Publish ``make_package(version)`` with a fresh publisher (like a cloud process would)."""
    with Publisher(
        host=broker.host,
        port=broker.port,
        fleet=FLEET,
        signing_key=keys.private,
        chunk_size=chunk_size,
        timeout_s=WAIT_S,
    ) as pub:
        return pub.publish_release(
            version=version,
            parent_version=kw.pop("parent_version", version - 1),
            round=version,
            package=make_package(version, size=kw.pop("size", 4096)),
            architecture_id="mlp-test",
            metrics={"accuracy": 0.9},
            **kw,
        )


# --- tests ------------------------------------------------------------------------------


def test_release_reaches_every_device_and_a_late_joiner(
    broker: Broker,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    monitor: FleetMonitor,
    tmp_path: Path,
) -> None:
    nodes = [StoreNode(f"dev-{i}", tmp_path) for i in range(3)]
    for node in nodes:
        agent_factory(node)

    manifest = publish(broker, fleet_keys, 1)
    assert manifest.chunk_count == 5  # 4 KiB tflite + card + weights in 1 KiB chunks

    monitor.wait_for_fleet_version(1, [n.device_id for n in nodes], WAIT_S)
    for node in nodes:
        assert node.installed == [1]
        assert node.read_state()[STATE_SEQUENCE_KEY] == manifest.sequence
    installed = monitor.wait_for_event(lambda e: e.kind == EVENT_INSTALLED, WAIT_S)
    assert installed.version == 1

    late = StoreNode("dev-late", tmp_path)
    agent_factory(late)
    monitor.wait_for_fleet_version(1, [late.device_id], WAIT_S)
    assert late.installed == [1]


def test_offline_device_installs_only_the_newest_release_on_return(
    broker: Broker,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    monitor: FleetMonitor,
    tmp_path: Path,
) -> None:
    stay, away = StoreNode("dev-stay", tmp_path), StoreNode("dev-away", tmp_path)
    agent_factory(stay)
    away_agent = agent_factory(away)
    publish(broker, fleet_keys, 1)
    monitor.wait_for_fleet_version(1, ["dev-stay", "dev-away"], WAIT_S)

    away_agent.stop()
    monitor.wait_for_status("dev-away", lambda s: s.state == "OFFLINE", WAIT_S)
    # (Waiting for v2 first: a v3 manifest arriving mid-download would supersede it.)
    publish(broker, fleet_keys, 2)
    monitor.wait_for_fleet_version(2, ["dev-stay"], WAIT_S)
    publish(broker, fleet_keys, 3)
    monitor.wait_for_fleet_version(3, ["dev-stay"], WAIT_S)

    # The device comes back as a new process: same id and store, fresh node object. The
    # broker resumes its persistent session (queued v2 and v3 manifests) and the
    # retained v3 manifest arrives again: v2 must be skipped.
    back = StoreNode("dev-away", tmp_path)
    assert back.serving_version() == 1
    agent_factory(back)
    monitor.wait_for_fleet_version(3, ["dev-away"], WAIT_S)
    assert back.installed == [3]
    assert stay.installed == [1, 2, 3]


def test_agents_converge_after_a_broker_restart(
    broker: Broker,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    monitor: FleetMonitor,
    tmp_path: Path,
) -> None:
    nodes = [StoreNode(f"dev-{i}", tmp_path) for i in range(3)]
    for node in nodes:
        agent_factory(node)
    publish(broker, fleet_keys, 1)
    ids = [n.device_id for n in nodes]
    monitor.wait_for_fleet_version(1, ids, WAIT_S)

    broker.restart()
    # A new publisher reads the persisted retained manifest to continue the sequence.
    second = publish(broker, fleet_keys, 2)
    monitor.wait_for_fleet_version(2, ids, WAIT_S)
    for node in nodes:
        assert node.installed == [1, 2]
        assert node.read_state()[STATE_SEQUENCE_KEY] == second.sequence


def test_pinned_lower_version_rolls_the_fleet_back(
    broker: Broker,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    monitor: FleetMonitor,
    tmp_path: Path,
) -> None:
    node = StoreNode("dev-0", tmp_path)
    agent_factory(node)
    publish(broker, fleet_keys, 1)
    publish(broker, fleet_keys, 2)
    monitor.wait_for_fleet_version(2, ["dev-0"], WAIT_S)

    publish(broker, fleet_keys, 1, parent_version=0, pinned=True)
    monitor.wait_for_fleet_version(1, ["dev-0"], WAIT_S)
    assert node.installed[-1] == 1

    # A later, normal release moves the fleet forward again.
    publish(broker, fleet_keys, 3)
    monitor.wait_for_fleet_version(3, ["dev-0"], WAIT_S)
    assert node.installed[-2:] == [1, 3]


def test_reconnect_backoff_doubles_with_jitter_up_to_the_maximum() -> None:
    rng = random.Random(7)
    for attempt, ceiling in enumerate([0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]):
        delays = [backoff_delay(attempt, 0.5, 8.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # jittered, not lock-step
    assert backoff_delay(10_000, 0.5, 30.0, rng) <= 30.0


def test_settings_report_every_problem_at_once(fleet_keys: FleetKeys) -> None:
    with pytest.raises(ConfigError) as info:
        AgentSettings(
            device_id="dev/0",
            fleet="lab#",
            host="127.0.0.1",
            port=0,
            signing_public_key=fleet_keys.public_path,
        )
    assert len(info.value.problems) == 3
