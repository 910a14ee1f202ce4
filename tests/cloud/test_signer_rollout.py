"""The signer under a staged policy, with a real registry and a real Mosquitto, no devices.

What the controller decides without any device to check: the fleet's first version goes
out at once, later ones become candidates (the retained release does not move), a phase
whose device never answers fails at its timeout and is rolled back, a newer candidate supersedes
an older one, and the socket's rollout actions answer clearly (wrong token, no such
rollout, a non-integer version) without stopping the signer.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cloud import config as cloud_config
from cloud.broker import Broker
from cloud.registry import Registry
from cloud.signer import SignerClient, SignerService, socket_path, token_path
from cloud.supervisor import init_cloud
from protos import codec, topics
from tests.cloud.test_signer import _add, _raw, _retained_manifest

WAIT_S = 20.0


@pytest.fixture
def staged(
    tmp_path: Path, mlp_model_dir: Path, broker: Broker
) -> Iterator[tuple[cloud_config.CloudSettings, Registry, SignerService]]:
    conf = init_cloud(tmp_path / "cloud", fleet="staged", model_dir=mlp_model_dir)
    s = cloud_config.load(conf)
    s.broker.port = broker.port
    s.rollout = dataclasses.replace(
        s.rollout,
        policy="staged",
        phases="0.5, 1.0",
        min_devices="1, 1",
        soak_s=0.0,
        phase_timeout_s=3.0,
    )
    registry = Registry(s.registry_url)
    service = SignerService(s, registry).start()
    try:
        yield s, registry, service
    finally:
        service.stop()
        registry.close()


def _retained_candidate(broker: Broker, fleet: str) -> codec.Manifest | None:
    got: list[bytes] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, msg: got.append(msg.payload)
    client.connect("127.0.0.1", broker.port)
    client.subscribe(topics.release_candidate(fleet), qos=1)
    client.loop_start()
    try:
        time.sleep(1.0)
    finally:
        client.loop_stop()
        client.disconnect()
    return codec.manifest_from_bytes(got[-1]) if got and got[-1] else None


def _kinds(registry: Registry, version: int) -> list[str]:
    return [
        e.kind
        for e in reversed(registry.list_events(200))
        if e.device_id == "cloud" and e.kind.startswith("rollout") and e.version == version
    ]


def _wait_kind(registry: Registry, version: int, kind: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while kind not in _kinds(registry, version):
        assert time.monotonic() < deadline, _kinds(registry, version)
        time.sleep(0.1)


def test_candidates_fail_without_checks_and_newer_ones_supersede(staged, broker: Broker) -> None:  # type: ignore[no-untyped-def]
    s, registry, _ = staged
    client = SignerClient(s.data_dir)
    run = registry.start_run(num_rounds=3, strategy="fedavg", config={})
    v1 = _add(registry, s, run, 0)
    client.release(v1)
    assert registry.current().version == v1, "the first version is released at once"  # type: ignore[union-attr]

    # One device the registry lists as online, which never answers (no agent runs).
    now = int(time.time() * 1000)
    registry.upsert_device_status(
        codec.DeviceStatus("dev-1", "staged", serving_version=v1, state="SERVING", timestamp_ms=now)
    )
    v2 = _add(registry, s, run, 1)
    client.release(v2)
    v3 = _add(registry, s, run, 2)
    client.release(v3)  # while v2 is still in phase 1
    assert _kinds(registry, v2) == ["rollout started", "rollout superseded"]
    assert _retained_manifest(broker, "staged").version == v1, "the release did not move"
    candidate = _retained_candidate(broker, "staged")
    assert candidate is not None and candidate.version == v3 and candidate.phase == 1
    assert candidate.served_version == v1  # its action: check, or revert once timed out

    # The one device of v3's phase says nothing: the phase fails at its timeout.
    _wait_kind(registry, v3, "rollout rolled back")
    failed = next(
        json.loads(e.detail)
        for e in registry.list_events(200)
        if e.kind == "rollout phase failed" and e.version == v3
    )
    assert failed["checked"] == 0 and failed["cohort"] == ["dev-1"]
    assert failed["silent"] == 1 and failed["timed_out"] is True
    assert failed["reason"] == "no device of the phase checked the candidate"
    reverted = _retained_candidate(broker, "staged")
    assert reverted is not None and reverted.action == "revert" and reverted.version == v3
    assert registry.current().version == v1  # type: ignore[union-attr]
    status = client.rollout("rollout-status")["status"]
    assert status["policy"] == "staged"
    assert [r["status"] for r in status["history"]] == ["superseded", "rolled back"]


def test_rollout_requests_get_clear_errors(staged) -> None:  # type: ignore[no-untyped-def]
    s, registry, _ = staged
    path = socket_path(s.data_dir)
    token = token_path(s.data_dir).read_text().strip()
    guess = b'{"token": "guess", "op": "rollout-promote", "version": 1}\n'
    assert _raw(path, guess)["error"] == "wrong token"
    for version, needle in (("7", "needs an integer version"), (True, "needs an integer version")):
        line = json.dumps({"token": token, "op": "rollout-halt", "version": version}).encode()
        assert needle in str(_raw(path, line + b"\n")["error"])
    line = json.dumps({"token": token, "op": "rollout-promote", "version": 9}).encode()
    reply = _raw(path, line + b"\n")
    assert reply["ok"] is False and "version 9 has no rollout in progress" in str(reply["error"])
    assert SignerClient(s.data_dir).rollout("rollout-status")["status"]["active"] is None
    assert registry.current() is None
