"""The agent under attack and failure: outsiders on the broker, failing installs, SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cloud.broker import Broker
from cloud.fleet_monitor import FleetMonitor
from cloud.registry import Registry, sqlite_url
from edge.agent import EVENT_CHUNK_REJECTED, EVENT_INSTALL_FAILED, EVENT_REJECTED
from edge.process import ManagedProcess
from protos import codec, signing, topics
from tests.fixtures.agents import (
    FLEET,
    WAIT_S,
    AgentFactory,
    FleetKeys,
    StoreNode,
    make_package,
    publish,
)

REPO = Path(__file__).resolve().parents[2]


class Outsider:
    """A plain paho client that may publish anything anywhere (anonymous broker, no ACL)."""

    def __init__(self, broker: Broker) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="outsider", protocol=mqtt.MQTTv311
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _rejected(monitor: FleetMonitor, device: str, kind: str, words: str) -> codec.DeviceEvent:
    return monitor.wait_for_event(
        lambda e: e.device_id == device and e.kind == kind and words in e.detail, WAIT_S
    )


def test_outsider_messages_are_rejected_and_reported(
    broker: Broker,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    monitor: FleetMonitor,
    tmp_path: Path,
) -> None:
    node = StoreNode("dev-0", tmp_path)
    agent_factory(node)
    v1 = publish(broker, fleet_keys, 1)
    monitor.wait_for_fleet_version(1, ["dev-0"], WAIT_S)
    publish(broker, fleet_keys, 2)
    monitor.wait_for_fleet_version(2, ["dev-0"], WAIT_S)
    manifest_topic = topics.release_manifest(FLEET)
    outsider = Outsider(broker)
    try:
        outsider.publish(manifest_topic, os.urandom(300))
        _rejected(monitor, "dev-0", EVENT_REJECTED, "malformed manifest")

        forged = dataclasses.replace(v1, version=7, parent_version=2, sequence=v1.sequence + 10**6)
        outsider.publish(manifest_topic, codec.manifest_to_bytes(forged))
        _rejected(monitor, "dev-0", EVENT_REJECTED, "does not verify")

        stranger = signing.sign_manifest(forged, signing.generate_private_key())
        outsider.publish(manifest_topic, codec.manifest_to_bytes(stranger))
        _rejected(monitor, "dev-0", EVENT_REJECTED, "signed by key")

        # The remaining manifests carry the fleet's real signature: each models a release
        # that is authentic but must still not be installed.
        other_fleet = signing.sign_manifest(
            dataclasses.replace(forged, fleet="other-fleet"), fleet_keys.private
        )
        outsider.publish(manifest_topic, codec.manifest_to_bytes(other_fleet))
        _rejected(monitor, "dev-0", EVENT_REJECTED, "for fleet 'other-fleet'")

        older = signing.sign_manifest(
            dataclasses.replace(v1, sequence=v1.sequence + 10**6), fleet_keys.private
        )
        outsider.publish(manifest_topic, codec.manifest_to_bytes(older))
        _rejected(monitor, "dev-0", EVENT_REJECTED, "older than the served version 2")

        outsider.publish(manifest_topic, codec.manifest_to_bytes(v1))  # genuine, replayed
        _rejected(monitor, "dev-0", EVENT_REJECTED, "replayed manifest")

        # Authentic v3 manifest whose retained chunks were overwritten with garbage.
        package = make_package(3)
        chunks = codec.split_chunks(package, 1024)
        v3 = signing.sign_manifest(
            dataclasses.replace(
                v1,
                version=3,
                parent_version=2,
                artifact_sha256=codec.sha256_hex(package),
                artifact_size=len(package),
                chunk_sha256=tuple(codec.sha256_hex(c) for c in chunks),
                sequence=v1.sequence + 2 * 10**6,
            ),
            fleet_keys.private,
        )
        for i in range(len(chunks)):
            outsider.publish(topics.release_chunk(FLEET, 3, i), os.urandom(1024))
        outsider.publish(manifest_topic, codec.manifest_to_bytes(v3))
        event = _rejected(monitor, "dev-0", EVENT_CHUNK_REJECTED, "does not match the manifest")
        assert event.version == 3
    finally:
        outsider.close()

    status = monitor.wait_for_status("dev-0", lambda s: s.state != "OFFLINE", WAIT_S)
    assert status.serving_version == node.serving_version() == 2
    assert node.installed == [1, 2]

    # A genuine release supersedes the stuck v3 download and installs.
    publish(broker, fleet_keys, 4)
    monitor.wait_for_fleet_version(4, ["dev-0"], WAIT_S)
    assert node.installed == [1, 2, 4]


def test_failed_install_is_reported_and_the_next_release_installs(
    broker: Broker,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    monitor: FleetMonitor,
    tmp_path: Path,
) -> None:
    node = StoreNode("dev-0", tmp_path)
    agent_factory(node)
    publish(broker, fleet_keys, 1)
    monitor.wait_for_fleet_version(1, ["dev-0"], WAIT_S)

    node.fail_installs = True
    publish(broker, fleet_keys, 2)
    event = _rejected(monitor, "dev-0", EVENT_INSTALL_FAILED, "disk full")
    assert event.version == 2
    status = monitor.wait_for_status("dev-0", lambda s: "disk full" in s.last_error, WAIT_S)
    assert status.serving_version == 1

    node.fail_installs = False
    publish(broker, fleet_keys, 3)
    monitor.wait_for_fleet_version(3, ["dev-0"], WAIT_S)
    assert node.installed == [1, 3]


_AGENT_SCRIPT = """
import json, sys, threading
from pathlib import Path
from edge.agent import Agent, AgentSettings
from tests.edge.test_agent import StoreNode
cfg = json.loads(sys.argv[1])
cfg["signing_public_key"] = Path(cfg["signing_public_key"])
Agent(AgentSettings(**cfg), StoreNode(cfg["device_id"], Path(sys.argv[2]))).start()
threading.Event().wait()
"""


def test_last_will_marks_a_killed_device_offline(
    broker: Broker, fleet_keys: FleetKeys, monitor: FleetMonitor, tmp_path: Path
) -> None:
    cfg = {
        "device_id": "dev-killed",
        "fleet": FLEET,
        "host": broker.host,
        "port": broker.port,
        "signing_public_key": str(fleet_keys.public_path),
        "status_interval_s": 1.0,
    }
    proc = ManagedProcess(
        "agent",
        [sys.executable, "-c", _AGENT_SCRIPT, json.dumps(cfg), str(tmp_path / "devices")],
        log_path=tmp_path / "agent.log",
        cwd=REPO,
        env={"PYTHONPATH": str(REPO)},
    ).start()
    registry = Registry(sqlite_url(tmp_path / "registry.db"))  # what the web UI reads
    try:
        alive = monitor.wait_for_status("dev-killed", lambda s: s.state != "OFFLINE", WAIT_S)
        assert alive.state == "DEGRADED"  # no model yet
        assert registry.upsert_device_status(alive)
        proc.kill()
        gone = monitor.wait_for_status("dev-killed", lambda s: s.state == "OFFLINE", WAIT_S)
        assert gone.device_id == "dev-killed"
        assert proc.returncode() == -9
        # The Will was composed at connect time, before the status the registry holds;
        # the registry must still record the device as gone.
        assert gone.timestamp_ms < alive.timestamp_ms
        assert registry.upsert_device_status(gone)
        assert not registry.get_device("dev-killed").online
    finally:
        proc.stop()
        registry.close()


@pytest.mark.parametrize("payload", [b"", b"\x00" * 10])
def test_garbage_on_chunk_topics_while_idle_is_harmless(
    broker: Broker,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    monitor: FleetMonitor,
    tmp_path: Path,
    payload: bytes,
) -> None:
    node = StoreNode("dev-0", tmp_path)
    agent_factory(node)
    outsider = Outsider(broker)
    try:
        outsider.publish(topics.release_chunk(FLEET, 1, 0), payload)
    finally:
        outsider.close()
    publish(broker, fleet_keys, 1)
    monitor.wait_for_fleet_version(1, ["dev-0"], WAIT_S)
    assert node.installed == [1]
