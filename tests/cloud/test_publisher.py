"""The release publisher against a real Mosquitto: chunking, retained cleanup, sequencing."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from cloud.broker import Broker, write_password_file
from cloud.fleet_monitor import FleetMonitor
from cloud.publisher import Publisher, PublishError
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
from tests.fixtures.broker import BrokerFactory


def retained(broker: Broker, topic_filter: str) -> dict[str, bytes]:
    """Every retained message a fresh subscriber to ``topic_filter`` receives."""
    got: dict[str, bytes] = {}
    acks: list[int] = []
    cond = threading.Condition()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with cond:
            got[msg.topic] = bytes(msg.payload)

    def on_subscribe(_c: mqtt.Client, _u: object, mid: int, *_rest: object) -> None:
        with cond:
            acks.append(mid)
            cond.notify_all()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe(topic_filter, qos=1)
        # The broker sends a subscription's retained messages before it reads our next
        # packet: once the second SUBACK is back, all of them have arrived.
        _, second = client.subscribe(topic_filter, qos=1)
        with cond:
            assert cond.wait_for(lambda: second in acks, WAIT_S)
            return dict(got)
    finally:
        client.disconnect()
        client.loop_stop()


def test_chunking_gets_a_package_through_a_broker_size_limit(
    broker_factory: BrokerFactory,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    tmp_path: Path,
) -> None:
    small = broker_factory("small", message_size_limit=16 * 1024)
    package = make_package(1, size=60 * 1024)
    assert len(package) > 3 * 16 * 1024
    node = StoreNode("dev-0", tmp_path)
    agent_factory(node, on=small)
    monitor = FleetMonitor(host=small.host, port=small.port, fleet=FLEET).start()
    try:
        with Publisher(
            host=small.host,
            port=small.port,
            fleet=FLEET,
            signing_key=fleet_keys.private,
            chunk_size=8 * 1024,
        ) as pub:
            manifest = pub.publish_release(
                version=1,
                parent_version=0,
                round=1,
                package=package,
                architecture_id="mlp-test",
                metrics={"accuracy": 0.5},
            )
        assert manifest.chunk_count == -(-len(package) // (8 * 1024))
        monitor.wait_for_fleet_version(1, ["dev-0"], WAIT_S)
        assert node.installed == [1]

        # Without chunking below the limit the broker drops the chunks: the publisher
        # says so and never publishes the manifest, so release 1 stays current.
        with (
            Publisher(
                host=small.host,
                port=small.port,
                fleet=FLEET,
                signing_key=fleet_keys.private,
                chunk_size=64 * 1024,
                timeout_s=3.0,
            ) as pub,
            pytest.raises(PublishError, match="release 2 chunks"),
        ):
            pub.publish_release(
                version=2,
                parent_version=1,
                round=2,
                package=make_package(2, size=60 * 1024),
                architecture_id="mlp-test",
            )
    finally:
        monitor.stop()
    current = retained(small, topics.release_manifest(FLEET))
    assert codec.manifest_from_bytes(current[topics.release_manifest(FLEET)]).version == 1


def test_superseded_chunks_are_cleared_even_by_a_restarted_publisher(
    broker: Broker, fleet_keys: FleetKeys
) -> None:
    first = publish(broker, fleet_keys, 1)
    assert len(retained(broker, topics.release_chunks_filter(FLEET, 1))) == first.chunk_count

    # A new Publisher (as after a cloud restart) learns v1 from the retained manifest.
    with Publisher(
        host=broker.host,
        port=broker.port,
        fleet=FLEET,
        signing_key=fleet_keys.private,
        chunk_size=1024,
    ) as pub:
        assert pub.previous is not None
        assert (pub.previous.version, pub.previous.chunk_count) == (1, first.chunk_count)
        package = make_package(2)
        second = pub.publish_release(
            version=2, parent_version=1, round=2, package=package, architecture_id="mlp-test"
        )
    assert second.sequence > first.sequence
    assert retained(broker, topics.release_chunks_filter(FLEET, 1)) == {}
    chunks = retained(broker, topics.release_chunks_filter(FLEET, 2))
    assert (
        b"".join(chunks[topics.release_chunk(FLEET, 2, i)] for i in range(len(chunks))) == package
    )
    manifest = codec.manifest_from_bytes(
        retained(broker, topics.release_manifest(FLEET))[topics.release_manifest(FLEET)]
    )
    signing.verify_manifest(manifest, fleet_keys.private.public_key())
    assert manifest == second


def test_sequence_continues_after_a_retained_manifest_from_the_future(
    broker: Broker, fleet_keys: FleetKeys
) -> None:
    # Another cloud instance whose clock ran ahead published sequence now + 1 day.
    ahead = publish(broker, fleet_keys, 1)
    future = signing.sign_manifest(
        dataclasses.replace(ahead, sequence=int(time.time() * 1000) + 86_400_000),
        fleet_keys.private,
    )
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(
        topics.release_manifest(FLEET), codec.manifest_to_bytes(future), qos=1, retain=True
    ).wait_for_publish(WAIT_S)
    client.disconnect()
    client.loop_stop()

    nxt = publish(broker, fleet_keys, 2)
    assert nxt.sequence == future.sequence + 1


def test_garbage_retained_manifest_does_not_stop_publishing(
    broker: Broker, fleet_keys: FleetKeys
) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(
        topics.release_manifest(FLEET), b"\xffnot a manifest", qos=1, retain=True
    ).wait_for_publish(WAIT_S)
    client.disconnect()
    client.loop_stop()
    with Publisher(
        host=broker.host, port=broker.port, fleet=FLEET, signing_key=fleet_keys.private
    ) as pub:
        assert pub.previous is None
        manifest = pub.publish_release(
            version=1,
            parent_version=0,
            round=0,
            package=make_package(1),
            architecture_id="mlp-test",
        )
    assert manifest.chunk_count == 1  # default chunk size 256 KiB


def test_publish_before_connect_and_unreachable_broker_raise(fleet_keys: FleetKeys) -> None:
    from edge.process import free_port

    pub = Publisher(host="127.0.0.1", port=free_port(), fleet=FLEET, signing_key=fleet_keys.private)
    with pytest.raises(PublishError, match="before connect"):
        pub.publish_release(version=1, parent_version=0, round=0, package=b"x", architecture_id="a")
    with pytest.raises(PublishError, match="cannot reach"):
        pub.connect()


def test_credentials_and_acls_keep_devices_from_publishing_releases(
    broker_factory: BrokerFactory,
    fleet_keys: FleetKeys,
    agent_factory: AgentFactory,
    tmp_path: Path,
) -> None:
    passwords = tmp_path / "auth" / "passwd"
    acl = tmp_path / "auth" / "acl"
    write_password_file(passwords, {"cloud": "cloud-secret", "dev-0": "dev-secret"})
    acl.write_text(
        "\n".join(
            [
                "user cloud",
                f"topic readwrite {topics.PREFIX}/{FLEET}/#",
                "",
                *topics.acl_device_pattern_lines(FLEET),
            ]
        )
        + "\n"
    )
    secure = broker_factory("secure", allow_anonymous=False, password_file=passwords, acl_file=acl)
    node = StoreNode("dev-0", tmp_path)
    agent_factory(node, on=secure, username="dev-0", password="dev-secret")

    def publisher(user: str, password: str, **kw: Any) -> Publisher:
        return Publisher(
            host=secure.host,
            port=secure.port,
            fleet=FLEET,
            signing_key=fleet_keys.private,
            username=user,
            password=password,
            **kw,
        )

    with publisher("cloud", "cloud-secret") as pub:
        pub.publish_release(
            version=1,
            parent_version=0,
            round=1,
            package=make_package(1),
            architecture_id="mlp-test",
        )
    with pytest.raises(PublishError, match="refused the connection"):
        publisher("cloud", "wrong").connect()
    # A device's credentials may not write release topics: the broker refuses the PUBACK.
    with (
        publisher("dev-0", "dev-secret", timeout_s=5.0) as pub,
        pytest.raises(PublishError, match="broker refused it"),
    ):
        pub.publish_release(
            version=9,
            parent_version=1,
            round=9,
            package=make_package(9),
            architecture_id="mlp-test",
        )
    monitor = FleetMonitor(
        host=secure.host, port=secure.port, fleet=FLEET, username="cloud", password="cloud-secret"
    ).start()
    try:
        monitor.wait_for_fleet_version(1, ["dev-0"], WAIT_S)
    finally:
        monitor.stop()
    assert node.installed == [1]


def test_publisher_reconnects_after_a_broker_restart(broker: Broker, fleet_keys: FleetKeys) -> None:
    with Publisher(
        host=broker.host,
        port=broker.port,
        fleet=FLEET,
        signing_key=fleet_keys.private,
        chunk_size=1024,
    ) as pub:
        first = pub.publish_release(
            version=1,
            parent_version=0,
            round=1,
            package=make_package(1),
            architecture_id="mlp-test",
        )
        broker.restart()
        second = pub.publish_release(
            version=2,
            parent_version=1,
            round=2,
            package=make_package(2),
            architecture_id="mlp-test",
        )
    assert second.sequence > first.sequence
    assert retained(broker, topics.release_chunks_filter(FLEET, 1)) == {}
    assert len(retained(broker, topics.release_chunks_filter(FLEET, 2))) == second.chunk_count
