"""A phase that begins while no device is online takes its cohort when devices come online.

Seen end to end (tests/e2e/test_rollout_poisoned.py): in a fresh default fleet a device
is known only once it has answered a round, so the first round's candidate begins its
phase 1 before the registry sees any device online. The phase's cohort was empty and
stayed empty: the devices' checks were ignored ("outside the phase's cohort") and the
phase failed at its timeout, "no device of the phase checked the candidate", although
every device was there a second later. A real controller, registry and Mosquitto here;
which devices are online is what the test says.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud import config as cloud_config
from cloud.broker import Broker
from cloud.publisher import Publisher
from cloud.registry import Registry, sqlite_url
from cloud.releases import publish_version
from cloud.rollout import RolloutController
from protos import codec, cohort, signing
from tests.cloud.test_signer_rollout import _retained_candidate

FLEET = "fresh"
DEVICES = ["n1", "n2", "n3"]
WAIT_S = 15.0


@pytest.fixture
def wired(tmp_path: Path, broker: Broker) -> Iterator[tuple[Registry, RolloutController, set]]:
    registry = Registry(sqlite_url(tmp_path / "registry.db"))
    key = signing.generate_private_key()
    s = cloud_config.CloudSettings()
    s.cloud.fleet = FLEET
    s.rollout = dataclasses.replace(
        s.rollout,
        policy="staged",
        phases="0.25, 1.0",
        min_devices="1, 0",
        soak_s=0.0,
        phase_timeout_s=120.0,
    )

    def publisher() -> Publisher:
        return Publisher(host=broker.host, port=broker.port, fleet=FLEET, signing_key=key)

    def promote(version: int) -> int:
        with publisher() as pub:
            return publish_version(registry, pub, version, pinned=False).sequence

    for rnd in (0, 1):
        registry.add_version(
            package=bytes([rnd]) * 2048,
            architecture_id="x",
            round=rnd,
            run_id=None,
            parent_version=None,
            metrics={},
        )
    registry.set_current(1, pinned=False)
    online: set[str] = set()
    controller = RolloutController(
        s, registry, publisher=publisher, promote=promote, online_devices=lambda: set(online)
    ).start()
    try:
        yield registry, controller, online
    finally:
        controller.stop()
        registry.close()


def _checked(device: str, phase: int) -> codec.DeviceEvent:
    return codec.DeviceEvent(
        device,
        int(time.time() * 1000),
        "candidate_checked",
        "",
        2,
        {"candidate_accuracy": 0.9, "served_accuracy": 0.8, "examples": 50, "phase": phase},
    )


def _phase(controller: RolloutController) -> dict:
    active = controller.status()["active"]
    return dict(active["phases"][-1])


def _wait(what: str, ok, timeout: float = WAIT_S):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ok()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout:.0f}s")


def test_a_phase_begun_with_nobody_online_takes_the_devices_that_come_online(
    wired, broker: Broker
) -> None:  # type: ignore[no-untyped-def]
    registry, controller, online = wired
    controller.submit(2)
    assert _phase(controller)["cohort"] == []  # nobody online yet

    online.update(DEVICES)  # the devices' telemetry arrives
    first = min(DEVICES, key=lambda d: cohort.position(FLEET, d))
    _wait("phase 1 took its cohort", lambda: _phase(controller)["cohort"] == [first])
    # The check went out again for that cohort: the retained candidate addresses it.
    manifest = _retained_candidate(broker, FLEET)
    assert manifest is not None and (manifest.version, manifest.phase) == (2, 1)
    assert manifest.action == "check"
    assert cohort.members(FLEET, DEVICES, manifest.cohort_ppm) == [first]

    controller.on_events([_checked(first, 1)])
    _wait("phase 1 passed", lambda: _phase(controller)["phase"] == 2)
    passed = next(
        json.loads(e.detail)
        for e in registry.list_events(100)
        if e.kind == "rollout phase passed" and e.version == 2
    )
    assert passed["cohort"] == [first] and passed["timed_out"] is False, passed
    assert _phase(controller)["cohort"] == sorted(DEVICES)


def test_a_phase_with_nobody_online_still_fails_at_its_timeout(wired) -> None:  # type: ignore[no-untyped-def]
    registry, controller, _online = wired
    controller.policy = dataclasses.replace(controller.policy, phase_timeout_s=1.0)
    controller.submit(2)
    _wait(
        "the rollout ended",
        lambda: controller.status()["active"]["status"] != "running",
    )
    failed = next(
        json.loads(e.detail)
        for e in registry.list_events(100)
        if e.kind == "rollout phase failed" and e.version == 2
    )
    assert failed["cohort"] == [] and failed["timed_out"] is True, failed
    assert "no device of the phase checked" in failed["reason"]
