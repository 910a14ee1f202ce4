"""Fuzz the device's gRPC services with random requests over a real loopback channel.

One in-process server (:func:`edge.server.build_server` on port 0, a real
:class:`~edge.node.EdgeNode` serving the digits MLP as version 1) and our own stubs
from ``protos/``. Hypothesis builds ModelInfer requests (datatypes, shapes, raw and
typed contents, parameters, names, versions), Fit requests (weight tensors of any
dtype/shape/value, configs of any type) and LocalData appends (any tensors). Every
reply must be OK, or a clear ``INVALID_ARGUMENT`` / ``NOT_FOUND`` /
``FAILED_PRECONDITION`` / ``RESOURCE_EXHAUSTED`` with a message; never ``UNKNOWN`` or
``INTERNAL``. After each target the server must still answer a genuine request with
exactly the output it gave before, from the unchanged version 1.

Case counts: ModelInfer 1,200, Fit 1,000 (400 of them reach training), LocalData
1,000 (~40 s in total on 2 shared cores).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from edge.config import load_settings
from edge.node import EdgeNode
from edge.server import build_local_server, build_server
from protos import codec
from protos.edgefl.v1 import (
    local_data_pb2,
    local_data_pb2_grpc,
    tensor_pb2,
    trainer_pb2,
    trainer_pb2_grpc,
)
from protos.kserve import grpc_predict_v2_pb2 as kpb
from protos.kserve import grpc_predict_v2_pb2_grpc as kgrpc
from tests.edge.helpers import device_config, make_package, model_weights
from tests.fuzz.cases import fuzz

CLEAR_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
MODEL = "digits"
FEATURES = 64
CLASSES = 10
INITIAL_SAMPLES = 64


def _initial_samples() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 16, (INITIAL_SAMPLES, FEATURES)).astype(np.float32)
    return x, (np.arange(INITIAL_SAMPLES) % CLASSES).astype(np.int32)


def _initial_train_count() -> int:
    """Samples of the initial ones that Fit trains on (the rest are held out)."""
    from edge.local_data_split import split_samples

    return len(split_samples(*_initial_samples()).train)


@dataclass
class Device:
    """The running server, stubs on one channel, and the reference answer of version 1."""

    node: EdgeNode
    infer: kgrpc.GRPCInferenceServiceStub
    trainer: trainer_pb2_grpc.TrainerStub
    data: local_data_pb2_grpc.LocalDataStub
    weights: dict[str, np.ndarray]
    probe: np.ndarray
    expected: bytes

    def assert_unchanged(self) -> None:
        """Version 1 still serves, and gives the same bytes for the probe batch."""
        meta = self.infer.ModelMetadata(kpb.ModelMetadataRequest(name=MODEL), timeout=30)
        assert list(meta.versions) == ["1"]
        reply = self.infer.ModelInfer(infer_request(self.probe), timeout=30)
        assert reply.model_version == "1"
        assert reply.raw_output_contents[0] == self.expected
        assert self.node.serving_version() == 1


def infer_request(x: np.ndarray) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(codec.array_to_bytes(x))
    return request


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, mlp_model_dir: Path) -> Iterator[Device]:
    tmp = tmp_path_factory.mktemp("fuzz-grpc")
    package = tmp / "v1.pkg"
    package.write_bytes(make_package(mlp_model_dir))
    settings_ = load_settings(device_config(tmp, initial_package=package), env={})
    node = EdgeNode(settings_)
    node.start()
    assert node.serving_version() == 1
    server, port = build_server(node, settings_)
    local, target = build_local_server(node, settings_)
    server.start()
    local.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    local_channel = grpc.insecure_channel(target)
    try:
        x, y = _initial_samples()
        data = local_data_pb2_grpc.LocalDataStub(local_channel)
        data.Append(
            local_data_pb2.AppendRequest(
                x=codec.tensor_to_proto("x", x), y=codec.tensor_to_proto("y", y)
            ),
            timeout=30,
        )
        probe = np.random.default_rng(1).uniform(0, 16, (3, FEATURES)).astype(np.float32)
        infer = kgrpc.GRPCInferenceServiceStub(channel)
        expected = infer.ModelInfer(infer_request(probe), timeout=30).raw_output_contents[0]
        yield Device(
            node=node,
            infer=infer,
            trainer=trainer_pb2_grpc.TrainerStub(local_channel),
            data=data,
            weights=model_weights(mlp_model_dir),
            probe=probe,
            expected=expected,
        )
    finally:
        channel.close()
        local_channel.close()
        server.stop(0).wait()
        local.stop(0).wait()


def call(method: Any, request: Any) -> Any | None:
    """The reply, or None after checking the error is a clear, expected one."""
    try:
        reply = method(request, timeout=60)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        event(f"status {code.name}")
        assert code in CLEAR_ERRORS, f"{code.name}: {details}"
        assert details.strip(), f"{code.name} without a message"
        assert not details.startswith("internal error"), details
        return None
    event("status OK")
    return reply


# -- shared strategies --------------------------------------------------------------------

names = st.one_of(st.text(max_size=12), st.sampled_from(["x", "y", "probs", ""]))
dims = st.integers(min_value=-3, max_value=1 << 40)
small_dims = st.integers(min_value=0, max_value=70)


def float_arrays(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    """float32 arrays of ``shape`` with any values, NaN and infinities included."""
    count = math.prod(shape)
    return st.one_of(
        st.binary(min_size=count * 4, max_size=count * 4).map(
            lambda b: np.frombuffer(b, "<f4").reshape(shape).copy()
        ),
        st.floats(-20, 20, width=32).map(lambda v: np.full(shape, v, np.float32)),
    )


# -- ModelInfer ---------------------------------------------------------------------------

KSERVE_TYPES = [*codec.KSERVE_DTYPES, "BYTES", "FP8", "fp32", ""]
CONTENT_FIELDS = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=8),
}
parameters = st.dictionaries(
    st.text(max_size=6),
    st.one_of(
        st.builds(kpb.InferParameter, bool_param=st.booleans()),
        st.builds(kpb.InferParameter, int64_param=st.integers(-(2**63), 2**63 - 1)),
        st.builds(kpb.InferParameter, string_param=st.text(max_size=10)),
        st.builds(kpb.InferParameter, double_param=st.floats()),
    ),
    max_size=3,
)


def _valid_infer(draw: st.DrawFn) -> kpb.ModelInferRequest:
    """A correct request: batch 1..6 of any float32 values, raw or typed contents."""
    batch = draw(st.integers(1, 6))
    x = draw(float_arrays((batch, FEATURES)))
    request = kpb.ModelInferRequest(
        model_name=MODEL,
        model_version=draw(st.sampled_from(["", "1"])),
        id=draw(st.text(max_size=8)),
    )
    for key, value in draw(parameters).items():
        request.parameters[key].CopyFrom(value)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[batch, FEATURES])
    if draw(st.booleans()):
        request.raw_input_contents.append(codec.array_to_bytes(x))
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    if draw(st.booleans()):
        request.outputs.add(name="probs")
    return request


def _fault(draw: st.DrawFn, request: kpb.ModelInferRequest) -> None:
    """Break one thing in a correct request."""
    tensor = request.inputs[0]
    count = math.prod(tensor.shape)
    count = count if 0 <= count <= 6 * FEATURES else FEATURES  # after an earlier shape fault
    fault = draw(
        st.sampled_from(
            [
                "model",
                "version",
                "input_name",
                "datatype",
                "shape",
                "batch",
                "raw_length",
                "typed_count",
                "typed_field",
                "both",
                "no_data",
                "extra_raw",
                "extra_input",
                "no_input",
                "output",
                "bool_bytes",
            ]
        )
    )
    if fault == "model":
        request.model_name = draw(st.sampled_from(["", "other", "DIGITS"]) | st.text(max_size=8))
    elif fault == "version":
        request.model_version = draw(st.sampled_from(["2", "0", "-1", "1.0", " 1"]) | st.text())
    elif fault == "input_name":
        tensor.name = draw(st.sampled_from(["X", "input", ""]) | st.text(max_size=8))
    elif fault == "datatype":
        tensor.datatype = draw(st.sampled_from(KSERVE_TYPES) | st.text(max_size=6))
    elif fault == "shape":
        del tensor.shape[:]
        tensor.shape.extend(draw(st.lists(st.one_of(small_dims, dims), max_size=10)))
    elif fault == "batch":
        tensor.shape[0] = draw(st.sampled_from([0, -1, 257, 300, 1 << 40, -(1 << 62)]))
    elif fault == "raw_length":
        del request.raw_input_contents[:]
        request.raw_input_contents.append(draw(st.binary(max_size=300)))
        tensor.ClearField("contents")
    elif fault == "typed_count":
        tensor.ClearField("contents")
        del request.raw_input_contents[:]
        count = draw(st.integers(0, 3 * FEATURES))
        tensor.contents.fp32_contents.extend([0.5] * count)
    elif fault == "typed_field":
        tensor.ClearField("contents")
        del request.raw_input_contents[:]
        field = draw(st.sampled_from(sorted(CONTENT_FIELDS)))
        getattr(tensor.contents, field).extend(
            draw(st.lists(CONTENT_FIELDS[field], min_size=count, max_size=count))
        )
    elif fault == "both":
        tensor.contents.fp32_contents.extend([1.0] * count)
        request.raw_input_contents.append(b"\0" * (4 * count))
    elif fault == "no_data":
        tensor.ClearField("contents")
        del request.raw_input_contents[:]
    elif fault == "extra_raw":
        request.raw_input_contents.append(draw(st.binary(max_size=16)))
    elif fault == "extra_input":
        request.inputs.add().CopyFrom(tensor)
    elif fault == "no_input":
        del request.inputs[:]
    elif fault == "output":
        request.outputs.add(name=draw(st.sampled_from(["x", "logits", ""]) | st.text(max_size=6)))
    elif fault == "bool_bytes":
        tensor.datatype = "BOOL"
        tensor.ClearField("contents")
        del request.raw_input_contents[:]
        request.raw_input_contents.append(draw(st.binary(min_size=count, max_size=count)))


@st.composite
def infer_requests(draw: st.DrawFn) -> kpb.ModelInferRequest:
    """Correct requests (40 %), requests with one or two faults (40 %) and nonsense (20 %)."""
    kind = draw(st.sampled_from(["valid", "valid", "fault", "fault", "chaos"]))
    if kind == "chaos":
        return draw(chaos_requests())
    request = _valid_infer(draw)
    if kind == "fault":
        for _ in range(draw(st.integers(1, 2))):
            if request.inputs:
                _fault(draw, request)
    return request


@st.composite
def chaos_requests(draw: st.DrawFn) -> kpb.ModelInferRequest:
    """Every field random (within what a protobuf can carry)."""
    request = kpb.ModelInferRequest(
        model_name=draw(st.sampled_from([MODEL, ""]) | st.text(max_size=8)),
        model_version=draw(st.sampled_from(["", "1"]) | st.text(max_size=4)),
        id=draw(st.text(max_size=8)),
    )
    for key, value in draw(parameters).items():
        request.parameters[key].CopyFrom(value)
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(names),
            datatype=draw(st.sampled_from(KSERVE_TYPES) | st.text(max_size=6)),
            shape=draw(st.lists(st.one_of(small_dims, dims), max_size=10)),
        )
        for key, value in draw(parameters).items():
            tensor.parameters[key].CopyFrom(value)
        for field in draw(st.lists(st.sampled_from(sorted(CONTENT_FIELDS)), max_size=2)):
            getattr(tensor.contents, field).extend(
                draw(st.lists(CONTENT_FIELDS[field], max_size=70))
            )
    request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=300), max_size=3)))
    for name in draw(st.lists(names, max_size=2)):
        request.outputs.add(name=name)
    return request


@pytest.mark.slow  # the longest fuzz runs: CI runs them, `-m "not slow"` does not
@fuzz(1000)
@given(infer_requests())
@example(kpb.ModelInferRequest())
@example(
    kpb.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            kpb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1 << 40, 64])
        ],
        raw_input_contents=[b"\0" * 256],
    )
)
def test_model_infer(device: Device, request_: kpb.ModelInferRequest) -> None:
    reply = call(device.infer.ModelInfer, request_)
    if reply is not None:
        batch = request_.inputs[0].shape[0]
        assert reply.model_version == "1" and reply.model_name == MODEL
        assert reply.id == request_.id
        assert list(reply.outputs[0].shape) == [batch, CLASSES]
        assert len(reply.raw_output_contents[0]) == batch * CLASSES * 4


def test_model_infer_survivors(device: Device) -> None:
    """After the ModelInfer fuzz: same version, same answer."""
    device.assert_unchanged()


# -- Fit ----------------------------------------------------------------------------------

WIRE_DTYPES = [tensor_pb2.FLOAT32] * 4 + list(range(0, 12))


@st.composite
def weight_tensors(draw: st.DrawFn, genuine: dict[str, np.ndarray]) -> list[tensor_pb2.Tensor]:
    """The card's weights with random damage: names, shapes, dtypes, byte lengths, values."""
    out: list[tensor_pb2.Tensor] = []
    intact = draw(st.booleans())
    for name, w in genuine.items():
        action = (
            "keep"
            if intact
            else draw(
                st.sampled_from(["keep"] * 3 + ["drop", "rename", "reshape", "dtype", "bytes"])
            )
        )
        if action == "drop":
            continue
        fill = draw(st.sampled_from(["keep", "keep", "constant", "special"]))
        if fill == "constant":
            values = np.full(w.shape, draw(st.floats(-3, 3, width=32)), np.float32)
        elif fill == "special":
            values = np.full(w.shape, draw(st.sampled_from([np.nan, np.inf, 1e30])), np.float32)
        else:
            values = w
        tensor = codec.tensor_to_proto(name, values)
        if action == "rename":
            tensor.name = draw(names)
        elif action == "reshape":
            del tensor.shape[:]
            tensor.shape.extend(draw(st.lists(st.one_of(small_dims, dims), max_size=4)))
        elif action == "dtype":
            tensor.dtype = draw(st.sampled_from(WIRE_DTYPES))  # type: ignore[assignment]
        elif action == "bytes":
            tensor.data = draw(st.binary(max_size=64))
        out.append(tensor)
    for _ in range(0 if intact else draw(st.integers(0, 1))):
        shape = draw(st.lists(small_dims, max_size=3))
        out.append(
            tensor_pb2.Tensor(
                name=draw(names),
                dtype=draw(st.sampled_from(WIRE_DTYPES)),  # type: ignore[arg-type]
                shape=shape,
                data=draw(st.binary(max_size=32)),
            )
        )
    return out


non_int_values = st.one_of(
    st.builds(tensor_pb2.ConfigValue, double_value=st.floats()),
    st.builds(tensor_pb2.ConfigValue, string_value=st.text(max_size=8)),
    st.builds(tensor_pb2.ConfigValue, bool_value=st.booleans()),
    st.just(tensor_pb2.ConfigValue()),
)
config_values = st.one_of(
    st.builds(tensor_pb2.ConfigValue, int_value=st.integers(-(2**63), 2**63 - 1)),
    non_int_values,
)
# Epochs stay small when they are valid integers: a huge valid epoch count trains for
# hours by design (the device has no epoch limit; the aggregator sets it).
epoch_values = st.one_of(
    st.builds(tensor_pb2.ConfigValue, int_value=st.integers(-(2**63), 1)),
    non_int_values,
)


@st.composite
def fit_requests(draw: st.DrawFn, genuine: dict[str, np.ndarray]) -> trainer_pb2.FitRequest:
    request = trainer_pb2.FitRequest(
        model_name=draw(st.sampled_from(["", MODEL, MODEL, MODEL, "other"])),
        server_round=draw(st.integers(-(2**63), 2**63 - 1)),
    )
    request.weights.extend(draw(weight_tensors(genuine)))
    keys = st.sampled_from(
        ["epochs", "batch_size", "learning_rate", "proximal_mu", "seed", "lr", ""]
    )
    valid = {
        "epochs": st.integers(0, 1),
        "batch_size": st.just(32),
        "learning_rate": st.floats(1e-4, 1.0),
        "proximal_mu": st.floats(0.0, 1.0),
        "seed": st.integers(-(2**63), 2**63 - 1),
    }
    for key in draw(st.lists(keys, max_size=4, unique=True)):
        if key in valid and draw(st.booleans()):
            value = codec.config_to_proto({key: draw(valid[key])})[key]
        else:
            value = draw(epoch_values if key == "epochs" else config_values)
        request.config[key].CopyFrom(value)
    if "epochs" not in request.config:
        request.config["epochs"].CopyFrom(tensor_pb2.ConfigValue(int_value=1))
    return request


@fuzz(1000)
@given(st.data())
def test_fit(device: Device, data: st.DataObject) -> None:
    request = data.draw(fit_requests(device.weights), label="request")
    reply = call(device.trainer.Fit, request)
    if reply is not None:
        weights = codec.tensors_from_proto(reply.weights)
        assert {k: v.shape for k, v in weights.items()} == {
            k: v.shape for k, v in device.weights.items()
        }
        # Fit trains on the train part; appended samples only add to the initial one's.
        assert reply.num_examples >= _initial_train_count()


def test_fit_survivors(device: Device) -> None:
    """After the Fit fuzz: the served model is untouched and a genuine Fit still works."""
    device.assert_unchanged()
    reply = device.trainer.Fit(
        trainer_pb2.FitRequest(
            weights=codec.tensors_to_proto(device.weights),
            config=codec.config_to_proto({"epochs": 1, "seed": 3}),
        ),
        timeout=60,
    )
    assert math.isfinite(reply.metrics["loss"])


# -- LocalData.Append ---------------------------------------------------------------------


@st.composite
def sample_tensor(draw: st.DrawFn, role: str, n: int) -> tensor_pb2.Tensor:
    if role == "x":
        good_shape = [n, FEATURES]
        finite = st.floats(0, 16, width=32).map(lambda v: np.full((n, FEATURES), v, np.float32))
        good = draw(finite if draw(st.booleans()) else float_arrays((n, FEATURES)))
    else:
        good_shape = [n]
        labels = st.integers(0, CLASSES - 1) if draw(st.booleans()) else st.integers(-2, 12)
        good = np.asarray(draw(st.lists(labels, min_size=n, max_size=n)), np.int32)
    tensor = codec.tensor_to_proto(role, good)
    action = draw(st.sampled_from(["keep"] * 8 + ["reshape", "dtype", "bytes", "other_int"]))
    if action == "reshape":
        del tensor.shape[:]
        tensor.shape.extend(draw(st.lists(st.one_of(small_dims, dims), max_size=4)))
    elif action == "dtype":
        tensor.dtype = draw(st.sampled_from(WIRE_DTYPES))  # type: ignore[assignment]
    elif action == "bytes":
        tensor.data = draw(st.binary(max_size=64))
    elif action == "other_int" and role == "y":
        dtype = draw(st.sampled_from([np.int8, np.int64, np.uint8, np.int16]))
        tensor.CopyFrom(codec.tensor_to_proto(role, good.astype(dtype)))
    assert good_shape is not None
    return tensor


@fuzz(1000)
@given(st.data())
def test_local_data_append(device: Device, data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 6), label="samples")
    n_y = data.draw(st.sampled_from([n] * 4 + [n + 1, max(0, n - 1)]), label="labels")
    present = st.sampled_from([True] * 9 + [False])
    x = data.draw(sample_tensor("x", n)) if data.draw(present) else None
    y = data.draw(sample_tensor("y", n_y)) if data.draw(present) else None
    before = device.data.Stats(local_data_pb2.StatsRequest(), timeout=30).count
    request = local_data_pb2.AppendRequest()
    if x is not None:
        request.x.CopyFrom(x)
    if y is not None:
        request.y.CopyFrom(y)
    reply = call(device.data.Append, request)
    after = device.data.Stats(local_data_pb2.StatsRequest(), timeout=30)
    if reply is None:
        assert after.count == before, "a refused append changed the store"
    else:
        assert reply.accepted >= 1 and after.count == reply.total
        assert all(0 <= int(k) < CLASSES for k in after.label_counts)


def test_local_data_survivors(device: Device) -> None:
    """After the Append fuzz: the stored samples are all valid and the model unchanged."""
    device.assert_unchanged()
    xs, ys = device.node.data.snapshot()
    assert xs.shape[1:] == (FEATURES,) and np.isfinite(xs).all()
    assert ys.min() >= 0 and ys.max() < CLASSES
