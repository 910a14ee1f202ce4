"""The device agent against a real Mosquitto: releases reach every device, late or offline.

Devices are :class:`StoreNode` objects (tests/fixtures/agents.py): a small real
implementation of ``edge.agent.ReleaseInstaller`` backed by the real on-disk
``edge.model_store.ModelStore`` (without the inference and training services of
``edge.node.EdgeNode``). The cloud side is the real :class:`cloud.publisher.Publisher`;
convergence is observed through the real :class:`cloud.fleet_monitor.FleetMonitor`.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cloud.broker import Broker
from cloud.fleet_monitor import FleetMonitor
from edge.agent import EVENT_INSTALLED, STATE_SEQUENCE_KEY, AgentSettings
from edge.errors import ConfigError
from edge.mqtt_util import backoff_delay
from tests.fixtures.agents import (
    FLEET,
    WAIT_S,
    AgentFactory,
    FleetKeys,
    StoreNode,
    fleet_keys,
    make_package,
    publish,
)

# Still imported from here by tests/e2e/test_bridges.py (the fixture among them).
__all__ = ["FLEET", "fleet_keys", "make_package"]


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
