"""One fleet over three brokers: a cloud broker and two regional brokers bridged to it.

Real Mosquitto processes (the regional ones run the config ``edgefl cloud bridge-config``
writes, the command run as a subprocess), real agents with on-disk model stores on both regions, the real Publisher and
FleetMonitor on the cloud broker. Releases published on the cloud reach every device;
statuses come back over the bridges; a regional broker that is down while a release is
published gets it once it is back, and so do its devices and a device that joins later.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud.bridge import BridgeConfig, BridgeError
from cloud.broker import Broker, BrokerConfig
from cloud.fleet_monitor import FleetMonitor
from cloud.publisher import Publisher
from edge.agent import Agent, AgentSettings
from edge.process import free_port
from tests.edge.test_agent import FLEET, FleetKeys, StoreNode, fleet_keys, make_package
from tests.fixtures.broker import BrokerFactory

__all__ = ["fleet_keys"]  # the fixture, shared with the agent tests

EDGEFL = str(Path(sys.executable).parent / "edgefl")
WAIT_S = 60.0
REGIONS = ("eu", "us")
PER_REGION = 3


def test_bridge_settings_are_checked_and_rendered() -> None:
    bridge = BridgeConfig(region="eu", fleet="lab", remote_host="10.0.0.5", remote_port=8883)
    lines = bridge.render_lines()
    assert "address 10.0.0.5:8883" in lines
    assert "topic edgefl/lab/release/# in 1" in lines
    assert "topic edgefl/lab/device/# out 1" in lines
    assert "cleansession false" in lines
    with pytest.raises(BridgeError) as info:
        BridgeConfig(
            region="eu/#", fleet="lab", remote_host="a b", remote_port=0, remote_username="u"
        )
    message = str(info.value)
    for problem in ("region", "remote port", "remote_host", "go together"):
        assert problem in message


def bridge_config(region: str, cloud: Broker, port: int, data_dir: Path) -> str:
    """The regional broker's mosquitto.conf, as ``edgefl cloud bridge-config`` writes it."""
    proc = subprocess.run(
        [
            EDGEFL,
            "cloud",
            "bridge-config",
            "--region",
            region,
            "--fleet",
            FLEET,
            "--cloud-broker",
            f"{cloud.host}:{cloud.port}",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def brokers(broker_factory: BrokerFactory, tmp_path: Path) -> Iterator[dict[str, Broker]]:
    cloud = broker_factory("cloud")
    out = {"cloud": cloud}
    try:
        for region in REGIONS:
            port, data_dir = free_port(), tmp_path / region
            text = bridge_config(region, cloud, port, data_dir)
            config = BrokerConfig(port=port, data_dir=data_dir)
            out[region] = Broker(config, conf_text=text).start()
        yield out
    finally:
        for region in REGIONS:
            if region in out:
                out[region].stop()


@pytest.fixture
def agents(brokers: dict[str, Broker], fleet_keys: FleetKeys, tmp_path: Path) -> Iterator[Any]:
    started: list[Agent] = []

    def start(device_id: str, region: str) -> StoreNode:
        node = StoreNode(device_id, tmp_path / "devices")
        settings = AgentSettings(
            device_id=device_id,
            fleet=FLEET,
            host=brokers[region].host,
            port=brokers[region].port,
            signing_public_key=fleet_keys.public_path,
            status_interval_s=1.0,
            reconnect_min_s=0.2,
            reconnect_max_s=1.0,
        )
        agent = Agent(settings, node).start()
        started.append(agent)
        assert agent.wait_connected(WAIT_S)
        return node

    yield start
    for agent in started:
        agent.stop()


def _publish(brokers: dict[str, Broker], keys: FleetKeys, version: int) -> None:
    cloud = brokers["cloud"]
    with Publisher(
        host=cloud.host, port=cloud.port, fleet=FLEET, signing_key=keys.private
    ) as publisher:
        publisher.publish_release(
            version=version,
            parent_version=version - 1,
            round=version,
            package=make_package(version),
            architecture_id="mlp-test",
            metrics={},
        )


@pytest.mark.slow
def test_releases_reach_devices_on_every_regional_broker_and_survive_a_restart(
    brokers: dict[str, Broker], agents: Any, fleet_keys: FleetKeys
) -> None:
    nodes = {
        region: [agents(f"{region}-{i}", region) for i in range(PER_REGION)] for region in REGIONS
    }
    ids = [n.device_id for region in REGIONS for n in nodes[region]]
    cloud = brokers["cloud"]
    with FleetMonitor(host=cloud.host, port=cloud.port, fleet=FLEET) as monitor:
        # Statuses of devices on both regions reach the cloud over the bridges.
        monitor.wait_for_fleet_version(0, ids, WAIT_S)

        _publish(brokers, fleet_keys, 1)
        monitor.wait_for_fleet_version(1, ids, WAIT_S)
        assert all(n.installed == [1] for region in REGIONS for n in nodes[region])

        # The "us" broker is down while release 2 is pushed; "eu" converges meanwhile.
        brokers["us"].stop()
        _publish(brokers, fleet_keys, 2)
        monitor.wait_for_fleet_version(2, [n.device_id for n in nodes["eu"]], WAIT_S)
        assert all(n.installed == [1] for n in nodes["us"])

        # Back on the same port with its persisted state: the bridge resubscribes, the
        # retained release 2 arrives, the reconnected devices install it.
        brokers["us"].start()
        monitor.wait_for_fleet_version(2, ids, WAIT_S)
        # A device that joins the region afterwards gets it from the regional broker.
        late = agents("us-late", "us")
        monitor.wait_for_fleet_version(2, [*ids, late.device_id], WAIT_S)
    assert all(n.installed == [1, 2] for region in REGIONS for n in nodes[region])
    assert late.installed == [2]
    assert "messages are being dropped" not in cloud.log_path.read_text()
