"""The device server: health, reflection, --only, graceful shutdown, restart, releases."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from edge.config import load_settings
from edge.errors import InstallError
from edge.server import EdgeServer
from protos import codec
from protos.edgefl.v1 import local_data_pb2, local_data_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from protos.kserve import grpc_predict_v2_pb2 as kserve_pb
from protos.kserve import grpc_predict_v2_pb2_grpc as kserve_grpc
from tests.edge.helpers import (
    device_config,
    make_package,
    model_weights,
    perturbed,
    start_edge_server,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
INFERENCE = "inference.GRPCInferenceService"
TRAINER = "edgefl.v1.Trainer"
DATA = "edgefl.v1.LocalData"


def health_status(channel: grpc.Channel, service: str) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10
    )
    return int(reply.status)


@pytest.fixture
def package(tmp_path: Path, mlp_model_dir: Path) -> Path:
    path = tmp_path / "initial.pkg"
    path.write_bytes(make_package(mlp_model_dir))
    return path


@pytest.fixture
def server(tmp_path: Path, package: Path) -> Iterator[EdgeServer]:
    srv = EdgeServer(load_settings(device_config(tmp_path, initial_package=package)))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop(grace=0)


def test_health_reflection_and_port_file(server: EdgeServer) -> None:
    assert server.settings.port_file.read_text().strip() == str(server.port)
    with grpc.insecure_channel(server.address) as channel:
        for service in ("", INFERENCE):
            assert health_status(channel, service) == SERVING, service
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {INFERENCE, "grpc.health.v1.Health"} <= set(services)
    # The state-changing services are only on the local socket, never on TCP.
    assert TRAINER not in services and DATA not in services
    assert server.local_address == f"unix:{server.settings.local_socket.resolve()}"
    with grpc.insecure_channel(server.local_address) as local:
        for service in ("", TRAINER, DATA):
            assert health_status(local, service) == SERVING, service
        local_services = ProtoReflectionDescriptorDatabase(local).get_services()
    assert {TRAINER, DATA} <= set(local_services) and INFERENCE not in local_services


def test_not_ready_until_a_release_arrives(tmp_path: Path, mlp_model_dir: Path) -> None:
    srv = EdgeServer(load_settings(device_config(tmp_path)))
    srv.start()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            inference = kserve_grpc.GRPCInferenceServiceStub(channel)
            assert inference.ServerLive(kserve_pb.ServerLiveRequest()).live
            assert not inference.ServerReady(kserve_pb.ServerReadyRequest()).ready
            assert health_status(channel, INFERENCE) == NOT_SERVING
            with grpc.insecure_channel(srv.local_address) as local:
                assert health_status(local, DATA) == SERVING
                assert health_status(local, TRAINER) == NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                request = kserve_pb.ModelInferRequest(model_name="digits")
                inference.ModelInfer(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert srv.node.status().state == "DEGRADED"

            data = make_package(mlp_model_dir)
            srv.node.install_release(4, data, codec.sha256_hex(data))
            assert inference.ServerReady(kserve_pb.ServerReadyRequest()).ready
            assert health_status(channel, INFERENCE) == SERVING
            with grpc.insecure_channel(srv.local_address) as local:
                assert health_status(local, TRAINER) == SERVING
            meta = inference.ModelMetadata(kserve_pb.ModelMetadataRequest(name="digits"))
            assert list(meta.versions) == ["4"]
    finally:
        srv.stop(grace=0)


def test_only_one_service(tmp_path: Path, package: Path) -> None:
    srv = EdgeServer(
        load_settings(device_config(tmp_path, initial_package=package)), only="trainer"
    )
    srv.start()
    try:
        with grpc.insecure_channel(srv.local_address) as channel:
            assert health_status(channel, TRAINER) == SERVING
            with pytest.raises(grpc.RpcError) as info:
                health_status(channel, INFERENCE)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as info:
                kserve_grpc.GRPCInferenceServiceStub(channel).ServerLive(
                    kserve_pb.ServerLiveRequest()
                )
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            services = ProtoReflectionDescriptorDatabase(channel).get_services()
            assert TRAINER in services and INFERENCE not in services
    finally:
        srv.stop(grace=0)


def test_bad_releases_keep_the_previous_version_serving(
    server: EdgeServer, mlp_model_dir: Path
) -> None:
    node = server.node
    x = np.random.default_rng(0).uniform(0, 1, (3, 64)).astype(np.float32)
    version, before = node.serving.infer(x)
    assert version == 1
    good = make_package(mlp_model_dir)
    bad_weights = make_package(mlp_model_dir, {"only_one": np.zeros(3, np.float32)})
    cases = [
        (good, "0" * 64, "differs from announced"),
        (b"not a package", codec.sha256_hex(b"not a package"), "not a valid protobuf"),
        (bad_weights, codec.sha256_hex(bad_weights), "weights do not match"),
    ]
    for data, digest, problem in cases:
        with pytest.raises(InstallError, match=problem):
            node.install_release(2, data, digest)
        assert node.serving_version() == 1
        assert node.store.versions() == [1]
        assert problem in node.status().last_error
        np.testing.assert_array_equal(node.serving.infer(x)[1], before)


def test_status_snapshot(server: EdgeServer) -> None:
    status = server.node.status()
    assert (status.device_id, status.fleet, status.state) == ("test-device", "default", "SERVING")
    assert status.serving_version == 1 and status.sample_count == 0
    assert status.rss_bytes > 0 and status.disk_free_bytes > 0 and status.memory_available_bytes > 0
    codec.status_from_bytes(codec.status_to_bytes(status))  # valid on the wire


def test_restart_serves_the_last_version_and_keeps_data(
    tmp_path: Path, package: Path, mlp_model_dir: Path
) -> None:
    settings = load_settings(device_config(tmp_path, initial_package=package))
    first = EdgeServer(settings)
    first.start()
    data_b = make_package(mlp_model_dir, perturbed(model_weights(mlp_model_dir), seed=3))
    x = np.random.default_rng(1).uniform(0, 1, (20, 64)).astype(np.float32)
    y = np.arange(20, dtype=np.int32) % 10
    try:
        first.node.install_release(2, data_b, codec.sha256_hex(data_b))
        first.node.activate(1)
        first.node.activate(2)
        with grpc.insecure_channel(first.local_address) as channel:
            local_data_pb2_grpc.LocalDataStub(channel).Append(
                local_data_pb2.AppendRequest(
                    x=codec.tensor_to_proto("x", x), y=codec.tensor_to_proto("y", y)
                )
            )
        _, expected = first.node.serving.infer(x)
    finally:
        first.stop(grace=0)

    second = EdgeServer(settings)
    second.start()
    try:
        with grpc.insecure_channel(second.address) as channel:
            meta = kserve_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
                kserve_pb.ModelMetadataRequest(name="digits")
            )
            assert list(meta.versions) == ["2"]
        with grpc.insecure_channel(second.local_address) as channel:
            stats = local_data_pb2_grpc.LocalDataStub(channel).Stats(local_data_pb2.StatsRequest())
            assert stats.count == 20
            reply = trainer_pb2_grpc.TrainerStub(channel).Evaluate(
                trainer_pb2.EvaluateRequest(
                    weights=codec.tensors_to_proto(model_weights(mlp_model_dir))
                )
            )
            assert reply.num_examples == 10  # the held-out part: [data] min_holdout of 20
        np.testing.assert_array_equal(second.node.serving.infer(x)[1], expected)
    finally:
        second.stop(grace=0)


def test_sigterm_goes_not_serving_then_exits(tmp_path: Path, package: Path) -> None:
    """A real `python -m edge.server` process: Watch sees SERVING, then NOT_SERVING on SIGTERM."""
    config = device_config(tmp_path, initial_package=package, grpc={"drain_delay_s": 1.0})
    proc, address = start_edge_server(config, tmp_path / "server.log")
    seen: list[int] = []
    try:
        with grpc.insecure_channel(address) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=INFERENCE), timeout=60
            )
            first_seen = threading.Event()

            def watch() -> None:
                try:
                    for reply in stream:
                        seen.append(int(reply.status))
                        first_seen.set()
                except grpc.RpcError:
                    pass  # the server closed the stream while stopping
                finally:
                    first_seen.set()

            watcher = threading.Thread(target=watch)
            watcher.start()
            assert first_seen.wait(30)
            proc.signal(signal.SIGTERM)
            assert proc.proc is not None
            assert proc.proc.wait(timeout=30) == 0
            watcher.join(timeout=30)
    finally:
        proc.stop()
    assert seen[0] == SERVING
    assert NOT_SERVING in seen
    assert not (tmp_path / "data" / "grpc.port").exists()
    assert "Traceback" not in proc.log_tail(200)
