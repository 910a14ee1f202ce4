"""``inference.GRPCInferenceService`` (KServe V2 / Open Inference Protocol) on the device.

Speaking the standard protocol means ``tritonclient`` and every KServe tool work against
a device unchanged. The device serves one model (``[model] name``), in one version at
a time: the one :class:`edge.serving.Serving` holds. Every ModelInfer response carries
in ``model_version`` the version that actually produced it, which matters while a new
release is being swapped in.

Validation of a request, each failure naming the problem:

* unknown model name, or a version other than the one being served → ``NOT_FOUND``;
* no model loaded yet → ``UNAVAILABLE``;
* wrong input name, datatype, shape, byte length or element count, a batch outside
  ``1..max_batch``, raw and typed contents mixed, unknown requested output →
  ``INVALID_ARGUMENT``;
* a message over ``max_message_bytes`` is refused by gRPC itself with ``RESOURCE_EXHAUSTED``.

A request that is exactly what the model takes (one raw input of the right name,
datatype and shape, nothing else unusual) is answered by a short path that checks just
that with values precomputed once per served version (:class:`_Plan`); anything else,
including every malformed request, goes through :func:`decode_input`, which accepts the
same valid requests and names the problem in the others. A test holds the two paths to
identical answers.

The KServe messages are not edgefl contracts, so the request ⇄ numpy conversion for
them lives here (next to the only service that speaks them), using
:mod:`protos.codec`'s ``KSERVE_DTYPES``, ``kserve_datatype`` and ``array_from_bytes``.
"""

from __future__ import annotations

import logging
import math
import sys
import weakref
from dataclasses import dataclass

import grpc
import numpy as np

from edge.cli import version as edgefl_version
from edge.errors import InvalidInput, ModelNotFound, abort
from edge.model_card import ModelCard
from edge.serving import Serving, ServingModel
from protos import codec
from protos.kserve import grpc_predict_v2_pb2 as pb
from protos.kserve import grpc_predict_v2_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "edgefl"
PLATFORM = "litert"

# KServe datatype → the typed-contents field that carries it.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def decode_input(request: pb.ModelInferRequest, card: ModelCard, max_batch: int) -> np.ndarray:
    """The request's single input as ``[batch, *input_shape]`` float32; :class:`InvalidInput`."""
    spec = card.input
    if len(request.inputs) != 1:
        raise InvalidInput(f"expected exactly 1 input ({spec.name!r}), got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != spec.name:
        raise InvalidInput(f"unknown input {tensor.name!r}; the model's input is {spec.name!r}")
    want_dtype = codec.kserve_datatype(spec.dtype)
    if tensor.datatype != want_dtype:
        raise InvalidInput(
            f"input {spec.name!r}: datatype {tensor.datatype or '(empty)'} not accepted, "
            f"expected {want_dtype}"
        )
    shape = tuple(int(d) for d in tensor.shape)
    expected = ["batch", *card.input_shape]
    if len(shape) != len(spec.shape) or shape[1:] != card.input_shape:
        raise InvalidInput(f"input {spec.name!r}: shape {list(shape)} does not match {expected}")
    batch = shape[0]
    if not 1 <= batch <= max_batch:
        raise InvalidInput(
            f"input {spec.name!r}: batch {batch} outside the accepted range 1..{max_batch}"
        )
    dtype = codec.KSERVE_DTYPES[want_dtype]
    has_typed = tensor.HasField("contents")
    if request.raw_input_contents:
        if has_typed:
            raise InvalidInput(
                f"input {spec.name!r}: give raw_input_contents or typed contents, not both"
            )
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(
                f"raw_input_contents holds {len(request.raw_input_contents)} entries for 1 input"
            )
        return codec.array_from_bytes(
            request.raw_input_contents[0], dtype, shape, what=f"input {spec.name!r}"
        ).astype(np.float32)
    if not has_typed:
        raise InvalidInput(f"input {spec.name!r}: no data (neither raw nor typed contents)")
    field = _CONTENTS_FIELD[want_dtype]
    for other in _CONTENTS_FIELD.values():
        if other != field and len(getattr(tensor.contents, other)):
            raise InvalidInput(
                f"input {spec.name!r}: datatype {want_dtype} data belongs in contents.{field}, "
                f"got contents.{other}"
            )
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {spec.name!r}: contents.{field} holds {len(values)} values, shape "
            f"{list(shape)} needs {count}"
        )
    return np.asarray(values, dtype=dtype).reshape(shape).astype(np.float32)


@dataclass(frozen=True)
class _Plan:
    """What a well-formed ModelInfer request for one served version looks like."""

    model: weakref.ref[ServingModel]
    """The version this plan is for; weak, so a plan never keeps a replaced version's
    interpreters in memory."""
    version: str
    input_name: str
    datatype: str
    rank: int
    tail: list[int]
    example_bytes: int
    wire_dtype: np.dtype
    output_name: str
    fast: bool
    """False when the short path cannot be exact (BOOL input needs a value check,
    a big-endian host needs byte swapping): every request then takes the full path."""

    @classmethod
    def of(cls, model: ServingModel) -> _Plan:
        card = model.card
        datatype = codec.kserve_datatype(card.input.dtype)
        wire_dtype = codec.KSERVE_DTYPES[datatype].newbyteorder("<")
        return cls(
            model=weakref.ref(model),
            version=str(model.version),
            input_name=card.input.name,
            datatype=datatype,
            rank=len(card.input.shape),
            tail=list(card.input_shape),
            example_bytes=math.prod(card.input_shape) * wire_dtype.itemsize,
            wire_dtype=wire_dtype,
            output_name=card.output.name,
            fast=sys.byteorder == "little" and wire_dtype.kind != "b",
        )

    def decode(self, request: pb.ModelInferRequest, max_batch: int) -> np.ndarray | None:
        """The input as C-contiguous float32 ``[batch, *input_shape]`` if ``request`` is
        plainly well formed; else ``None``."""
        if (
            not self.fast
            or len(request.inputs) != 1
            or len(request.raw_input_contents) != 1
            or (request.model_version and request.model_version != self.version)
        ):
            return None
        for wanted in request.outputs:
            if wanted.name != self.output_name:
                return None
        tensor = request.inputs[0]
        shape = tensor.shape
        if (
            tensor.name != self.input_name
            or tensor.datatype != self.datatype
            or len(shape) != self.rank
            or shape[1:] != self.tail
            or tensor.HasField("contents")
        ):
            return None
        batch = shape[0]
        data = request.raw_input_contents[0]
        if not 1 <= batch <= max_batch or len(data) != batch * self.example_bytes:
            return None
        x = np.frombuffer(data, dtype=self.wire_dtype).reshape(batch, *self.tail)
        return x if x.dtype == np.float32 else x.astype(np.float32)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """KServe V2 inference over :class:`Serving`."""

    def __init__(self, serving: Serving, model_name: str, max_batch: int) -> None:
        self._serving = serving
        self._name = model_name
        self._max_batch = max_batch
        self._plan: _Plan | None = None
        self.full_path_calls = 0
        """ModelInfer requests that took the full validating path (for tests; not exact
        under concurrency, the increment is not atomic)."""

    # -- helpers ------------------------------------------------------------------------
    def _resolve(self, name: str, version: str) -> ServingModel:
        """The serving model if ``name``/``version`` designate it; else NOT_FOUND/UNAVAILABLE."""
        if name != self._name:
            raise ModelNotFound(f"model {name!r} not found; this device serves {self._name!r}")
        model = self._serving.require()
        if version and version != str(model.version):
            raise ModelNotFound(
                f"model {name!r} version {version!r} not found; serving version {model.version}"
            )
        return model

    # -- health-ish ---------------------------------------------------------------------
    def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._serving.current is not None)

    def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.ServicerContext
    ) -> pb.ModelReadyResponse:
        model = self._serving.current
        ready = (
            model is not None
            and request.name == self._name
            and request.version in ("", str(model.version))
        )
        return pb.ModelReadyResponse(ready=ready)

    # -- metadata -----------------------------------------------------------------------
    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=edgefl_version(), extensions=[])

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            model = self._resolve(request.name, request.version)
        except Exception as exc:
            abort(context, exc, "ModelMetadata")
        card = model.card
        tensor_meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self._name,
            versions=[str(model.version)],
            platform=PLATFORM,
            inputs=[
                tensor_meta(
                    name=card.input.name,
                    datatype=codec.kserve_datatype(card.input.dtype),
                    shape=list(card.input.shape),
                )
            ],
            outputs=[
                tensor_meta(
                    name=card.output.name,
                    datatype=codec.kserve_datatype(card.output.dtype),
                    shape=list(card.output.shape),
                )
            ],
        )

    # -- inference ----------------------------------------------------------------------
    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        model = self._serving.current
        if model is not None and request.model_name == self._name:
            plan = self._plan
            if plan is None or plan.model() is not model:
                plan = self._plan = _Plan.of(model)
            x = plan.decode(request, self._max_batch)
            if x is not None:
                try:
                    probs = model.infer_checked(x)
                except Exception as exc:
                    abort(context, exc, "ModelInfer")
                # float32 from the runtime; plan.fast means a little-endian host.
                return self._answer(plan.version, request.id, plan.output_name, probs, "FP32")
        return self._infer_validated(request, context)

    def _answer(
        self,
        version: str,
        request_id: str,
        output_name: str,
        probs: np.ndarray,
        datatype: str | None = None,
    ) -> pb.ModelInferResponse:
        """The response; ``datatype`` given means ``probs`` is native little-endian of it."""
        if datatype is None:
            datatype, data = codec.kserve_datatype(probs.dtype), codec.array_to_bytes(probs)
        else:
            data = probs.tobytes()
        return pb.ModelInferResponse(
            model_name=self._name,
            model_version=version,
            id=request_id,
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name=output_name, datatype=datatype, shape=probs.shape
                )
            ],
            raw_output_contents=[data],
        )

    def _infer_validated(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        """ModelInfer through the full validation, which names whatever is wrong."""
        self.full_path_calls += 1
        try:
            model = self._resolve(request.model_name, request.model_version)
            card = model.card
            for wanted in request.outputs:
                if wanted.name != card.output.name:
                    raise InvalidInput(
                        f"unknown requested output {wanted.name!r}; the model's output is "
                        f"{card.output.name!r}"
                    )
            x = decode_input(request, card, self._max_batch)
            probs = model.infer(x)
        except Exception as exc:
            abort(context, exc, "ModelInfer")
        return self._answer(str(model.version), request.id, card.output.name, probs)
