"""The fixtures themselves: a real broker keeps retained messages; SuperNodes register."""

from __future__ import annotations

import os
import threading

import paho.mqtt.client as mqtt
import pytest

from cloud.broker import Broker
from tests.fixtures.flower import wait_for_nodes


def _client(broker: Broker, client_id: str) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.connect(broker.host, broker.port)
    return client


def test_retained_message_reaches_a_later_subscriber(broker: Broker) -> None:
    pub = _client(broker, "pub")
    pub.loop_start()
    info = pub.publish("edgefl/test/retained", b"hello", qos=1, retain=True)
    info.wait_for_publish(timeout=10)
    pub.loop_stop()
    pub.disconnect()

    got: list[bytes] = []
    done = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(msg.payload)
        done.set()

    sub = _client(broker, "sub")
    sub.on_message = on_message
    sub.subscribe("edgefl/test/#", qos=1)
    sub.loop_start()
    try:
        assert done.wait(10), "retained message not delivered"
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert got == [b"hello"]


def test_retained_message_survives_a_broker_restart(broker: Broker) -> None:
    pub = _client(broker, "pub")
    pub.loop_start()
    pub.publish("edgefl/test/keep", b"v1", qos=1, retain=True).wait_for_publish(timeout=10)
    pub.loop_stop()
    pub.disconnect()
    broker.restart()

    done = threading.Event()
    got: list[bytes] = []
    sub = _client(broker, "sub2")
    sub.on_message = lambda _c, _u, msg: (got.append(msg.payload), done.set())
    sub.subscribe("edgefl/test/keep", qos=1)
    sub.loop_start()
    try:
        assert done.wait(10)
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert got == [b"v1"]


def test_broker_is_stopped_by_pid(broker_factory) -> None:
    b = broker_factory("short-lived")
    pid = b.process.pid
    b.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_password_file_refuses_wrong_credentials(broker_factory, tmp_path) -> None:
    from cloud.broker import write_password_file

    pw = tmp_path / "passwd"
    write_password_file(pw, {"alice": "s3cret"})
    assert oct(pw.stat().st_mode & 0o777) == "0o600"
    b = broker_factory("auth", allow_anonymous=False, password_file=pw)

    def connect(user: str | None, password: str | None) -> int:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"c-{user}")
        if user is not None:
            c.username_pw_set(user, password)
        result: list[int] = []
        ev = threading.Event()
        c.on_connect = lambda _c, _u, _f, rc, _p=None: (result.append(rc.value), ev.set())
        c.connect(b.host, b.port)
        c.loop_start()
        ev.wait(10)
        c.loop_stop()
        c.disconnect()
        return result[0]

    assert connect("alice", "s3cret") == 0
    assert connect("alice", "wrong") != 0
    assert connect(None, None) != 0


@pytest.mark.slow
def test_supernodes_register_with_the_superlink(superlink, supernode_factory) -> None:
    supernode_factory(superlink, "node-a", node_config={"device-id": "a"})
    supernode_factory(superlink, "node-b", node_config={"device-id": "b"})
    ids = wait_for_nodes(superlink, 2, timeout=60)
    assert len(set(ids)) == 2
