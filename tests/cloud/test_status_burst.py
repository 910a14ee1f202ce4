"""A burst of statuses from many clients: the registry ends with every device's latest,
and the fleet monitor's counters account for every message the broker delivered.

Issue 18: 10,000 simulated devices sent ~2,000 statuses/s and the cloud wrote ~850/s,
with neither the monitor's queue nor the broker's stored-message count growing: the
rest sat, uncounted, in Mosquitto's output queue for the monitor. The monitor now counts
what it receives and, when it is behind, hands on only each device's latest status
(counted as superseded). Here its worker is held (a registry stalled for a moment) while
10 real MQTT clients publish 5 statuses for each of 200 devices through a real
Mosquitto, plus one malformed payload and one empty retained message; then it is let go.
Once over plain TCP and once over TLS (the monitor reads its socket ahead of paho, and a
TLS socket holds decrypted bytes of its own).
"""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cloud.broker import Broker
from cloud.fleet_monitor import FleetMonitor
from cloud.registry import Registry, sqlite_url
from devices import pki
from protos import codec, topics
from tests.fixtures.broker import BrokerFactory

FLEET = "burst"
CLIENTS = 10
DEVICES_PER_CLIENT = 20
STATUSES_PER_DEVICE = 5
WAIT_S = 60.0


def _status(device_id: str, k: int) -> bytes:
    return codec.status_to_bytes(
        codec.DeviceStatus(
            device_id=device_id,
            fleet=FLEET,
            serving_version=k,
            state="SERVING",
            timestamp_ms=int(time.time() * 1000) - 60_000 + k,
        )
    )


def _wait(predicate: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} not reached within {WAIT_S:.0f} s"
        time.sleep(0.05)


def _tls_broker(broker_factory: BrokerFactory, tmp_path: Path) -> tuple[Broker, Path]:
    ca_cert, ca_key = pki.create_ca("burst test CA")
    cert, key = pki.issue_server_certificate(ca_cert, ca_key, common_name="broker")
    ca, certfile, keyfile = tmp_path / "ca.pem", tmp_path / "broker.pem", tmp_path / "broker.key"
    pki.write_certificate(ca, ca_cert)
    pki.write_certificate(certfile, cert)
    pki.write_private_key(keyfile, key)
    return broker_factory("tls", certfile=certfile, keyfile=keyfile), ca


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_a_held_monitor_catches_up_with_every_device_and_counts_every_message(
    broker_factory: BrokerFactory, tmp_path: Path, tls: bool
) -> None:
    ca: Path | None = None
    if tls:
        broker, ca = _tls_broker(broker_factory, tmp_path)
    else:
        broker = broker_factory()

    def client(client_id: str = "") -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if ca is not None:
            c.tls_set(ca_certs=str(ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.connect(broker.host, broker.port)
        c.loop_start()
        return c

    registry = Registry(sqlite_url(tmp_path / "registry.db"))
    release = threading.Event()
    batches: list[int] = []

    def on_statuses(statuses: list[codec.DeviceStatus]) -> None:
        batches.append(len(statuses))
        release.wait(WAIT_S)
        registry.upsert_device_statuses(statuses)

    monitor = FleetMonitor(
        host=broker.host, port=broker.port, fleet=FLEET, on_status_batch=on_statuses, ca_file=ca
    ).start()
    clients: list[mqtt.Client] = []
    try:
        # The primer's batch holds the worker; what follows waits in the monitor's queue.
        primer = client()
        clients.append(primer)
        primer.publish(topics.device_status(FLEET, "primer"), _status("primer", 1), qos=1)
        _wait(lambda: batches == [1], "the primer's batch")

        infos = []
        devices = [
            [f"dev-{c:02d}-{d:02d}" for d in range(DEVICES_PER_CLIENT)] for c in range(CLIENTS)
        ]
        clients += [client(f"burst-{c}") for c in range(CLIENTS)]
        for k in range(1, STATUSES_PER_DEVICE + 1):
            for publisher, ids in zip(clients[1:], devices, strict=True):
                for device_id in ids:
                    topic = topics.device_status(FLEET, device_id)
                    infos.append(
                        publisher.publish(topic, _status(device_id, k), qos=1, retain=True)
                    )
        bad = topics.device_status(FLEET, "garbled")
        infos.append(primer.publish(bad, b"\xff not a protobuf", qos=1))
        # An empty retained message clears a topic; the monitor ignores it.
        infos.append(primer.publish(topics.device_status(FLEET, "gone"), b"", qos=1, retain=True))
        for info in infos:
            info.wait_for_publish(WAIT_S)
        sent = 1 + len(infos)
        _wait(lambda: monitor.received == sent, f"{sent} messages received")
        assert monitor.backlog == sent - 1  # all waiting behind the held batch
        release.set()

        def settled() -> bool:
            return monitor.backlog == 0 and (
                monitor.statuses_handled
                + monitor.events_handled
                + monitor.superseded
                + monitor.malformed
                + monitor.ignored
                == monitor.received
            )

        _wait(settled, "every received message accounted for")
    finally:
        release.set()
        for c in clients:
            c.disconnect()
            c.loop_stop()
        monitor.stop()

    all_ids = [d for ids in devices for d in ids]
    burst = len(all_ids) * STATUSES_PER_DEVICE
    assert monitor.received == 1 + burst + 2
    # The held batch came back with all 1,000 statuses: one per device went on.
    assert monitor.statuses_handled == 1 + len(all_ids)
    assert monitor.superseded == burst - len(all_ids)
    assert (monitor.malformed, monitor.ignored, monitor.events_handled) == (1, 1, 0)
    assert batches == [1, len(all_ids)]
    stored = {d.device_id: d.serving_version for d in registry.list_devices()}
    assert stored == {"primer": 1, **{d: STATUSES_PER_DEVICE for d in all_ids}}
    latest = monitor.statuses()
    assert {d: latest[d].serving_version for d in all_ids} == dict.fromkeys(
        all_ids, STATUSES_PER_DEVICE
    )
    registry.close()
