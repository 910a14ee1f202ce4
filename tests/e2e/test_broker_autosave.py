"""A SIGKILLed broker that comes back with an older release retained (#20).

Mosquitto saves its retained messages every ``autosave_interval`` (2 s) seconds, so a
broker SIGKILLed shortly after a release can come back from an autosave that still
holds the release before it. Real Mosquitto, cloud stack (watchdog, signer, registry)
and one emulated device: v1 is released and autosaved, v2 released; the broker is
SIGKILLed and, when the watchdog restarts it, its database is the autosave that holds
v1 (put in place as the broker starts, so the race is not left to chance). The cloud
must put the current release back: a fresh subscriber sees v2 as the retained manifest,
and a device that starts now, with no model, serves v2 (never v1).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from cloud.releases import package_weights
from cloud.signer import REPUBLISHED_EVENT_KIND
from protos import codec, topics
from tests.e2e.conftest import fleet_spec, kill_broker_back_from_autosave, wait_served

pytestmark = pytest.mark.slow


def _retained_version(port: int, fleet: str, timeout: float = 10.0) -> int | None:
    """The version of the retained release manifest a new subscriber gets (None: none,
    or the broker does not listen yet)."""
    got: list[bytes] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, msg: got.append(msg.payload)
    try:
        client.connect("127.0.0.1", port)
    except OSError:  # a restarted broker runs a moment before it listens
        return None
    client.subscribe(topics.release_manifest(fleet), qos=1)
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    return codec.manifest_from_bytes(got[-1]).version if got and got[-1] else None


def _add_version(stack, rnd: int, run_id: int) -> int:  # type: ignore[no-untyped-def]
    s = stack.settings
    pkg = codec.package_from_bytes((s.data_dir / "initial.pkg").read_bytes())
    weights = {k: np.asarray(v) * (1.0 + rnd / 10) for k, v in pkg.weights.items()}
    arch, data = package_weights(s.model.dir, weights)
    version = stack.registry.add_version(
        package=data,
        architecture_id=arch,
        round=rnd,
        run_id=run_id,
        parent_version=None,
        metrics={},
    )
    return int(version.version)


def test_a_broker_back_from_an_older_autosave_gets_the_current_release_again(
    cloud_settings, stack_factory, fleet_factory, monkeypatch
) -> None:
    s = cloud_settings
    stack = stack_factory(s)
    fleet_name = s.cloud.fleet
    port = stack.broker.config.port
    db = stack.broker.config.data_dir / "mosquitto.db"
    run_id = stack.registry.start_run(num_rounds=1, strategy="fedavg", config={})

    v1 = _add_version(stack, 0, run_id)
    stack.signer.signer.release(v1)
    released_at = time.time()
    deadline = time.monotonic() + 30
    while not (db.exists() and db.stat().st_mtime > released_at + 0.1):
        assert time.monotonic() < deadline, "mosquitto never autosaved after release 1"
        time.sleep(0.2)
    autosave_with_v1 = db.read_bytes()

    v2 = _add_version(stack, 1, run_id)
    stack.signer.signer.release(v2)
    assert _retained_version(port, fleet_name) == v2

    # The broker dies; when it starts again, its database is the autosave holding v1.
    kill_broker_back_from_autosave(stack, autosave_with_v1, monkeypatch)

    # What a device that connects now is told is the newest release.
    deadline = time.monotonic() + 30
    seen = _retained_version(port, fleet_name)
    while seen != v2 and time.monotonic() < deadline:
        time.sleep(0.5)
        seen = _retained_version(port, fleet_name)
    assert seen == v2, f"after the restart the retained manifest is version {seen}, not {v2}"
    assert stack.registry.current().version == v2  # type: ignore[union-attr]
    # The event is recorded once the republish is acknowledged, a moment after its manifest
    # is retained (what the subscriber above already saw): wait for it, do not race it.
    deadline = time.monotonic() + 30
    kinds = [e.kind for e in stack.registry.list_events(200)]
    while REPUBLISHED_EVENT_KIND not in kinds and time.monotonic() < deadline:
        time.sleep(0.2)
        kinds = [e.kind for e in stack.registry.list_events(200)]
    assert REPUBLISHED_EVENT_KIND in kinds, kinds

    # A device with no model yet installs what the broker holds: the current release.
    spec = dataclasses.replace(fleet_spec(s, stack, scheme="iid"), initial_package=None)
    fleet = fleet_factory(spec, 1, prefix="late")
    assert wait_served({d.name: d.address for d in fleet.devices}, v2, timeout=90)
