"""The Trainer service: Fit/Evaluate on local data, isolated from serving."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from devices.datasets import Dataset, device_partitions, load_digits
from edge.config import load_settings
from edge.litert_model import LiteRTModel
from edge.local_data_split import split_samples
from edge.server import EdgeServer
from protos import codec
from protos.edgefl.v1 import trainer_pb2, trainer_pb2_grpc
from protos.kserve import grpc_predict_v2_pb2 as kserve_pb
from protos.kserve import grpc_predict_v2_pb2_grpc as kserve_grpc
from tests.edge.helpers import device_config, make_package, model_weights


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits(layout="flat", seed=0)


@dataclass
class Device:
    server: EdgeServer
    trainer: trainer_pb2_grpc.TrainerStub
    inference: kserve_grpc.GRPCInferenceServiceStub
    weights: dict[str, np.ndarray]


def _start(tmp_path: Path, model_dir: Path | None) -> EdgeServer:
    pkg = None
    if model_dir is not None:
        pkg = tmp_path / "initial.pkg"
        pkg.write_bytes(make_package(model_dir))
    server = EdgeServer(load_settings(device_config(tmp_path, initial_package=pkg)))
    server.start()
    return server


@pytest.fixture
def device(tmp_path: Path, mlp_model_dir: Path) -> Iterator[Device]:
    server = _start(tmp_path, mlp_model_dir)
    try:
        with (
            grpc.insecure_channel(server.address) as channel,
            grpc.insecure_channel(server.local_address) as local,
        ):
            yield Device(
                server,
                trainer_pb2_grpc.TrainerStub(local),
                kserve_grpc.GRPCInferenceServiceStub(channel),
                model_weights(mlp_model_dir),
            )
    finally:
        server.stop(grace=0)


def fit_request(
    weights: dict[str, np.ndarray], server_round: int = 0, **config: object
) -> trainer_pb2.FitRequest:
    return trainer_pb2.FitRequest(
        weights=codec.tensors_to_proto(weights),
        config=codec.config_to_proto(config),  # type: ignore[arg-type]
        server_round=server_round,
    )


def serving_probs(
    stub: kserve_grpc.GRPCInferenceServiceStub, x: np.ndarray
) -> tuple[str, np.ndarray]:
    request = kserve_pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    reply = stub.ModelInfer(request, timeout=30)
    return reply.model_version, np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(
        len(x), -1
    )


def test_fit_on_an_iid_fifth_reaches_90_percent(
    device: Device, digits: Dataset, mlp_model_dir: Path
) -> None:
    part = device_partitions(digits, 5, scheme="iid", seed=0)[0]
    device.server.node.data.load_partition(part.x, part.y)
    probe = digits.test.x[:16]
    _, before = serving_probs(device.inference, probe)

    reply = device.trainer.Fit(
        fit_request(device.weights, server_round=3, epochs=40, seed=1), timeout=300
    )

    train = len(split_samples(part.x, part.y).train)  # the held-out part is not trained on
    assert reply.num_examples == train < len(part)
    assert {"loss", "accuracy", "examples", "seconds", "steps"} <= set(reply.metrics)
    assert reply.metrics["examples"] == train and reply.metrics["seconds"] > 0
    new_weights = codec.tensors_from_proto(reply.weights)
    assert sorted(new_weights) == sorted(device.weights)
    model = LiteRTModel.load(mlp_model_dir)
    model.set_weights(new_weights)
    accuracy = model.evaluate(digits.test.x, digits.test.y)["accuracy"]
    assert accuracy >= 0.9, f"test accuracy {accuracy:.3f}"
    # Serving is untouched by training, and the round is remembered.
    version, after = serving_probs(device.inference, probe)
    assert version == "1"
    np.testing.assert_array_equal(before, after)
    assert device.server.node.state()["last_round"] == 3


def test_evaluate_uses_the_heldout_part(device: Device, digits: Dataset) -> None:
    part = device_partitions(digits, 5, scheme="iid", seed=0)[1]
    device.server.node.data.load_partition(part.x, part.y)
    reply = device.trainer.Evaluate(
        trainer_pb2.EvaluateRequest(weights=codec.tensors_to_proto(device.weights)), timeout=60
    )
    held = split_samples(part.x, part.y).heldout
    assert reply.num_examples == len(held) < len(part)
    model = device.server.node.serving.require()
    expected = float(np.mean(model.infer(part.x[held]).argmax(axis=1) == part.y[held]))
    assert reply.metrics["accuracy"] == pytest.approx(expected)
    assert reply.loss > 0


def test_mismatched_weights_are_invalid_and_serving_is_unchanged(
    device: Device, digits: Dataset
) -> None:
    part = device_partitions(digits, 5, scheme="iid", seed=0)[2]
    device.server.node.data.load_partition(part.x, part.y)
    probe = digits.test.x[:8]
    _, before = serving_probs(device.inference, probe)
    first = sorted(device.weights)[0]
    wrong_shape = dict(device.weights)
    wrong_shape[first] = np.zeros((3, 3), np.float32)
    missing = {k: v for k, v in device.weights.items() if k != first}
    extra = {**device.weights, "bogus": np.zeros(2, np.float32)}
    wrong_dtype = {**device.weights, first: device.weights[first].astype(np.float64)}
    for weights, problem in (
        (wrong_shape, f"{first}: shape [3, 3]"),
        (missing, f"missing: {first}"),
        (extra, "unexpected: bogus"),
        (wrong_dtype, f"{first}: dtype float64"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            device.trainer.Fit(fit_request(weights, epochs=1), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert problem in (info.value.details() or "")
    _, after = serving_probs(device.inference, probe)
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"epochs": 1, "learnign_rate": 0.1}, "unknown config keys: learnign_rate"),
        ({"batch_size": 16}, "batch_size 16 differs from the model's train batch 32"),
        ({"epochs": -1}, "epochs must be in 0..1000"),
        ({"learning_rate": "fast"}, "learning_rate must be a finite number"),
        ({"proximal_mu": -0.5}, "proximal_mu must be >= 0"),
    ],
)
def test_bad_config_is_invalid(
    device: Device, digits: Dataset, config: dict[str, Any], problem: str
) -> None:
    device.server.node.data.load_partition(digits.train.x[:40], digits.train.y[:40])
    with pytest.raises(grpc.RpcError) as info:
        device.trainer.Fit(fit_request(device.weights, **config), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in (info.value.details() or "")


def test_no_local_data_is_a_failed_precondition(device: Device) -> None:
    for call, request in (
        (device.trainer.Fit, fit_request(device.weights)),
        (
            device.trainer.Evaluate,
            trainer_pb2.EvaluateRequest(weights=codec.tensors_to_proto(device.weights)),
        ),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no local samples" in (info.value.details() or "")


def test_unknown_model_name_is_not_found(device: Device) -> None:
    request = fit_request(device.weights)
    request.model_name = "faces"
    with pytest.raises(grpc.RpcError) as info:
        device.trainer.Fit(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model 'faces' not found" in (info.value.details() or "")


def test_training_while_serving_never_disturbs_predictions(device: Device, digits: Dataset) -> None:
    device.server.node.data.load_partition(digits.train.x, digits.train.y)
    probe = digits.test.x[:4]
    _, before = serving_probs(device.inference, probe)
    done = threading.Event()
    errors: list[BaseException] = []

    def train() -> None:
        try:
            device.trainer.Fit(fit_request(device.weights, epochs=15), timeout=300)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=train)
    thread.start()
    checks = 0
    while not done.is_set() or checks == 0:
        _, probs = serving_probs(device.inference, probe)
        np.testing.assert_array_equal(probs, before)
        checks += 1
    thread.join(timeout=300)
    assert errors == []
    assert checks > 1


def test_without_a_model_fit_is_unavailable(tmp_path: Path) -> None:
    server = _start(tmp_path, None)
    try:
        with (
            grpc.insecure_channel(server.local_address) as channel,
            pytest.raises(grpc.RpcError) as info,
        ):
            trainer_pb2_grpc.TrainerStub(channel).Fit(trainer_pb2.FitRequest(), timeout=30)
    finally:
        server.stop(grace=0)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no model is loaded" in (info.value.details() or "")


def test_evaluate_without_a_heldout_part_is_a_failed_precondition(
    device: Device, digits: Dataset
) -> None:
    device.server.node.data.load_partition(digits.train.x[:12], digits.train.y[:12])
    with pytest.raises(grpc.RpcError) as info:
        device.trainer.Evaluate(
            trainer_pb2.EvaluateRequest(weights=codec.tensors_to_proto(device.weights)),
            timeout=60,
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "too little local data for a held-out split: 12 samples" in (
        info.value.details() or ""
    )
