"""A real Mosquitto with TLS, hashed passwords and the fleet ACL, fed by flash and revoke.

Negative checks never wait for "nothing happened": every forbidden publish is followed,
on the same connection, by an allowed one, and Mosquitto delivers one client's messages
in order; so once the cloud has received the allowed message, a forbidden one that got
through would already be there.
"""

from __future__ import annotations

import queue
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cloud.broker import Broker
from devices.flash import flash
from devices.secure_fleet import SecureFleet, broker_pid_file, init_secure
from edge.mqtt_util import Endpoint, make_client, reason_failed, unique_client_id
from protos import topics

FLEET = "orchard"
WAIT_S = 20.0


@dataclass
class Client:
    """A connected paho client and what it saw."""

    client: mqtt.Client
    received: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)
    connects: int = 0
    disconnects: int = 0

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(
    broker: Broker, username: str | None, password: str | None, ca_file: Path | None
) -> tuple[Client | None, str]:
    """Connect once; return (client, "ok") or (None, why it was refused)."""
    endpoint = Endpoint(broker.host, broker.port, username, password, ca_file)
    paho = make_client(endpoint, unique_client_id("test"))
    result: queue.Queue[str] = queue.Queue()
    wrapper = Client(paho)

    def on_connect(_c, _u, _f, reason_code, _p) -> None:  # type: ignore[no-untyped-def]
        wrapper.connects += 1
        result.put(f"refused: {reason_code}" if reason_failed(reason_code) else "ok")

    def on_disconnect(_c, _u, _f, reason_code, _p) -> None:  # type: ignore[no-untyped-def]
        wrapper.disconnects += 1
        result.put(f"disconnected: {reason_code}")

    def on_message(_c, _u, msg) -> None:  # type: ignore[no-untyped-def]
        wrapper.received.put((msg.topic, msg.payload))

    paho.on_connect = on_connect
    paho.on_disconnect = on_disconnect
    paho.on_message = on_message
    try:
        paho.connect(broker.host, broker.port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        return None, f"error: {exc}"
    paho.loop_start()
    try:
        outcome = result.get(timeout=WAIT_S)
    except queue.Empty:
        outcome = "no answer"
    if outcome != "ok":
        paho.loop_stop()
        paho.disconnect()
        return None, outcome
    return wrapper, outcome


def subscribe(client: Client, *filters: str) -> None:
    done = threading.Event()
    client.client.on_subscribe = lambda *_a: done.set()
    client.client.subscribe([(f, 1) for f in filters])
    assert done.wait(WAIT_S)


def next_message(client: Client) -> tuple[str, bytes]:
    return client.received.get(timeout=WAIT_S)


@pytest.fixture
def secure(tmp_path: Path, broker_factory) -> Iterator[tuple[SecureFleet, Broker, dict[str, str]]]:
    """A secure fleet with devices dev-a and dev-b flashed, and its broker running."""
    sf = init_secure(tmp_path / "cloud", fleet=FLEET, hosts=[])
    broker = broker_factory("secure-broker", **sf.broker_options())
    passwords: dict[str, str] = {}
    for name in ("dev-a", "dev-b"):
        boot = tmp_path / f"boot-{name}"
        boot.mkdir()
        flash(cloud_dir=sf.data_dir, profile="rpi-zero-2w", name=name,
              cloud_host="127.0.0.1", boot=boot, reload=broker.reload)  # fmt: skip
        passwords[name] = (boot / "edgefl" / "secrets" / "mqtt.password").read_text().strip()
    passwords["cloud"] = sf.cloud_password()
    yield sf, broker, passwords


def _connect_ok(broker: Broker, sf: SecureFleet, user: str, password: str) -> Client:
    # The fixture's reloads are asynchronous (SIGHUP): retry until the broker knows the user.
    deadline = time.monotonic() + WAIT_S
    while True:
        client, why = connect(broker, user, password, sf.ca_cert)
        if client is not None:
            return client
        assert time.monotonic() < deadline, f"{user} cannot connect: {why}"
        time.sleep(0.2)


def test_devices_publish_only_their_own_topics(secure) -> None:
    sf, broker, passwords = secure
    cloud = _connect_ok(broker, sf, "cloud", passwords["cloud"])
    dev_a = _connect_ok(broker, sf, "dev-a", passwords["dev-a"])
    try:
        subscribe(
            cloud,
            topics.all_device_status_filter(FLEET),
            topics.all_device_event_filter(FLEET),
            f"edgefl/{FLEET}/release/#",
        )
        # Forbidden: B's topics and the release topics.
        dev_a.publish(topics.device_status(FLEET, "dev-b"), b"forged status")
        dev_a.publish(topics.device_event(FLEET, "dev-b"), b"forged event")
        dev_a.publish(topics.release_manifest(FLEET), b"forged manifest")
        dev_a.publish(topics.release_chunk(FLEET, 1, 0), b"forged chunk")
        # Allowed: its own status.
        dev_a.publish(topics.device_status(FLEET, "dev-a"), b"a is fine")
        assert next_message(cloud) == (topics.device_status(FLEET, "dev-a"), b"a is fine")
        assert cloud.received.empty()
        # The cloud may publish a release, and devices may read it.
        subscribe(dev_a, topics.release_manifest(FLEET))
        cloud.publish(topics.release_manifest(FLEET), b"manifest v1")
        assert next_message(dev_a) == (topics.release_manifest(FLEET), b"manifest v1")
        assert next_message(cloud) == (topics.release_manifest(FLEET), b"manifest v1")
    finally:
        dev_a.close()
        cloud.close()


def test_anonymous_wrong_password_and_plain_tcp_are_refused(secure) -> None:
    sf, broker, passwords = secure
    _connect_ok(broker, sf, "dev-a", passwords["dev-a"]).close()  # the positive control

    client, why = connect(broker, None, None, sf.ca_cert)
    assert client is None and why.startswith("refused"), why
    client, why = connect(broker, "dev-b", passwords["dev-a"], sf.ca_cert)
    assert client is None and why.startswith("refused"), why
    client, why = connect(broker, "dev-a", passwords["dev-a"], None)  # no TLS
    assert client is None, why
    # And a raw plaintext CONNECT gets no CONNACK: the listener speaks only TLS.
    with socket.create_connection((broker.host, broker.port), timeout=WAIT_S) as raw:
        raw.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")
        try:
            reply = raw.recv(16)
        except ConnectionResetError:
            reply = b""  # the broker dropped the connection
    assert not reply.startswith(b"\x20")  # no CONNACK


def test_revoked_device_is_refused_while_others_keep_working(secure) -> None:
    sf, broker, passwords = secure
    cloud = _connect_ok(broker, sf, "cloud", passwords["cloud"])
    dev_b = _connect_ok(broker, sf, "dev-b", passwords["dev-b"])
    try:
        subscribe(cloud, topics.all_device_status_filter(FLEET))
        # Revoke through the command line, as an operator would: it finds the running
        # broker through the PID file `edgefl cloud up` writes.
        assert broker.process is not None
        pid_file = broker_pid_file(sf.data_dir)
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{broker.process.pid}\n")
        edgefl = Path(sys.executable).parent / "edgefl"
        res = subprocess.run(
            [str(edgefl), "devices", "revoke", "dev-a", "--cloud-dir", str(sf.data_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        assert "revoked dev-a" in res.stdout and "no running broker" not in res.stdout

        deadline = time.monotonic() + WAIT_S
        while True:  # SIGHUP is asynchronous: wait until the reload took effect
            client, why = connect(broker, "dev-a", passwords["dev-a"], sf.ca_cert)
            if client is None:
                break
            client.close()
            assert time.monotonic() < deadline, "dev-a still accepted after revoke"
            time.sleep(0.2)
        assert why.startswith("refused"), why

        dev_b.publish(topics.device_status(FLEET, "dev-b"), b"b still here")
        assert next_message(cloud) == (topics.device_status(FLEET, "dev-b"), b"b still here")
        assert dev_b.connects == 1 and dev_b.disconnects == 0  # stayed connected
        assert "dev-a" not in sf.acl_file.read_text()
        assert "dev-a:" not in sf.broker_password_file.read_text()
    finally:
        dev_b.close()
        cloud.close()
