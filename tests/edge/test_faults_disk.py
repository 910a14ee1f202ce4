"""A device whose disk fills up during a model install, with the real agent and broker.

How the disk is made really full: the device's data directory is a 1 MiB ``tmpfs``
mounted by the test (``mount -t tmpfs -o size=1m``; the tests run as root here; the
mount is lazily unmounted in teardown even on failure), and a filler file takes all
of it but 16 KiB, less than one release (~60 KiB) and more than the node state needs.
Writes then fail with the kernel's own ``ENOSPC``. (Store-level ENOSPC in a private
user+mount namespace, without root, is covered in ``test_model_store.py``.)

The device is a real :class:`~edge.node.EdgeNode` with its gRPC server and MQTT agent;
the release comes from the real :class:`~cloud.publisher.Publisher` through Mosquitto,
and the device's reports are read by the real :class:`~cloud.fleet_monitor.FleetMonitor`.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from cloud.broker import Broker
from cloud.fleet_monitor import FleetMonitor
from cloud.publisher import Publisher
from edge.agent import EVENT_INSTALL_FAILED, EVENT_INSTALLED, Agent, AgentSettings
from edge.config import load_settings
from edge.litert_model import LiteRTModel
from edge.model_card import ModelCard
from edge.server import EdgeServer
from protos import codec, signing
from protos.kserve import grpc_predict_v2_pb2 as kpb
from protos.kserve import grpc_predict_v2_pb2_grpc as kgrpc
from tests.edge.helpers import device_config, make_package, model_weights, perturbed

FLEET = "lab"
DEVICE = "disk-device"
WAIT_S = 30.0
LEFT_FREE = 16 * 1024


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A mounted 1 MiB tmpfs, unmounted at teardown."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f"this test mounts a tmpfs (needs root): {done.stderr}"
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until ENOSPC, then give back ``leave`` bytes; return the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    block = b"\xa5" * 65536
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return filler


def infer(address: str, x: np.ndarray) -> tuple[str, np.ndarray]:
    """(version, probabilities) from the device's KServe endpoint."""
    request = kpb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(codec.array_to_bytes(x))
    with grpc.insecure_channel(address) as channel:
        stub = kgrpc.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(kpb.ModelMetadataRequest(name="digits"), timeout=30)
        reply = stub.ModelInfer(request, timeout=30)
    assert list(meta.versions) == [reply.model_version]
    probs = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(list(reply.outputs[0].shape))
    return reply.model_version, probs


def expected(model_dir: Path, weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    model = LiteRTModel.load(model_dir)
    model.set_weights(weights)
    return model.infer(x)


def test_disk_full_during_install_keeps_serving_then_installs_once_space_is_back(
    tmp_path: Path, tiny_disk: Path, broker: Broker, mlp_model_dir: Path
) -> None:
    key = signing.generate_private_key()
    public = tmp_path / "fleet.pub"
    signing.write_public_key(key.public_key(), public)
    initial = tmp_path / "v1.pkg"
    initial.write_bytes(make_package(mlp_model_dir))
    settings = load_settings(
        device_config(tmp_path, initial_package=initial, data_dir=tiny_disk / "data"), env={}
    )
    x = np.random.default_rng(4).uniform(0, 16, (5, 64)).astype(np.float32)
    base = model_weights(mlp_model_dir)
    v2_weights = perturbed(base, seed=2)
    v2 = make_package(mlp_model_dir, v2_weights)
    expected_v1 = expected(mlp_model_dir, base, x)
    expected_v2 = expected(mlp_model_dir, v2_weights, x)

    def new_agent(node: object) -> Agent:
        return Agent(
            AgentSettings(
                device_id=DEVICE,
                fleet=FLEET,
                host=broker.host,
                port=broker.port,
                signing_public_key=public,
                status_interval_s=0.5,
                reconnect_min_s=0.2,
                reconnect_max_s=2.0,
            ),
            node,  # type: ignore[arg-type]
        ).start()

    server = EdgeServer(settings)
    server.start()
    monitor = FleetMonitor(host=broker.host, port=broker.port, fleet=FLEET).start()
    agent = new_agent(server.node)
    try:
        assert agent.wait_connected(WAIT_S)
        version, probs = infer(server.address, x)
        assert version == "1"
        np.testing.assert_array_equal(probs, expected_v1)
        filler = fill(tiny_disk, LEFT_FREE)
        assert os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize < len(v2)

        with Publisher(
            host=broker.host, port=broker.port, fleet=FLEET, signing_key=key, timeout_s=WAIT_S
        ) as publisher:
            publisher.publish_release(
                version=2,
                parent_version=1,
                round=1,
                package=v2,
                architecture_id=ModelCard.load(mlp_model_dir / "card.json").architecture_id,
            )

        # The install fails for want of space: reported as an event and in the status.
        failed = monitor.wait_for_event(
            lambda e: e.device_id == DEVICE and e.kind == EVENT_INSTALL_FAILED, WAIT_S
        )
        assert failed.version == 2 and "disk full" in failed.detail
        status = server.node.status()
        assert "disk full" in status.last_error and status.serving_version == 1
        reported = monitor.wait_for_status(DEVICE, lambda s: "disk full" in s.last_error, WAIT_S)
        assert reported.serving_version == 1
        # ...and the previous version keeps serving, unchanged, with nothing half-written.
        version, probs = infer(server.address, x)
        assert version == "1"
        np.testing.assert_array_equal(probs, expected_v1)
        store_files = sorted(p.name for p in server.node.store.root.iterdir())
        assert not [f for f in store_files if f.startswith(".tmp-")], store_files
        assert server.node.store.versions() == [1]

        # Space comes back: the running agent retries the failed install by itself
        # (with backoff from edge.agent.INSTALL_RETRY_MIN_S) and the release installs.
        filler.unlink()
        installed = monitor.wait_for_event(
            lambda e: e.device_id == DEVICE and e.kind == EVENT_INSTALLED and e.version == 2,
            WAIT_S,
        )
        assert installed.version == 2
        deadline = time.monotonic() + WAIT_S
        while server.node.serving_version() != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        version, probs = infer(server.address, x)
        assert version == "2"
        np.testing.assert_array_equal(probs, expected_v2)
        assert server.node.status().last_error == ""
        monitor.wait_for_status(
            DEVICE, lambda s: s.serving_version == 2 and not s.last_error, WAIT_S
        )
    finally:
        agent.stop()
        monitor.stop()
        server.stop(grace=0)
