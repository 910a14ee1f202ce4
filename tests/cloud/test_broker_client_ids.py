"""One device's login cannot knock another device offline (#15 item 5, secure fleets).

A real Mosquitto with hashed passwords and the fleet ACL (rendered by
:mod:`devices.secure_fleet`), a real agent for ``dev-b``, the cloud's real monitor and
publisher on the loopback listener, and a stock paho client logging in as ``dev-a``
that claims ``dev-b``'s client id again and again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.broker import Broker, BrokerConfig, BrokerError, write_password_file
from cloud.fleet_monitor import FleetMonitor
from cloud.publisher import Publisher
from devices.secure_fleet import CLOUD_USER, render_acl
from edge.agent import Agent, AgentSettings
from edge.process import free_port
from protos import codec, topics
from tests.fixtures.agents import FLEET, WAIT_S, FleetKeys, StoreNode, make_package
from tests.fixtures.attacker import Attacker

PASSWORDS = {"dev-a": "pw-a", "dev-b": "pw-b", CLOUD_USER: "pw-cloud"}
TAKEOVERS = 5


def _secured(tmp_path: Path, name: str, *, bind: bool) -> Broker:
    data = tmp_path / name
    data.mkdir()
    write_password_file(data / "passwd", PASSWORDS)
    (data / "acl").write_text(render_acl(FLEET, ["dev-a", "dev-b"]))
    return Broker(
        BrokerConfig(
            port=free_port(),
            data_dir=data,
            allow_anonymous=False,
            password_file=data / "passwd",
            acl_file=data / "acl",
            bind_client_id=bind,
            local_port=free_port() if bind else 0,
        )
    ).start()


class Watch:
    """The cloud's monitor on a broker port, remembering every status of every device."""

    def __init__(self, broker: Broker, port: int) -> None:
        self.seen: list[codec.DeviceStatus] = []
        self._lock = threading.Lock()
        self.monitor = FleetMonitor(
            host=broker.host, port=port, fleet=FLEET, on_status=self._record,
            username=CLOUD_USER, password=PASSWORDS[CLOUD_USER],
        ).start()  # fmt: skip

    def _record(self, status: codec.DeviceStatus) -> None:
        with self._lock:
            self.seen.append(status)

    def offline(self, device: str) -> int:
        with self._lock:
            return sum(1 for s in self.seen if s.device_id == device and s.state == "OFFLINE")


@pytest.fixture
def started() -> Iterator[list[object]]:
    things: list[object] = []
    yield things
    for thing in reversed(things):
        thing.stop()  # type: ignore[attr-defined]


def _device_b(broker: Broker, keys: FleetKeys, tmp_path: Path, started: list[object]) -> Agent:
    agent = Agent(
        AgentSettings(
            device_id="dev-b", fleet=FLEET, host=broker.host, port=broker.port,
            username="dev-b", password=PASSWORDS["dev-b"], signing_public_key=keys.public_path,
            status_interval_s=0.5, reconnect_min_s=0.2, reconnect_max_s=1.0,
        ),
        StoreNode("dev-b", tmp_path),
    ).start()  # fmt: skip
    started.append(agent)
    assert agent.wait_connected(WAIT_S)
    return agent


def _take_over(broker: Broker, watch: Watch) -> None:
    """dev-a logs in with its own password, claiming dev-b's client id, several times."""
    for _ in range(TAKEOVERS):
        with Attacker(
            broker.host, broker.port, client_id="dev-b",
            username="dev-a", password=PASSWORDS["dev-a"],
        ) as evil:  # fmt: skip
            # And tries to speak for dev-b: the ACL lets dev-a write only its own topics.
            evil.try_publish(
                topics.device_status(FLEET, "dev-b"),
                codec.status_to_bytes(
                    codec.DeviceStatus("dev-b", FLEET, 0, "OFFLINE", int(time.time() * 1000))
                ),
            )
            time.sleep(0.3)


def test_without_the_binding_the_takeover_works(
    tmp_path: Path, fleet_keys: FleetKeys, started: list[object]
) -> None:
    """The attack as reported: dev-b's Last Will fires every time."""
    broker = _secured(tmp_path, "plain", bind=False)
    started.append(broker)
    watch = Watch(broker, broker.port)
    started.append(watch.monitor)
    _device_b(broker, fleet_keys, tmp_path, started)
    watch.monitor.wait_for_status(
        "dev-b", lambda s: s.state == "SERVING" or s.state == "DEGRADED", WAIT_S
    )
    _take_over(broker, watch)
    deadline = time.monotonic() + WAIT_S
    while watch.offline("dev-b") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert watch.offline("dev-b") >= 1


def test_bound_client_ids_keep_the_device_online_and_the_cloud_connected(
    tmp_path: Path, fleet_keys: FleetKeys, started: list[object]
) -> None:
    broker = _secured(tmp_path, "bound", bind=True)
    started.append(broker)
    # The cloud's monitor and publisher share the `cloud` user: on the loopback listener
    # they are not renamed, so they do not take each other over either.
    local = broker.config.local_port
    watch = Watch(broker, local)
    started.append(watch.monitor)
    agent = _device_b(broker, fleet_keys, tmp_path, started)
    watch.monitor.wait_for_status("dev-b", lambda s: s.state != "OFFLINE", WAIT_S)

    _take_over(broker, watch)
    time.sleep(2.0)  # several of dev-b's status intervals
    assert watch.offline("dev-b") == 0
    assert agent.wait_connected(0.1)
    log = broker.log_path.read_text()
    assert "as dev-a" in log  # Mosquitto renamed the attacker's "dev-b" to its user name
    assert "Client dev-b already connected" not in log

    with Publisher(
        host=broker.host, port=local, fleet=FLEET, signing_key=fleet_keys.private,
        chunk_size=1024, username=CLOUD_USER, password=PASSWORDS[CLOUD_USER], timeout_s=WAIT_S,
    ) as pub:  # fmt: skip
        pub.publish_release(
            version=1, parent_version=0, round=1, package=make_package(1),
            architecture_id="mlp-test",
        )  # fmt: skip
    watch.monitor.wait_for_fleet_version(1, ["dev-b"], WAIT_S)
    assert watch.offline("dev-b") == 0


def test_binding_needs_logins(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="allow_anonymous false"):
        BrokerConfig(port=1, data_dir=tmp_path, bind_client_id=True).render()
