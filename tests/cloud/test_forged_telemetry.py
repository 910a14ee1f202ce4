"""The cloud does not believe forged telemetry (#15 item 5), on the default fleet.

A real Mosquitto, a real device agent, the real :class:`FleetMonitor` feeding the real
:class:`TelemetryGate` and registry, and a stock paho client as the attacker, who may
publish anything anywhere (the default fleet has no broker access control).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.broker import Broker
from cloud.fleet_monitor import MAX_REPORT_BYTES, FleetMonitor
from cloud.registry import MAX_STATUS_AHEAD_MS, InvalidRecordError, Registry
from cloud.telemetry import EVENT_UNKNOWN_VERSION, TelemetryGate
from cloud.web.app import build_overview
from protos import codec, topics
from tests.fixtures.agents import (
    FLEET,
    WAIT_S,
    AgentFactory,
    FleetKeys,
    StoreNode,
    publish,
)
from tests.fixtures.attacker import Attacker

YEAR_2100_MS = 4_102_444_800_000
TEN_MB = 10 * 1024 * 1024


def _status(device: str, ts: int, *, version: int = 1, state: str = "SERVING") -> bytes:
    return codec.status_to_bytes(
        codec.DeviceStatus(
            device_id=device, fleet=FLEET, serving_version=version, state=state, timestamp_ms=ts
        )
    )


def _wait(predicate: object, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.1)


@pytest.fixture
def cloud(broker: Broker, registry: Registry) -> Iterator[tuple[FleetMonitor, TelemetryGate]]:
    """The cloud's side as `cloud up` wires it: monitor → gate → registry."""
    gate = TelemetryGate(registry)
    monitor = FleetMonitor(
        host=broker.host, port=broker.port, fleet=FLEET,
        on_status=gate.on_status, on_event=gate.on_event,
    ).start()  # fmt: skip
    yield monitor, gate
    monitor.stop()


def test_registry_bounds_status_timestamps_by_receive_time(registry: Registry) -> None:
    now = int(time.time() * 1000)
    assert registry.upsert_device_status(codec.status_from_bytes(_status("d1", now)))
    with pytest.raises(InvalidRecordError, match="clock skew tolerated"):
        registry.upsert_device_status(codec.status_from_bytes(_status("d1", YEAR_2100_MS)))
    # Within the tolerance: accepted, stored at the receive time.
    slightly_ahead = now + MAX_STATUS_AHEAD_MS // 2
    assert registry.upsert_device_status(
        codec.status_from_bytes(_status("d1", slightly_ahead, version=2)), received_ms=now + 10
    )
    assert registry.get_device("d1").timestamp_ms == now + 10
    # ... so the device's next real status is not "older" than it.
    assert registry.upsert_device_status(
        codec.status_from_bytes(_status("d1", now + 20, version=3)), received_ms=now + 30
    )
    assert registry.get_device("d1").serving_version == 3


def test_a_row_frozen_in_the_future_by_an_older_release_thaws(registry: Registry) -> None:
    """A row stored before the rule (timestamp 2100) no longer blocks real statuses."""
    far = codec.status_from_bytes(_status("d1", YEAR_2100_MS, version=9))
    assert registry.upsert_device_status(far, received_ms=YEAR_2100_MS)  # "stored back then"
    now = int(time.time() * 1000)
    assert registry.upsert_device_status(codec.status_from_bytes(_status("d1", now, version=4)))
    assert registry.get_device("d1").serving_version == 4


def test_forged_statuses_and_events_are_not_believed(
    broker: Broker,
    registry: Registry,
    cloud: tuple[FleetMonitor, TelemetryGate],
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    tmp_path: Path,
) -> None:
    monitor, gate = cloud
    # dev-0 is a real device that answered in a round (what makes it known here).
    run = registry.start_run(num_rounds=1, strategy="fedavg", config={})
    registry.round_reply(run, 1, "dev-0", ok=True, num_examples=10)
    package_version = registry.add_version(
        package=b"v1", architecture_id="mlp-test", round=1, run_id=run,
        parent_version=None, metrics={},
    )  # fmt: skip
    assert package_version.version == 1
    node = StoreNode("dev-0", tmp_path)
    agent_factory(node)
    publish(broker, fleet_keys, 1)
    _wait(
        lambda: (
            "dev-0" in {d.device_id for d in registry.list_devices()}
            and registry.get_device("dev-0").serving_version == 1
        ),
        "dev-0 recorded serving v1",
    )

    with Attacker(broker.host, broker.port) as evil:
        # 1. A status from the year 2100 for the real device, retained.
        evil.publish(
            topics.device_status(FLEET, "dev-0"),
            _status("dev-0", YEAR_2100_MS, version=7),
            retain=True,
        )
        # 2. A device that does not exist says it is online.
        evil.publish(
            topics.device_status(FLEET, "ghost"),
            _status("ghost", int(time.time() * 1000)),
            retain=True,
        )
        # 3. A fake install of a version the registry never had.
        fake = codec.DeviceEvent(
            "dev-0", int(time.time() * 1000), "release_installed", "round 99", 99
        )
        evil.publish(topics.device_event(FLEET, "dev-0"), codec.event_to_bytes(fake))
        # 4. An oversized report that the broker would carry (under its own limit).
        evil.publish(topics.device_status(FLEET, "dev-0"), b"\x0a" + b"x" * (MAX_REPORT_BYTES + 1))

    flagged = _wait_event(registry, EVENT_UNKNOWN_VERSION)
    assert flagged.version == 99 and "does not know" in flagged.detail
    assert any(e.kind == "release_installed" and e.version == 99 for e in registry.list_events())

    # The real device's next statuses still land: its row is not frozen.
    before = registry.get_device("dev-0").received_at
    _wait(lambda: registry.get_device("dev-0").received_at > before + 1.0, "a later real status")
    row = registry.get_device("dev-0")
    assert row.serving_version == 1 and row.timestamp_ms < YEAR_2100_MS
    assert "ghost" not in {d.device_id for d in registry.list_devices()}
    assert gate.dropped >= 1
    assert monitor.malformed >= 1  # the oversized report was not decoded

    # The overview counts no ghost and raises no alert about dev-0's real version.
    view = build_overview(registry, FLEET)
    assert view.devices.total == 1 and view.alerts == []

    # The UI's alert: a device serving a version the registry does not know.
    now = int(time.time() * 1000)
    assert registry.upsert_device_status(
        codec.status_from_bytes(_status("dev-0", now + 1, version=99))
    )
    alerts = build_overview(registry, FLEET).alerts
    assert any("dev-0" in a and "99" in a for a in alerts), alerts


def _wait_event(registry: Registry, kind: str) -> object:
    found: list[object] = []

    def seen() -> bool:
        found[:] = [e for e in registry.list_events() if e.kind == kind]
        return bool(found)

    _wait(seen, f"a {kind} event")
    return found[0]


def test_a_ten_megabyte_payload_is_neither_forwarded_nor_retained(broker: Broker) -> None:
    """The broker's size limit covers every topic family, retained or not."""
    targets = [
        topics.release_manifest(FLEET),
        topics.release_chunk(FLEET, 1, 0),
        topics.device_status(FLEET, "dev-0"),
        topics.device_event(FLEET, "dev-0"),
        "anything/else",
    ]
    for i, topic in enumerate(targets):
        # Mosquitto 2.0.11 closes the sender's connection (MQTT 5 clients learn the
        # limit at CONNACK); either way the message is dropped.
        with Attacker(broker.host, broker.port, client_id=f"bulk-{i}") as evil:
            outcome = evil.try_publish(topic, b"\0" * TEN_MB, retain=True)
        assert outcome != "acked", topic
    with Attacker(broker.host, broker.port, client_id="small") as ok:
        # A small retained message still goes through (the limit is not "no retain").
        assert ok.try_publish("anything/small", b"ok", retain=True) == "acked"
    with Attacker(broker.host, broker.port, client_id="reader") as reader:
        held = reader.retained("#")
    assert held == [("anything/small", b"ok")]


def test_an_unknown_device_is_reported_once_a_minute_not_at_every_status(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    gate = TelemetryGate(registry)
    now = int(time.time() * 1000)
    with caplog.at_level(logging.WARNING, logger="cloud.telemetry"):
        for i in range(20):
            gate.on_statuses([codec.status_from_bytes(_status("ghost", now + i))])
            gate.on_status(codec.status_from_bytes(_status("other-ghost", now + i)))
    warned = [
        r.getMessage() for r in caplog.records if "not a device of this fleet" in r.getMessage()
    ]
    assert gate.dropped == 40  # every report is still dropped and counted
    assert len(warned) == 2, warned
    assert "'ghost'" in warned[0] and "'other-ghost'" in warned[1]
    assert registry.list_devices() == []
