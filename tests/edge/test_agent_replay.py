"""No downgrades, no jumps: replayed and never-issued releases are refused (#15 item 4).

The attacker is a stock paho client (:class:`tests.fixtures.attacker.Attacker`) that
republishes, retained, a release it recorded off the broker, or one signed with the
fleet key but carrying a sequence the cloud never issued. The devices are real agents on
a real Mosquitto, their releases stored in a real :class:`ModelStore`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from cloud.broker import Broker
from cloud.fleet_monitor import FleetMonitor
from cloud.registry import Registry, sqlite_url
from devices.flash import fleet_floor
from edge.agent import EVENT_INSTALLED, EVENT_REJECTED, AgentSettings
from edge.config import load_settings
from edge.errors import ConfigError
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
from tests.fixtures.attacker import Attacker

CHUNK = 1024


def _record(broker: Broker, version: int) -> list[tuple[str, bytes]]:
    """What an eavesdropper keeps of a release: its manifest and chunks, as published."""
    with Attacker(broker.host, broker.port, client_id="recorder") as spy:
        held = spy.retained(f"edgefl/{FLEET}/release/#")
    kept = [(t, p) for t, p in held if p]
    manifest = codec.manifest_from_bytes(
        next(p for t, p in kept if t == topics.release_manifest(FLEET))
    )
    assert manifest.version == version
    return kept


def _replay(broker: Broker, recorded: list[tuple[str, bytes]]) -> None:
    with Attacker(broker.host, broker.port, client_id="replayer") as evil:
        # Chunks first, like the real publisher, so a device that accepts finds them all.
        for topic, payload in sorted(recorded, key=lambda tp: tp[0].endswith("manifest")):
            evil.publish(topic, payload, retain=True)


def _wipe(node: StoreNode, tmp_path: Path) -> StoreNode:
    """The device lost its data directory: models and agent state are gone."""
    shutil.rmtree(tmp_path / node.device_id)
    fresh = StoreNode(node.device_id, tmp_path)
    assert fresh.serving_version() == 0 and fresh.read_state() == {}
    return fresh


def test_a_device_that_lost_its_state_refuses_a_replayed_older_release(
    broker: Broker,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    monitor: FleetMonitor,
    tmp_path: Path,
) -> None:
    publish(broker, fleet_keys, 1, chunk_size=CHUNK)
    v1 = _record(broker, 1)
    second = publish(broker, fleet_keys, 2, chunk_size=CHUNK)
    # The device is flashed while the fleet serves v2: its bundle carries that sequence.
    floor = second.sequence

    node = StoreNode("dev-0", tmp_path)
    agent = agent_factory(node, min_sequence=floor)
    monitor.wait_for_fleet_version(2, ["dev-0"], WAIT_S)
    agent.stop()

    # Without the floor, the replay works: this is the attack as it was reported.
    naive = _wipe(node, tmp_path)
    _replay(broker, v1)
    naive_agent = agent_factory(naive)
    monitor.wait_for_fleet_version(1, ["dev-0"], WAIT_S)
    assert naive.installed == [1]
    naive_agent.stop()

    # With the floor from its bundle, the same device refuses it, state dir lost or not.
    guarded = _wipe(naive, tmp_path)
    _replay(broker, v1)
    agent_factory(guarded, min_sequence=floor)
    refused = monitor.wait_for_event(
        lambda e: e.device_id == "dev-0" and e.kind == EVENT_REJECTED and "floor" in e.detail,
        WAIT_S,
    )
    assert refused.version == 1
    assert f"below this device's floor {floor}" in refused.detail
    time.sleep(1.5)  # a few status reports: nothing was installed meanwhile
    assert guarded.installed == []
    assert monitor.statuses()["dev-0"].serving_version == 0

    # The operator's next release (a fresh sequence) still installs.
    publish(broker, fleet_keys, 3, chunk_size=CHUNK)
    monitor.wait_for_fleet_version(3, ["dev-0"], WAIT_S)
    assert guarded.installed == [3]


def test_a_pin_is_a_new_release_and_passes_the_floor(
    broker: Broker,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    monitor: FleetMonitor,
    tmp_path: Path,
) -> None:
    publish(broker, fleet_keys, 1, chunk_size=CHUNK)
    second = publish(broker, fleet_keys, 2, chunk_size=CHUNK)
    node = StoreNode("dev-0", tmp_path)
    agent_factory(node, min_sequence=second.sequence)
    monitor.wait_for_fleet_version(2, ["dev-0"], WAIT_S)
    pin = publish(broker, fleet_keys, 1, chunk_size=CHUNK, parent_version=0, pinned=True)
    assert pin.sequence > second.sequence
    monitor.wait_for_fleet_version(1, ["dev-0"], WAIT_S)
    assert node.installed == [2, 1]


def test_a_sequence_the_cloud_never_issued_does_not_lock_out_later_releases(
    broker: Broker,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    monitor: FleetMonitor,
    tmp_path: Path,
) -> None:
    """Someone holding the key publishes "v99" with a sequence years ahead of any clock."""
    publish(broker, fleet_keys, 1, chunk_size=CHUNK)
    node = StoreNode("dev-0", tmp_path)
    agent_factory(node)
    monitor.wait_for_fleet_version(1, ["dev-0"], WAIT_S)

    package = make_package(99)
    chunks = codec.split_chunks(package, CHUNK)
    ten_years_ms = 10 * 365 * 24 * 3600 * 1000
    forged = signing.sign_manifest(
        codec.Manifest(
            fleet=FLEET,
            version=99,
            parent_version=1,
            round=99,
            created_at_ms=int(time.time() * 1000),
            architecture_id="mlp-test",
            artifact_sha256=codec.sha256_hex(package),
            artifact_size=len(package),
            chunk_size=CHUNK,
            chunk_sha256=tuple(codec.sha256_hex(c) for c in chunks),
            sequence=int(time.time() * 1000) + ten_years_ms,
        ),
        fleet_keys.private,
    )
    with Attacker(broker.host, broker.port) as evil:
        for i, chunk in enumerate(chunks):
            evil.publish(topics.release_chunk(FLEET, 99, i), chunk, retain=True)
        evil.publish(topics.release_manifest(FLEET), codec.manifest_to_bytes(forged), retain=True)
    refused = monitor.wait_for_event(lambda e: e.kind == EVENT_REJECTED and e.version == 99, WAIT_S)
    assert "ahead of this device's clock" in refused.detail
    assert 99 not in node.installed

    # The operator's real release 2 is not "older than 99": it installs.
    publish(broker, fleet_keys, 2, chunk_size=CHUNK)
    monitor.wait_for_fleet_version(2, ["dev-0"], WAIT_S)
    assert node.installed == [1, 2]
    assert monitor.wait_for_event(lambda e: e.kind == EVENT_INSTALLED and e.version == 2, WAIT_S)


def test_the_floor_comes_from_the_bundle_config_and_the_cloud_registry(
    tmp_path: Path, fleet_keys: FleetKeys
) -> None:
    data_dir = tmp_path / "cloud"
    data_dir.mkdir()
    assert fleet_floor(data_dir) == 0  # no registry yet: no floor
    with Registry(sqlite_url(data_dir / "registry.db")) as registry:
        v = registry.add_version(
            package=b"pkg", architecture_id="a", round=0, run_id=None,
            parent_version=None, metrics={},
        )  # fmt: skip
        registry.set_current(v.version, pinned=False, sequence=1_796_000_000_123)
    assert fleet_floor(data_dir) == 1_796_000_000_123

    conf = tmp_path / "edge.toml"
    conf.write_text(
        '[device]\nid = "d"\n[mqtt]\nhost = "127.0.0.1"\n'
        f'[trust]\nsigning_public_key = "{fleet_keys.public_path}"\nmin_sequence = 42\n'
    )
    assert load_settings(conf).trust.min_sequence == 42
    conf.write_text(conf.read_text().replace("= 42", "= -1"))
    with pytest.raises(ConfigError, match="min_sequence: must be >= 0"):
        load_settings(conf)
    with pytest.raises(ConfigError, match="min_sequence must be ≥ 0"):
        AgentSettings(
            device_id="d", fleet=FLEET, host="h", port=1,
            signing_public_key=fleet_keys.public_path, min_sequence=-1,
        )  # fmt: skip
