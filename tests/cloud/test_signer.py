"""The release signer over its Unix socket, with a real registry and a real Mosquitto.

It signs and publishes what it may, marks a version current only after the broker
acknowledged it, answers ``retry`` while the broker is away, and refuses (clearly,
without dying) requests without the token and versions that are not the fleet's next
release: stale, older, another architecture or graph, NaN weights.
"""

from __future__ import annotations

import json
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from cloud import config as cloud_config
from cloud.broker import Broker
from cloud.registry import Registry
from cloud.releases import package_weights
from cloud.signer import (
    RELEASED_EVENT_KIND,
    SignerClient,
    SignerError,
    SignerService,
    SignerUnavailable,
    _addressable,
    socket_path,
    token_path,
)
from cloud.supervisor import init_cloud
from protos import codec, signing, topics


@pytest.fixture
def cloud(
    tmp_path: Path, mlp_model_dir: Path, broker: Broker
) -> Iterator[tuple[cloud_config.CloudSettings, Registry, SignerService]]:
    conf = init_cloud(tmp_path / "cloud", fleet="signed", model_dir=mlp_model_dir)
    s = cloud_config.load(conf)
    s.broker.port = broker.port
    registry = Registry(s.registry_url)
    service = SignerService(s, registry).start()
    try:
        yield s, registry, service
    finally:
        service.stop()
        registry.close()


def _weights(s: cloud_config.CloudSettings, scale: float = 1.0) -> dict[str, np.ndarray]:
    pkg = codec.package_from_bytes((s.data_dir / "initial.pkg").read_bytes())
    return {k: np.asarray(v) * scale for k, v in pkg.weights.items()}


def _add(
    registry: Registry, s: cloud_config.CloudSettings, run_id: int, rnd: int, **kw: object
) -> int:
    arch, data = package_weights(s.model.dir, _weights(s, 1.0 + rnd / 10))
    v = registry.add_version(
        package=kw.get("package", data),  # type: ignore[arg-type]
        architecture_id=str(kw.get("arch", arch)),
        round=rnd,
        run_id=run_id,
        parent_version=None,
        metrics={},
    )
    return v.version


def _retained_manifest(broker: Broker, fleet: str) -> codec.Manifest:
    got: list[bytes] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, msg: got.append(msg.payload)
    client.connect("127.0.0.1", broker.port)
    client.subscribe(topics.release_manifest(fleet), qos=1)
    client.loop_start()
    try:
        import time

        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    assert got, "no retained manifest"
    return codec.manifest_from_bytes(got[0])


def test_release_is_signed_published_then_current(cloud, broker: Broker) -> None:  # type: ignore[no-untyped-def]
    s, registry, _ = cloud
    assert stat.S_IMODE(socket_path(s.data_dir).stat().st_mode) == 0o600
    assert stat.S_IMODE(socket_path(s.data_dir).parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(token_path(s.data_dir).stat().st_mode) == 0o600
    run = registry.start_run(num_rounds=2, strategy="fedavg", config={})
    v1 = _add(registry, s, run, 0)
    client = SignerClient(s.data_dir)
    sequence = client.release(v1)
    current = registry.current()
    assert current is not None and (current.version, current.sequence) == (v1, sequence)
    manifest = _retained_manifest(broker, s.cloud.fleet)
    assert (manifest.version, manifest.sequence) == (v1, sequence)
    public = signing.load_public_key(s.signing.public_key)
    signing.verify_manifest(manifest, public)
    # Asking again (a resumed ServerApp) is harmless.
    assert client.release(v1) == sequence
    released = [e for e in registry.list_events() if e.kind == RELEASED_EVENT_KIND]
    assert [(e.device_id, e.version) for e in released] == [("cloud", v1)]


def test_broker_away_means_retry_and_nothing_current(cloud, broker: Broker) -> None:  # type: ignore[no-untyped-def]
    s, registry, _ = cloud
    run = registry.start_run(num_rounds=2, strategy="fedavg", config={})
    client = SignerClient(s.data_dir)
    client.release(_add(registry, s, run, 0))
    v2 = _add(registry, s, run, 1)
    broker.stop()
    with pytest.raises(SignerUnavailable, match="not published"):
        client.release(v2)
    assert registry.current().version == v2 - 1  # type: ignore[union-attr]
    with pytest.raises(SignerUnavailable):
        client.release_when_possible(v2, wait_s=2.0)
    broker.start()
    assert client.release_when_possible(v2, wait_s=60.0) > 0
    assert registry.current().version == v2  # type: ignore[union-attr]
    assert _retained_manifest(broker, s.cloud.fleet).version == v2


def test_signer_refuses_what_it_must_not_sign(cloud, broker: Broker) -> None:  # type: ignore[no-untyped-def]
    s, registry, _ = cloud
    run = registry.start_run(num_rounds=5, strategy="fedavg", config={})
    client = SignerClient(s.data_dir)
    v1 = _add(registry, s, run, 0)
    v2 = _add(registry, s, run, 1)
    with pytest.raises(SignerError, match="not the newest"):
        client.release(v1)
    client.release(v2)
    with pytest.raises(SignerError, match="not the newest"):
        client.release(v1)  # a replay of an older version
    with pytest.raises(SignerError, match="no model version"):
        client.release(999)

    _, good = package_weights(s.model.dir, _weights(s))
    pkg = codec.package_from_bytes(good)
    other_graph = codec.package_to_bytes(
        codec.ModelPackage(
            pkg.architecture_id, pkg.tflite + b"\0", pkg.card_json, dict(pkg.weights)
        )
    )
    v3 = _add(registry, s, run, 2, package=other_graph)
    with pytest.raises(SignerError, match="base model"):
        client.release(v3)
    nan = {k: np.full_like(np.asarray(w), np.nan) for k, w in pkg.weights.items()}
    v4 = _add(registry, s, run, 3, package=package_weights(s.model.dir, nan)[1])
    with pytest.raises(SignerError, match="NaN"):
        client.release(v4)
    v5 = _add(registry, s, run, 4, arch="someone-elses-model")
    with pytest.raises(SignerError, match="architecture"):
        client.release(v5)
    assert registry.current().version == v2  # type: ignore[union-attr]
    assert _retained_manifest(broker, s.cloud.fleet).version == v2

    registry.finish_run(run, "completed")
    v6 = _add(registry, s, registry.start_run(num_rounds=1, strategy="fedavg", config={}), 0)
    registry.finish_run(run + 1, "stopped")
    with pytest.raises(SignerError, match="running run"):
        client.release(v6)


def _raw(path: Path, payload: bytes) -> dict[str, object]:
    with _addressable(path) as address, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(address)
        sock.sendall(payload)
        with sock.makefile("rb") as fh:
            return dict(json.loads(fh.readline()))


def test_bad_requests_get_clear_errors_and_the_signer_keeps_serving(cloud) -> None:  # type: ignore[no-untyped-def]
    s, registry, _ = cloud
    path = socket_path(s.data_dir)
    run = registry.start_run(num_rounds=1, strategy="fedavg", config={})
    v1 = _add(registry, s, run, 0)
    token = token_path(s.data_dir).read_text().strip()
    assert (
        _raw(path, b'{"token": "guess", "op": "release", "version": 1}\n')["error"] == "wrong token"
    )
    assert "JSON" in str(_raw(path, b"not json\n")["error"])
    assert "too long" in str(_raw(path, b"x" * 5000 + b"\n")["error"])
    bad_op = json.dumps({"token": token, "op": "sign-anything", "version": v1}).encode() + b"\n"
    assert "op 'release'" in str(_raw(path, bad_op)["error"])
    assert registry.current() is None
    assert SignerClient(s.data_dir).release(v1) > 0
