"""A running candidate survives a broker restart (#19).

Real Mosquitto (SIGKILLed, restarted by the cloud's watchdog), cloud stack (signer and
rollout controller, registry) and two emulated devices. v1 is released and autosaved;
then v2 starts a staged rollout while phase 1's device is frozen (SIGSTOP), so it has
not checked the candidate yet. The broker is SIGKILLed and comes back from the autosave
that holds v1 only (put in place as it starts, as in ``test_broker_autosave``): no
candidate, no candidate chunks. The controller must put the running candidate back: a
fresh subscriber sees v2's phase-1 ``check`` manifest and all its chunks retained, the
thawed device checks it, phase 1 passes on its report (not at the timeout), and v2 is
promoted and served by both devices. Before the fix the candidate was gone and the
phase could only time out and fail.
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from cloud.config import RolloutSection
from cloud.releases import package_weights
from cloud.rollout import REPUBLISHED_EVENT_KIND
from protos import codec, cohort, topics
from tests.e2e.conftest import fleet_spec, kill_broker_back_from_autosave, wait_served

pytestmark = pytest.mark.slow

PHASE_TIMEOUT_S = 60.0


def _retained(port: int, fleet: str, timeout: float = 5.0) -> dict[str, bytes]:
    """Every non-empty retained message of the fleet's release topics a new subscriber gets
    (empty if the broker does not listen yet)."""
    got: dict[str, bytes] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.payload:
            got[msg.topic] = bytes(msg.payload)

    client.on_message = on_message
    try:
        client.connect("127.0.0.1", port)
    except OSError:  # a restarted broker runs a moment before it listens
        return got
    client.subscribe(f"edgefl/{fleet}/release/#", qos=1)
    client.loop_start()
    try:
        time.sleep(timeout)
    finally:
        client.loop_stop()
        client.disconnect()
    return got


def _candidate_in(retained: dict[str, bytes], fleet: str) -> codec.Manifest | None:
    raw = retained.get(topics.release_candidate(fleet))
    return None if raw is None else codec.manifest_from_bytes(raw)


def _add_version(stack, rnd: int, run_id: int) -> int:  # type: ignore[no-untyped-def]
    s = stack.settings
    pkg = codec.package_from_bytes((s.data_dir / "initial.pkg").read_bytes())
    weights = {k: np.asarray(v) * np.float32(1.0 + rnd / 100) for k, v in pkg.weights.items()}
    arch, data = package_weights(s.model.dir, weights)
    latest = stack.registry.latest_version()
    version = stack.registry.add_version(
        package=data,
        architecture_id=arch,
        round=rnd,
        run_id=run_id,
        parent_version=None if latest is None else latest.version,
        metrics={},
    )
    return int(version.version)


def _rollout_events(registry, version: int) -> list[tuple[str, dict]]:  # type: ignore[no-untyped-def]
    return [
        (e.kind, json.loads(e.detail))
        for e in reversed(registry.list_events(500))
        if e.device_id == "cloud" and e.kind.startswith("rollout") and e.version == version
    ]


def test_a_running_candidate_is_put_back_after_the_broker_restarts(
    cloud_settings, stack_factory, fleet_factory, monkeypatch
) -> None:
    s = cloud_settings
    s.rollout = RolloutSection(
        policy="staged",
        phases="0.5, 1.0",
        min_devices="1, 0",
        soak_s=1.0,
        phase_timeout_s=PHASE_TIMEOUT_S,
        silent_devices="failure",
        on_failure="halt",
    )
    stack = stack_factory(s)
    fleet_name = s.cloud.fleet
    port = stack.broker.config.port
    db = stack.broker.config.data_dir / "mosquitto.db"
    registry = stack.registry
    fleet = fleet_factory(fleet_spec(s, stack, scheme="iid"), 2)
    addresses = {d.name: d.address for d in fleet.devices}
    run_id = registry.start_run(num_rounds=2, strategy="fedavg", config={})
    registry.round_started(run_id, 1, sampled=sorted(addresses))
    for name in addresses:  # the default fleet believes telemetry of devices that answered
        registry.round_reply(run_id, 1, name, ok=True, num_examples=1)

    v1 = _add_version(stack, 0, run_id)
    released_at = time.time()
    stack.signer.signer.release(v1)  # the fleet's first version: released at once
    wait_served(addresses, v1, timeout=60)
    deadline = time.monotonic() + 60
    while {d.device_id for d in registry.list_devices() if d.online} < set(addresses):
        assert time.monotonic() < deadline, "devices not online in the registry"
        time.sleep(0.3)
    while not (db.exists() and db.stat().st_mtime > released_at + 0.5):
        assert time.monotonic() < deadline, "mosquitto never autosaved after release 1"
        time.sleep(0.2)
    autosave_with_v1 = db.read_bytes()

    first = min(addresses, key=lambda n: cohort.position(fleet_name, n))
    frozen = next(d for d in fleet.devices if d.name == first)
    pid = frozen.process.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)
    try:
        v2 = _add_version(stack, 1, run_id)
        stack.signer.signer.release(v2)
        status = stack.signer.signer.rollout.status()["active"]
        assert (status["version"], status["phase"]) == (v2, 1), status
        assert status["phases"][0]["cohort"] == [first], status
        before = _candidate_in(_retained(port, fleet_name, timeout=2.0), fleet_name)
        assert before is not None and before.version == v2 and before.action == "check"

        # The broker dies; it comes back from the autosave that holds v1 and no candidate.
        kill_broker_back_from_autosave(stack, autosave_with_v1, monkeypatch)

        # A device that connects now finds the running candidate and every chunk of it.
        deadline = time.monotonic() + 30
        retained = _retained(port, fleet_name)
        while (_candidate_in(retained, fleet_name) or before).sequence <= before.sequence:
            assert time.monotonic() < deadline, (
                f"no new candidate retained after the restart: {sorted(retained)}"
            )
            time.sleep(0.5)
            retained = _retained(port, fleet_name)
        again = _candidate_in(retained, fleet_name)
        assert again is not None
        assert (again.version, again.phase, again.action) == (v2, 1, "check")
        assert again.cohort_ppm == before.cohort_ppm
        chunks = [
            retained.get(topics.release_chunk(fleet_name, v2, i)) for i in range(again.chunk_count)
        ]
        assert all(
            c is not None and codec.sha256_hex(c) == h
            for c, h in zip(chunks, again.chunk_sha256, strict=True)
        ), "a chunk of the candidate is missing after the restart"
        # Recorded once the broker acknowledged it, a moment after a subscriber sees it.
        deadline = time.monotonic() + 10
        while not (
            republished := [
                d for k, d in _rollout_events(registry, v2) if k == REPUBLISHED_EVENT_KIND
            ]
        ):
            assert time.monotonic() < deadline, _rollout_events(registry, v2)
            time.sleep(0.2)
        assert republished[-1]["phase"] == 1, republished
        assert republished[-1]["sequence"] == again.sequence
    finally:
        os.kill(pid, signal.SIGCONT)

    # The thawed device of phase 1 checks it: the phase passes on its report.
    deadline = time.monotonic() + PHASE_TIMEOUT_S + 60
    while "rollout promoted" not in [k for k, _ in _rollout_events(registry, v2)]:
        kinds = [k for k, _ in _rollout_events(registry, v2)]
        assert "rollout halted" not in kinds, _rollout_events(registry, v2)
        assert time.monotonic() < deadline, _rollout_events(registry, v2)
        time.sleep(0.5)
    phase1 = next(d for k, d in _rollout_events(registry, v2) if k == "rollout phase passed")
    assert phase1["phase"] == 1 and phase1["timed_out"] is False, phase1
    assert phase1["checked"] == 1.0 and phase1["cohort"] == [first], phase1
    assert registry.current().version == v2  # type: ignore[union-attr]
    wait_served(addresses, v2, timeout=90)
