"""The read-ahead MQTT client: QoS 0 PUBLISH packets taken straight from its buffer.

First the packet parsing over a real socket pair, with packets built by hand from MQTT
3.1.1's fixed header; then the client against a real Mosquitto, with payloads whose
sizes cross the remaining-length byte boundaries and QoS 1 messages in between, which
must still reach ``on_message`` (and be acknowledged) in their place.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time

import paho.mqtt.client as mqtt

from cloud.broker import Broker
from cloud.mqtt_read_ahead import ReadAheadClient, ReadAheadSocket
from edge.mqtt_util import Endpoint, make_client

WAIT_S = 30.0


def _publish_packet(topic: bytes, payload: bytes, *, qos: int = 0, retain: bool = False) -> bytes:
    """An MQTT 3.1.1 PUBLISH, built by hand (packet id 7 when QoS > 0)."""
    body = len(topic).to_bytes(2, "big") + topic + (b"\x00\x07" if qos else b"") + payload
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([0x30 | qos << 1 | int(retain)]) + bytes(encoded) + body


def _read_until(sock: ReadAheadSocket, raw: socket.socket, size: int) -> None:
    """Fill ``sock`` until it holds ``size`` bytes (the socket is non-blocking, as paho's)."""
    deadline = time.monotonic() + WAIT_S
    while sock.held < size:
        assert time.monotonic() < deadline, f"{sock.held} of {size} bytes"
        select.select([raw], [], [], 1.0)
        with contextlib.suppress(BlockingIOError):
            sock.fill()


def test_whole_qos0_publishes_are_taken_in_order_and_anything_else_is_left() -> None:
    a, b = socket.socketpair()
    b.setblocking(False)
    try:
        sock = ReadAheadSocket(b)
        small = _publish_packet(b"t/1", b"x" * 10)
        big = _publish_packet(b"t/2", bytes(range(256)) * 80, retain=True)  # 3-byte length
        empty = _publish_packet(b"t/3", b"")
        qos1 = _publish_packet(b"t/4", b"ack me", qos=1)
        assert big[1] & 0x80 and big[2] & 0x80 and not big[3] & 0x80
        a.sendall(small + big + empty + qos1 + small)
        wanted = len(small) + len(big) + len(empty) + len(qos1) + len(small)
        _read_until(sock, b, wanted)
        taken = sock.take_qos0_publishes(100)
        assert taken == [(b"t/1", b"x" * 10), (b"t/2", bytes(range(256)) * 80), (b"t/3", b"")]
        # The QoS 1 packet (it needs paho's PUBACK) stops the taking, whole, in place.
        assert sock.held == len(qos1) + len(small)
        assert sock.recv(len(qos1)) == qos1
        assert sock.take_qos0_publishes(100) == [(b"t/1", b"x" * 10)]

        # A packet not wholly read yet stays, and is taken once the rest has come.
        a.sendall(big[:5])
        _read_until(sock, b, 5)
        assert sock.take_qos0_publishes(100) == []
        a.sendall(big[5:] + small + small)
        _read_until(sock, b, len(big) + 2 * len(small))
        assert sock.take_qos0_publishes(2) == [
            (b"t/2", bytes(range(256)) * 80),
            (b"t/1", b"x" * 10),
        ]
        assert sock.take_qos0_publishes(2) == [(b"t/1", b"x" * 10)]

        # Malformed: an empty topic, a topic longer than the packet, a remaining length of
        # five bytes. Each is left for paho, which reports it.
        for bad in (
            b"\x30\x02\x00\x00",
            b"\x30\x03\x00\x05t",
            b"\x30\xff\xff\xff\xff\x01",
        ):
            a.sendall(bad)
            _read_until(sock, b, len(bad))
            assert sock.take_qos0_publishes(100) == []
            assert sock.recv(len(bad)) == bad
    finally:
        a.close()
        b.close()


def test_the_client_hands_qos0_messages_on_raw_and_the_rest_to_paho_in_order(
    broker: Broker,
) -> None:
    # Remaining length = 2 + topic (5 bytes for i < 10) + payload: 127|128 and 16383|16384
    # are where its encoding grows a byte. 70,000 bytes take several reads: paho reads a
    # packet not wholly held itself and hands it to on_message, in its place.
    sizes = [0, 1, 90, 120, 121, 122, 16_376, 16_377, 16_378, 70_000, 5, 111]
    got: list[tuple[str, str, bytes]] = []  # (how, topic, payload), network thread only
    subscribed = threading.Event()

    client = make_client(
        Endpoint(broker.host, broker.port),
        "read-ahead",
        client_class=ReadAheadClient,
        protocol=mqtt.MQTTv311,
    )
    assert isinstance(client, ReadAheadClient)
    client.on_qos0 = lambda topic, payload: got.append(("raw", topic.decode(), payload))
    client.on_message = lambda _c, _u, m: got.append((f"paho qos {m.qos}", m.topic, m.payload))
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_connect = lambda c, *_: c.subscribe([("s/#", 0), ("e/#", 1)])
    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    sender.connect(broker.host, broker.port)
    sender.loop_start()
    expected: list[tuple[int, str, bytes]] = []  # (qos, topic, payload)
    try:
        assert subscribed.wait(WAIT_S)
        for round_ in range(3):
            for i, size in enumerate(sizes):
                payload = bytes([i, round_]) * (size // 2) + b"z" * (size % 2)
                # Sent at QoS 1, delivered at the subscription's QoS 0.
                sender.publish(f"s/{round_}/{i}", payload, qos=1).wait_for_publish(WAIT_S)
                expected.append((0, f"s/{round_}/{i}", payload))
                if i % 4 == 0:
                    event = f"event {round_} {i}".encode()
                    sender.publish(f"e/{round_}/{i}", event, qos=1).wait_for_publish(WAIT_S)
                    expected.append((1, f"e/{round_}/{i}", event))
        deadline = time.monotonic() + WAIT_S
        while len(got) < len(expected):
            assert time.monotonic() < deadline, f"{len(got)} of {len(expected)} messages"
            time.sleep(0.05)
    finally:
        sender.disconnect()
        sender.loop_stop()
        client.disconnect()
        client.loop_stop()
    assert [(topic, payload) for _, topic, payload in got] == [(t, p) for _, t, p in expected]
    for (how, topic, _), (qos, _, _) in zip(got, expected, strict=True):
        assert how in (("raw", "paho qos 0") if qos == 0 else ("paho qos 1",)), topic
    assert any(how == "raw" for how, _, _ in got)
