"""A release to a few hundred devices completes even while the cloud's callbacks are slow.

Issue 18: 1,000 devices never converged (999 left ``UPDATING``) because Mosquitto keeps
at most 20 unacknowledged QoS 1 messages in flight per client and queues only 1,000 more
(``max_queued_messages``); the monitor acknowledged each message only after its
callback (a registry write), a release brings about four messages per device at once
(two ``UPDATING`` statuses, ``SERVING``, the install event), and Mosquitto dropped the
rest ("Outgoing messages are being dropped for client edgefl-monitor-…").

Here the cloud's status callback is held until every device has installed (a registry
stalled for a moment, as a busy disk or a long read would) so that the whole burst meets
the broker's queue: with 300 devices that is 1,200 messages, the smallest fleet past
1,020 with margin. Real agents, real Publisher, real FleetMonitor, real Mosquitto.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud.broker import Broker
from cloud.fleet_monitor import FleetMonitor
from cloud.publisher import Publisher
from edge.agent import EVENT_INSTALLED, Agent, AgentSettings
from protos import codec, signing
from tests.fixtures.agents import make_package

FLEET = "stall"
DEVICES = 300
WAIT_S = 120.0


class MemoryNode:
    """A light device: the package is parsed, versions and state stay in memory."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.version = 0
        self.installed = threading.Event()
        self._state: dict[str, Any] = {}

    def serving_version(self) -> int:
        return self.version

    def install_release(self, version: int, data: bytes, sha256: str) -> None:
        codec.package_from_bytes(data)
        self.version = version
        self.installed.set()

    def status(self) -> codec.DeviceStatus:
        return codec.DeviceStatus(
            device_id=self.device_id,
            fleet=FLEET,
            serving_version=self.version,
            state="SERVING" if self.version else "DEGRADED",
            timestamp_ms=0,
        )

    def read_state(self) -> dict[str, Any]:
        return dict(self._state)

    def write_state(self, state: dict[str, Any]) -> None:
        self._state = dict(state)


@pytest.fixture
def fleet(broker: Broker, tmp_path: Path) -> Iterator[tuple[list[MemoryNode], Any]]:
    key = signing.generate_private_key()
    pub = tmp_path / "fleet.pub"
    signing.write_public_key(key.public_key(), pub)
    nodes = [MemoryNode(f"dev-{i}") for i in range(DEVICES)]
    agents: list[Agent] = []
    try:
        for node in nodes:
            settings = AgentSettings(
                device_id=node.device_id,
                fleet=FLEET,
                host=broker.host,
                port=broker.port,
                signing_public_key=pub,
                # No periodic report to repair a lost status: the release's own count.
                status_interval_s=3600.0,
            )
            agents.append(Agent(settings, node).start())
        for agent in agents:
            assert agent.wait_connected(WAIT_S)
        yield nodes, key
    finally:
        threads = [threading.Thread(target=a.stop) for a in agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)


@pytest.mark.slow
def test_release_reaches_the_monitor_from_every_device_while_its_callback_is_slow(
    broker: Broker, fleet: tuple[list[MemoryNode], Any]
) -> None:
    nodes, key = fleet
    ids = [n.device_id for n in nodes]
    held = threading.Event()
    release_gate = threading.Event()
    installed_events: set[str] = set()
    lock = threading.Lock()

    def on_status(_status: codec.DeviceStatus) -> None:
        if held.is_set():
            release_gate.wait(WAIT_S)

    def on_event(event: codec.DeviceEvent) -> None:
        if event.kind == EVENT_INSTALLED:
            with lock:
                installed_events.add(event.device_id)

    monitor = FleetMonitor(
        host=broker.host, port=broker.port, fleet=FLEET, on_status=on_status, on_event=on_event
    ).start()
    try:
        monitor.wait_for_fleet_version(0, ids, WAIT_S)
        held.set()
        with Publisher(host=broker.host, port=broker.port, fleet=FLEET, signing_key=key) as pub:
            pub.publish_release(
                version=1,
                parent_version=0,
                round=1,
                package=make_package(1),
                architecture_id="mlp-test",
                metrics={},
            )
        for node in nodes:
            assert node.installed.wait(WAIT_S), f"{node.device_id} did not install"
        time.sleep(2.0)  # the devices' last reports reach the broker
        release_gate.set()

        monitor.wait_for_fleet_version(1, ids, WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while len(installed_events) < DEVICES and time.monotonic() < deadline:
            time.sleep(0.2)
        with lock:
            assert installed_events == set(ids)
    finally:
        release_gate.set()
        monitor.stop()
    assert "messages are being dropped" not in broker.log_path.read_text()
