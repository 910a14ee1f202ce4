"""The edge inference service process SIGKILLed and started again on the same data dir.

A real ``python -m edge.server --only inference`` process with its MQTT agent receives
release 2 from the real :class:`~cloud.publisher.Publisher` through Mosquitto, is
SIGKILLed (no shutdown code runs), and is started again with the same settings: it
must come back serving version 2, reported by ModelMetadata, with inference results
equal to version 2's own output computed here with the local runtime.

(SIGKILL during a LocalData append is covered by
``test_local_data.py::test_sigkill_mid_append_never_corrupts_the_store``, and SIGKILL
during a store install by ``test_model_store.py``; a graceful restart by
``test_server.py``.)
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import numpy as np

from cloud.broker import Broker
from cloud.publisher import Publisher
from edge.litert_model import LiteRTModel
from edge.model_card import ModelCard
from protos import codec, signing
from protos.kserve import grpc_predict_v2_pb2 as kpb
from protos.kserve import grpc_predict_v2_pb2_grpc as kgrpc
from tests.edge.helpers import (
    make_package,
    model_weights,
    perturbed,
    start_edge_server,
    write_config,
)

FLEET = "lab"
WAIT_S = 30.0


def metadata_version(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        meta = kgrpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            kpb.ModelMetadataRequest(name="digits"), timeout=30
        )
    return list(meta.versions)


def infer(address: str, x: np.ndarray) -> tuple[str, np.ndarray]:
    request = kpb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(codec.array_to_bytes(x))
    with grpc.insecure_channel(address) as channel:
        reply = kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    shape = list(reply.outputs[0].shape)
    return reply.model_version, np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(shape)


def test_sigkilled_inference_service_comes_back_serving_the_last_installed_version(
    tmp_path: Path, broker: Broker, mlp_model_dir: Path
) -> None:
    key = signing.generate_private_key()
    public = tmp_path / "fleet.pub"
    signing.write_public_key(key.public_key(), public)
    initial = tmp_path / "v1.pkg"
    initial.write_bytes(make_package(mlp_model_dir))
    config = write_config(
        tmp_path / "edge.toml",
        {
            "device": {"id": "restart-device", "fleet": FLEET, "data_dir": str(tmp_path / "data")},
            "grpc": {"port": 0, "drain_delay_s": 0.1, "grace_s": 1.0},
            "mqtt": {"host": broker.host, "port": broker.port, "status_interval_s": 1.0},
            "trust": {"signing_public_key": str(public)},
            "model": {"initial_package": str(initial)},
        },
    )
    x = np.random.default_rng(8).uniform(0, 16, (6, 64)).astype(np.float32)
    v2_weights = perturbed(model_weights(mlp_model_dir), seed=2)
    runtime = LiteRTModel.load(mlp_model_dir)
    v1_expected = runtime.infer(x)
    runtime.set_weights(v2_weights)
    v2_expected = runtime.infer(x)

    proc, address = start_edge_server(config, tmp_path / "first.log", "--only", "inference")
    try:
        assert metadata_version(address) == ["1"]
        np.testing.assert_array_equal(infer(address, x)[1], v1_expected)
        with Publisher(
            host=broker.host, port=broker.port, fleet=FLEET, signing_key=key, timeout_s=WAIT_S
        ) as publisher:
            publisher.publish_release(
                version=2,
                parent_version=1,
                round=1,
                package=make_package(mlp_model_dir, v2_weights),
                architecture_id=ModelCard.load(mlp_model_dir / "card.json").architecture_id,
            )
        deadline = time.monotonic() + WAIT_S
        while metadata_version(address) != ["2"] and time.monotonic() < deadline:
            time.sleep(0.1)
        version, probs = infer(address, x)
        assert version == "2"
        np.testing.assert_array_equal(probs, v2_expected)
        proc.signal(signal.SIGKILL)
        assert proc.proc is not None
        assert proc.proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.stop()

    again, address = start_edge_server(config, tmp_path / "second.log", "--only", "inference")
    try:
        assert metadata_version(address) == ["2"]
        version, probs = infer(address, x)
        assert version == "2"
        np.testing.assert_array_equal(probs, v2_expected)
        # The retained release 2 the agent sees again on reconnect changes nothing.
        time.sleep(1.0)
        assert metadata_version(address) == ["2"]
        assert "Traceback" not in again.log_tail(200)
    finally:
        again.stop()
