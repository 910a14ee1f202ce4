"""Tensor and config codec: round trips (property-based) and rejection of malformed input."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protos import codec
from protos.edgefl.v1 import tensor_pb2
from protos.errors import CodecError, TensorError

DTYPES = [
    np.float32,
    np.float64,
    np.float16,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.bool_,
]


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    return draw(hnp.arrays(dtype=dtype, shape=shape))


@settings(max_examples=300, deadline=None)
@given(arr=arrays(), name=st.text(min_size=1, max_size=20))
def test_tensor_round_trip_is_exact(arr: np.ndarray, name: str) -> None:
    msg = codec.tensor_to_proto(name, arr)
    # Through the wire bytes too, not only the message object.
    parsed = tensor_pb2.Tensor.FromString(msg.SerializeToString())
    out_name, out = codec.tensor_from_proto(parsed)
    assert out_name == name
    assert out.dtype == arr.dtype
    assert out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()  # bit-exact, NaNs included


@settings(max_examples=200, deadline=None)
@given(arr=arrays())
def test_big_endian_input_is_sent_little_endian(arr: np.ndarray) -> None:
    swapped = arr.astype(arr.dtype.newbyteorder(">"))
    _, out = codec.tensor_from_proto(codec.tensor_to_proto("t", swapped))
    assert np.array_equal(out, arr, equal_nan=arr.dtype.kind == "f")


@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    delta=st.integers(-7, 7).filter(lambda d: d != 0),
)
def test_byte_length_mismatch_is_rejected_with_a_clear_message(
    shape: list[int], delta: int
) -> None:
    n = int(np.prod(shape)) * 4
    data = b"\0" * max(0, n + delta)
    if len(data) == n:
        return
    msg = tensor_pb2.Tensor(name="x", dtype=tensor_pb2.FLOAT32, shape=shape, data=data)
    with pytest.raises(TensorError, match="bytes do not match shape"):
        codec.tensor_from_proto(msg)


@pytest.mark.parametrize(
    ("msg", "pattern"),
    [
        (
            tensor_pb2.Tensor(name="x", dtype=0, shape=[1], data=b"\0" * 4),
            "unknown or unspecified dtype",
        ),
        (
            tensor_pb2.Tensor(name="x", dtype=99, shape=[1], data=b"\0" * 4),
            "unknown or unspecified dtype",
        ),
        (
            tensor_pb2.Tensor(name="x", dtype=tensor_pb2.FLOAT32, shape=[-1], data=b""),
            "negative dimension",
        ),
        (
            tensor_pb2.Tensor(
                name="x", dtype=tensor_pb2.FLOAT32, shape=[1 << 20, 1 << 20], data=b""
            ),
            "over the limit",
        ),
        (
            tensor_pb2.Tensor(name="x", dtype=tensor_pb2.FLOAT32, shape=[1] * 9, data=b"\0" * 4),
            "rank 9",
        ),
        (tensor_pb2.Tensor(name="x", dtype=tensor_pb2.BOOL, shape=[2], data=b"\x01\x07"), "BOOL"),
    ],
)
def test_malformed_tensors_are_rejected(msg: tensor_pb2.Tensor, pattern: str) -> None:
    with pytest.raises(TensorError, match=pattern):
        codec.tensor_from_proto(msg)


def test_named_tensor_lists_need_unique_names() -> None:
    t = codec.tensor_to_proto("w", np.zeros(2, np.float32))
    with pytest.raises(TensorError, match="more than once"):
        codec.tensors_from_proto([t, t])
    with pytest.raises(TensorError, match="without a name"):
        codec.tensors_from_proto([codec.tensor_to_proto("", np.zeros(2, np.float32))])


def test_unsupported_dtype_is_refused_on_encode() -> None:
    with pytest.raises(TensorError, match="not supported"):
        codec.tensor_to_proto("c", np.zeros(2, np.complex64))


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=10),
        st.one_of(
            st.booleans(),
            st.integers(-(2**63), 2**63 - 1),
            st.floats(allow_nan=False),
            st.text(max_size=10),
        ),
        max_size=6,
    )
)
def test_config_round_trip(config: dict[str, object]) -> None:
    msgs = codec.config_to_proto(config)  # type: ignore[arg-type]
    back = codec.config_from_proto(
        {k: tensor_pb2.ConfigValue.FromString(v.SerializeToString()) for k, v in msgs.items()}
    )
    assert back == config
    assert all(type(back[k]) is type(config[k]) for k in config)


def test_config_value_without_a_value_is_rejected() -> None:
    with pytest.raises(CodecError, match="no value set"):
        codec.config_from_proto({"lr": tensor_pb2.ConfigValue()})


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_anything_but_codec_errors(data: bytes) -> None:
    for decode in (
        codec.package_from_bytes,
        codec.manifest_from_bytes,
        codec.status_from_bytes,
        codec.event_from_bytes,
    ):
        with contextlib.suppress(CodecError):
            decode(data)
