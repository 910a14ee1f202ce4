"""The fleet monitor against a real Mosquitto: decoding, malformed payloads, waiting."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest

from cloud.broker import Broker
from cloud.fleet_monitor import FleetMonitor, FleetTimeout
from protos import codec, topics

FLEET = "lab"
WAIT_S = 20.0


def _status(device: str, version: int, state: str = "SERVING") -> bytes:
    return codec.status_to_bytes(
        codec.DeviceStatus(
            device_id=device,
            fleet=FLEET,
            serving_version=version,
            state=state,
            timestamp_ms=1_700_000_000_000,
        )
    )


class Device:
    """A plain MQTT client standing in for a device (or an outsider)."""

    def __init__(self, broker: Broker) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_statuses_and_events_are_decoded_and_malformed_ones_dropped(broker: Broker) -> None:
    statuses: list[codec.DeviceStatus] = []
    events: list[codec.DeviceEvent] = []
    lock = threading.Lock()

    def on_status(s: codec.DeviceStatus) -> None:
        with lock:
            statuses.append(s)
        if s.device_id == "dev-bad-callback":
            raise RuntimeError("a broken registry must not stop the monitor")

    def on_event(e: codec.DeviceEvent) -> None:
        with lock:
            events.append(e)

    dev = Device(broker)
    # Retained before the monitor starts: it must still see it.
    dev.send(topics.device_status(FLEET, "dev-0"), _status("dev-0", 3), retain=True)
    monitor = FleetMonitor(
        host=broker.host, port=broker.port, fleet=FLEET, on_status=on_status, on_event=on_event
    ).start()
    try:
        monitor.wait_for_fleet_version(3, ["dev-0"], WAIT_S)
        dev.send(topics.device_status(FLEET, "dev-1"), b"\x08garbage")
        dev.send(topics.device_status(FLEET, "dev-2"), _status("dev-3", 1))  # id mismatch
        dev.send(topics.device_event(FLEET, "dev-1"), b"")
        dev.send(topics.device_status(FLEET, "dev-bad-callback"), _status("dev-bad-callback", 1))
        event = codec.DeviceEvent("dev-1", 1_700_000_000_000, "release_rejected", "bad", 4)
        dev.send(topics.device_event(FLEET, "dev-1"), codec.event_to_bytes(event))
        assert monitor.wait_for_event(lambda e: e.device_id == "dev-1", WAIT_S) == event
        monitor.wait_for_fleet_version(1, ["dev-bad-callback"], WAIT_S)
    finally:
        monitor.stop()
        dev.close()
    assert monitor.malformed == 2
    assert sorted(monitor.statuses()) == ["dev-0", "dev-bad-callback"]
    with lock:
        assert [s.device_id for s in statuses] == ["dev-0", "dev-bad-callback"]
        assert events == [event]


def test_waiting_for_a_version_names_the_lagging_devices(broker: Broker) -> None:
    dev = Device(broker)
    try:
        dev.send(topics.device_status(FLEET, "dev-0"), _status("dev-0", 2), retain=True)
        dev.send(topics.device_status(FLEET, "dev-1"), _status("dev-1", 1), retain=True)
        dev.send(topics.device_status(FLEET, "dev-2"), _status("dev-2", 2, "OFFLINE"), retain=True)
    finally:
        dev.close()
    with FleetMonitor(host=broker.host, port=broker.port, fleet=FLEET) as monitor:
        monitor.wait_for_fleet_version(2, ["dev-0"], WAIT_S)
        with pytest.raises(FleetTimeout) as info:
            monitor.wait_for_fleet_version(2, ["dev-0", "dev-1", "dev-2", "dev-9"], 0.5)
    message = str(info.value)
    assert "'dev-1': (1, 'SERVING')" in message
    assert "'dev-2': (2, 'OFFLINE')" in message
    assert "'dev-9': None" in message
    assert "'dev-0'" not in message.split("lagging")[1]


def test_monitor_resubscribes_after_a_broker_restart(broker: Broker) -> None:
    with FleetMonitor(
        host=broker.host, port=broker.port, fleet=FLEET, reconnect_min_s=0.2, reconnect_max_s=1.0
    ) as monitor:
        broker.restart()
        dev = Device(broker)
        try:
            # The monitor may still be reconnecting; a retained status reaches it either way.
            dev.send(topics.device_status(FLEET, "dev-0"), _status("dev-0", 5), retain=True)
            monitor.wait_for_fleet_version(5, ["dev-0"], WAIT_S)
            dev.send(
                topics.device_event(FLEET, "dev-0"),
                codec.event_to_bytes(codec.DeviceEvent("dev-0", 1, "release_installed", "", 5)),
            )
            assert monitor.wait_for_event(lambda e: e.version == 5, WAIT_S).kind == (
                "release_installed"
            )
        finally:
            dev.close()
