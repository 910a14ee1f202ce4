"""Candidates (staged rollouts) at the device agent, against a real Mosquitto.

The cloud side is the real :class:`cloud.publisher.Publisher`; the attacker is the same
publisher with another key, or a stock paho client writing to the candidate topic. The
device is :class:`CandidateNode`: :class:`tests.edge.test_agent.StoreNode` (a real
:class:`edge.model_store.ModelStore`) plus the candidate calls, whose check reports the
mean of the candidate's weights as its "accuracy" so the figures are checkable.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from cloud.broker import Broker
from cloud.fleet_monitor import FleetMonitor
from cloud.publisher import Publisher
from edge.agent import (
    EVENT_CANDIDATE_CHECKED,
    EVENT_CANDIDATE_REVERTED,
    EVENT_CANDIDATE_SERVED,
    EVENT_REJECTED,
    STATE_CANDIDATE_SEQUENCE_KEY,
)
from protos import codec, cohort, signing, topics
from tests.fixtures.agents import (
    FLEET,
    WAIT_S,
    AgentFactory,
    FleetKeys,
    StoreNode,
    make_package,
    publish,
)


class CandidateNode(StoreNode):
    """A StoreNode that also stages, checks and activates candidates."""

    def __init__(self, device_id: str, root: Path) -> None:
        super().__init__(device_id, root)
        self.staged: list[int] = []
        self.checked: list[tuple[int, int]] = []

    def stage_release(self, version: int, data: bytes, sha256: str) -> None:
        codec.package_from_bytes(data)
        self.store.stage(version, data, sha256)
        self.staged.append(version)

    def has_version(self, version: int, sha256: str) -> bool:
        return self.store.has(version, sha256)

    def check_candidate(self, version: int, served_version: int) -> dict[str, float]:
        self.checked.append((version, served_version))
        weights = self.store.get(version).package().weights
        return {
            "candidate_accuracy": float(np.clip(np.mean(next(iter(weights.values()))), 0, 1)),
            "served_accuracy": 0.5,
            "candidate_loss": 1.0,
            "served_loss": 1.0,
            "examples": 10.0,
        }

    def activate(self, version: int) -> None:
        self.store.activate(version)


def _candidate(
    broker: Broker,
    key: Any,
    version: int,
    action: str,
    *,
    cohort_ppm: int = cohort.SCALE,
    served: int = 1,
    with_chunks: bool = True,
) -> codec.Manifest:
    with Publisher(
        host=broker.host, port=broker.port, fleet=FLEET, signing_key=key, chunk_size=1024
    ) as pub:
        return pub.publish_candidate(
            version=version,
            parent_version=served,
            round=version,
            package=make_package(version),
            architecture_id="mlp-test",
            metrics={},
            phase=1,
            cohort_ppm=cohort_ppm,
            action=action,
            served_version=served,
            with_chunks=with_chunks,
        )


def _raw_publish(broker: Broker, topic: str, payload: bytes) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="attacker")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(timeout=WAIT_S)
    finally:
        client.loop_stop()
        client.disconnect()


def _events(mon: FleetMonitor, device: str, kind: str) -> list[codec.DeviceEvent]:
    return [e for e in mon.events() if e.device_id == device and e.kind == kind]


def _wait(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_check_serve_and_revert_in_the_cohort_only(
    broker: Broker,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    monitor: FleetMonitor,
    tmp_path: Path,
) -> None:
    nodes = [CandidateNode(f"dev-{i}", tmp_path) for i in range(4)]
    for node in nodes:
        agent_factory(node)
    publish(broker, fleet_keys, 1)
    monitor.wait_for_fleet_version(1, [n.device_id for n in nodes], WAIT_S)
    ordered = sorted(nodes, key=lambda n: cohort.position(FLEET, n.device_id))
    inside, outside = ordered[0], ordered[1:]
    bound = cohort.position(FLEET, inside.device_id) + 1

    manifest = _candidate(broker, fleet_keys.private, 2, "check", cohort_ppm=bound)
    event = monitor.wait_for_event(
        lambda e: e.kind == EVENT_CANDIDATE_CHECKED and e.device_id == inside.device_id, WAIT_S
    )
    assert event.version == 2 and event.metrics["phase"] == 1.0
    assert event.metrics["served_accuracy"] == 0.5 and event.metrics["examples"] == 10.0
    assert inside.checked == [(2, 1)] and inside.staged == [2]
    assert inside.serving_version() == 1, "a checked candidate is not served"
    assert inside.read_state()[STATE_CANDIDATE_SEQUENCE_KEY] == manifest.sequence
    time.sleep(1.0)
    assert all(n.staged == [] and n.serving_version() == 1 for n in outside)

    _candidate(broker, fleet_keys.private, 2, "serve", cohort_ppm=bound, with_chunks=False)
    _wait(lambda: inside.serving_version() == 2, "the cohort to serve the candidate")
    monitor.wait_for_event(lambda e: e.kind == EVENT_CANDIDATE_SERVED, WAIT_S)
    _candidate(broker, fleet_keys.private, 2, "revert", with_chunks=False)
    _wait(lambda: inside.serving_version() == 1, "the candidate to be rolled back")
    monitor.wait_for_event(lambda e: e.kind == EVENT_CANDIDATE_REVERTED, WAIT_S)
    assert all(n.serving_version() == 1 for n in nodes)


def test_forged_replayed_and_malformed_candidates_are_refused(
    broker: Broker,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    monitor: FleetMonitor,
    tmp_path: Path,
) -> None:
    node = CandidateNode("dev-0", tmp_path)
    agent_factory(node)
    publish(broker, fleet_keys, 1)
    monitor.wait_for_fleet_version(1, [node.device_id], WAIT_S)

    # Signed with a key that is not the fleet's.
    _candidate(broker, signing.generate_private_key(), 2, "serve")
    bad_sig = monitor.wait_for_event(
        lambda e: e.kind == EVENT_REJECTED and "bad signature" in e.detail, WAIT_S
    )
    assert bad_sig.version == 2
    # Garbage, then a promoted (phase 0) manifest copied onto the candidate topic.
    _raw_publish(broker, topics.release_candidate(FLEET), b"\x08\x96\x01garbage")
    monitor.wait_for_event(lambda e: e.kind == EVENT_REJECTED and "malformed" in e.detail, WAIT_S)
    promoted = publish(broker, fleet_keys, 3)
    monitor.wait_for_fleet_version(3, [node.device_id], WAIT_S)
    _raw_publish(broker, topics.release_candidate(FLEET), codec.manifest_to_bytes(promoted))
    monitor.wait_for_event(
        lambda e: e.kind == EVENT_REJECTED and "promoted release on the candidate" in e.detail,
        WAIT_S,
    )
    # A real candidate, then an older one replayed: the replay is refused.
    old = _candidate(broker, fleet_keys.private, 4, "check", served=3)
    monitor.wait_for_event(lambda e: e.kind == EVENT_CANDIDATE_CHECKED, WAIT_S)
    newer = _candidate(broker, fleet_keys.private, 4, "check", served=3, with_chunks=False)
    assert newer.sequence > old.sequence
    _wait(lambda: len(node.checked) == 2, "the second check")
    _raw_publish(broker, topics.release_candidate(FLEET), codec.manifest_to_bytes(old))
    monitor.wait_for_event(
        lambda e: e.kind == EVENT_REJECTED and "replayed candidate" in e.detail, WAIT_S
    )
    assert node.checked == [(4, 3), (4, 3)]
    assert node.staged == [4] and node.serving_version() == 3, "nothing forged was served"


def test_a_device_without_candidate_support_keeps_following_releases(
    broker: Broker,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    monitor: FleetMonitor,
    tmp_path: Path,
) -> None:
    old = StoreNode("old-0", tmp_path)  # no stage/check/activate: a device before rollouts
    agent_factory(old)
    publish(broker, fleet_keys, 1)
    monitor.wait_for_fleet_version(1, [old.device_id], WAIT_S)
    _candidate(broker, fleet_keys.private, 2, "serve")
    time.sleep(1.0)
    assert old.installed == [1] and old.serving_version() == 1
    assert not _events(monitor, old.device_id, EVENT_REJECTED)
    publish(broker, fleet_keys, 2)  # the promoted release
    monitor.wait_for_fleet_version(2, [old.device_id], WAIT_S)
    assert old.installed == [1, 2]


def test_a_newer_candidate_returns_devices_from_an_older_unpromoted_one(
    broker: Broker,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    monitor: FleetMonitor,
    tmp_path: Path,
) -> None:
    node = CandidateNode("dev-0", tmp_path)
    agent_factory(node)
    publish(broker, fleet_keys, 1)
    monitor.wait_for_fleet_version(1, [node.device_id], WAIT_S)
    _candidate(broker, fleet_keys.private, 2, "serve")
    _wait(lambda: node.serving_version() == 2, "candidate 2 served")
    # Candidate 3 for a cohort this device is not in: it still drops candidate 2.
    _candidate(broker, fleet_keys.private, 3, "check", cohort_ppm=1)
    assert cohort.position(FLEET, node.device_id) >= 1  # outside that cohort
    _wait(lambda: node.serving_version() == 1, "the superseded candidate dropped")
    monitor.wait_for_event(lambda e: e.kind == EVENT_CANDIDATE_REVERTED, WAIT_S)
    assert node.staged == [2]


def test_a_device_restarted_before_the_chunks_came_still_checks_the_candidate(
    broker: Broker,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    monitor: FleetMonitor,
    tmp_path: Path,
) -> None:
    """The device's agent stops after it took a candidate's manifest but before its chunks
    arrived; when it starts again, the same retained manifest (same sequence) must be
    picked up, not dropped as already handled."""
    node = CandidateNode("dev-0", tmp_path)
    agent = agent_factory(node)
    publish(broker, fleet_keys, 1)
    monitor.wait_for_fleet_version(1, [node.device_id], WAIT_S)

    manifest = _candidate(broker, fleet_keys.private, 2, "check", with_chunks=False)
    _wait(
        lambda: node.read_state().get(STATE_CANDIDATE_SEQUENCE_KEY) == manifest.sequence,
        "the device to take the candidate's manifest",
    )
    agent.stop()
    assert node.checked == [] and node.staged == []
    # The chunks come while the device is down (retained, on the release chunk topics).
    chunks = codec.split_chunks(make_package(2), manifest.chunk_size)
    for index, chunk in enumerate(chunks):
        _raw_publish(broker, topics.release_chunk(FLEET, 2, index), chunk)

    agent_factory(node)
    event = monitor.wait_for_event(
        lambda e: e.kind == EVENT_CANDIDATE_CHECKED and e.device_id == node.device_id, WAIT_S
    )
    assert event.version == 2
    assert node.checked == [(2, 1)] and node.staged == [2]
    assert node.serving_version() == 1
