"""A real ``edgefl edge serve`` process serves Prometheus metrics at ``/metrics``."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from edge.config import load_settings
from edge.errors import ConfigError
from protos import codec
from protos.edgefl.v1 import local_data_pb2, local_data_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from protos.kserve import grpc_predict_v2_pb2 as kserve_pb
from protos.kserve import grpc_predict_v2_pb2_grpc as kserve_grpc
from tests.edge.helpers import (
    READY_RE,
    device_config,
    make_package,
    model_weights,
    start_process,
    wait_for_line,
    write_config,
)
from tests.prom import scrape


@pytest.fixture
def package(tmp_path: Path, mlp_model_dir: Path) -> Path:
    path = tmp_path / "initial.pkg"
    path.write_bytes(make_package(mlp_model_dir))
    return path


def _serve_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "edge.cli", "edge", "serve", "--config", str(config)]


def _infer(stub: kserve_grpc.GRPCInferenceServiceStub, x: np.ndarray) -> str:
    request = kserve_pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return stub.ModelInfer(request, timeout=30).model_version


def test_edge_serve_counts_inference_training_and_samples(
    tmp_path: Path, package: Path, mlp_model_dir: Path
) -> None:
    config = device_config(tmp_path, initial_package=package)
    proc = start_process("edge-serve", _serve_argv(config), tmp_path / "serve.log")
    try:
        match = wait_for_line(proc, READY_RE)
        address = f"{match.group(1)}:{match.group(2)}"
        metrics_port = int((tmp_path / "data" / "metrics.port").read_text())
        rng = np.random.default_rng(0)
        with grpc.insecure_channel(address) as channel:
            inference = kserve_grpc.GRPCInferenceServiceStub(channel)
            assert [_infer(inference, rng.random((1, 64))) for _ in range(3)] == ["1"] * 3
            with pytest.raises(grpc.RpcError) as info:
                _infer(inference, rng.random((1, 5)))  # wrong input shape
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            x = rng.random((40, 64)).astype(np.float32)
            y = (np.arange(40) % 10).astype(np.int32)
        # Trainer and LocalData are on the device's local socket (edge.server).
        local = f"unix:{(tmp_path / 'data' / 'run' / 'local.sock').resolve()}"
        with grpc.insecure_channel(local) as channel:
            local_data_pb2_grpc.LocalDataStub(channel).Append(
                local_data_pb2.AppendRequest(
                    x=codec.tensor_to_proto("x", x), y=codec.tensor_to_proto("y", y)
                ),
                timeout=30,
            )
            trainer_pb2_grpc.TrainerStub(channel).Fit(
                trainer_pb2.FitRequest(
                    weights=codec.tensors_to_proto(model_weights(mlp_model_dir)),
                    config=codec.config_to_proto({"epochs": 1}),
                    server_round=2,
                ),
                timeout=120,
            )
        content_type, m = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        proc.stop()

    assert content_type.startswith("text/plain")
    assert m.families["edgefl_device_inference_requests"] == "counter"
    assert m.families["edgefl_device_inference_duration_seconds"] == "histogram"
    ok = m.value("edgefl_device_inference_requests_total", model_version="1", outcome="ok")
    error = m.value("edgefl_device_inference_requests_total", model_version="1", outcome="error")
    assert (ok, error) == (3, 1)
    assert m.value("edgefl_device_inference_duration_seconds_count", model_version="1") == 4
    assert m.value("edgefl_device_inference_duration_seconds_sum", model_version="1") > 0
    assert (
        m.value("edgefl_device_inference_duration_seconds_bucket", model_version="1", le="+Inf")
        == 4
    )
    assert m.value("edgefl_device_training_rounds_total") == 1
    assert m.value("edgefl_device_training_duration_seconds_count") == 1
    assert m.value("edgefl_device_training_duration_seconds_sum") > 0
    assert m.value("edgefl_device_last_training_round") == 2
    assert m.value("edgefl_device_local_samples") == 40
    assert m.value("edgefl_device_serving_version") == 1
    assert m.value("edgefl_device_training") == 0  # after the Fit, none runs
    # No MQTT agent here: every release outcome is present, at zero.
    assert m.labelled("edgefl_device_releases_total", "outcome") == {
        "release_installed": 0,
        "release_rejected": 0,
        "install_failed": 0,
        "chunk_rejected": 0,
    }
    assert m.value("process_resident_memory_bytes") > 20 * 2**20
    assert not (tmp_path / "data" / "metrics.port").exists(), "port file left after stop"


def test_a_taken_metrics_port_is_a_clear_error_and_disabled_means_none(
    tmp_path: Path, package: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path / "edge.toml",
            {
                "device": {"id": "d", "data_dir": str(tmp_path / "data")},
                "grpc": {"port": 0, "drain_delay_s": 0.0},
                "model": {"initial_package": str(package)},
                "metrics": {"port": port},
            },
        )
        proc = start_process("edge-serve", _serve_argv(config), tmp_path / "taken.log")
        try:
            assert proc.proc is not None
            assert proc.proc.wait(timeout=120) == 2
        finally:
            proc.stop()
    log = (tmp_path / "taken.log").read_text()
    assert f"cannot bind the metrics endpoint to 127.0.0.1:{port}" in log
    assert "Traceback" not in log
    assert not (tmp_path / "data" / "grpc.port").exists()

    disabled = write_config(
        tmp_path / "off.toml",
        {
            "device": {"id": "d", "data_dir": str(tmp_path / "data-off")},
            "grpc": {"port": 0, "drain_delay_s": 0.0},
            "model": {"initial_package": str(package)},
            "metrics": {"enabled": False},
        },
    )
    proc = start_process("edge-serve", _serve_argv(disabled), tmp_path / "off.log")
    try:
        wait_for_line(proc, READY_RE)
        assert not (tmp_path / "data-off" / "metrics.port").exists()
    finally:
        proc.stop()


def test_metrics_settings_are_checked(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "edge.toml", {"metrics": {"port": 70000, "enabled": "yes", "path": "/m"}}
    )
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    text = str(info.value)
    assert "[metrics] port: must be in 0..65535 (got 70000)" in text
    assert "[metrics] enabled: must be bool" in text
    assert "[metrics] path: unknown key" in text
