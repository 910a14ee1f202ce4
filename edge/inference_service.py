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

Three paths answer ModelInfer, each taking only what the one before declines, and
tests hold them to identical answers:

1. **wire**: the request bytes are compared with the exact serialization of the plainest
   well-formed request (model name, one raw input of the right name, datatype and
   shape, nothing else: what ``tritonclient`` sends by default). On a match the input
   is read straight out of the bytes and the response is written as precomputed header
   bytes plus the output's bytes; no protobuf message is built either way. The byte
   templates are computed once per served version (:class:`_Plan`).
2. **short**: the request is parsed, and one that is well formed with only the usual
   extras (an ``id``, the served version, the known requested output) is checked
   against the same precomputed values.
3. **full**: anything else, including every malformed request, goes through
   :func:`decode_input`, which accepts the same valid requests and names the problem
   in the others.

The gRPC method is registered by :func:`add_to_server` with bytes in and out so that
the wire path can see the request before protobuf does; the other five methods are
registered as the generated code would.

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
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from edge import version as edgefl_version
from edge.errors import InvalidInput, ModelNotFound
from edge.grpc_status import abort
from edge.model_card import ModelCard
from edge.serving import Serving, ServingModel
from protos import codec
from protos.kserve import grpc_predict_v2_pb2 as pb
from protos.kserve import grpc_predict_v2_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "edgefl"
PLATFORM = "litert"

WIRE_MAX_BATCH = 1024
"""The wire path's byte templates cover batches up to this (or ``max_batch`` if lower);
bigger batches are answered by the short path."""

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


_RAW_INPUT_FIELD = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
_RAW_OUTPUT_FIELD = pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number


def _field_header(number: int, length: int) -> bytes:
    """The protobuf wire-format header of a length-delimited field: the tag (wire type 2)
    and the length, each a base-128 varint."""
    out = bytearray()
    for value in ((number << 3) | 2, length):
        while value > 0x7F:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


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
    model_name: str
    request_heads: dict[int, tuple[int, bytes]]
    """Wire path: request length → (batch, the bytes before the input data) of the
    plainest request for that batch. Empty when ``fast`` is false."""
    response_heads: dict[tuple[int, ...], bytes]
    """Wire path: output shape → the response bytes before the output data (filled on
    first use; every value is the same whichever thread writes it)."""

    @classmethod
    def of(cls, model: ServingModel, model_name: str, max_batch: int) -> _Plan:
        card = model.card
        datatype = codec.kserve_datatype(card.input.dtype)
        wire_dtype = codec.KSERVE_DTYPES[datatype].newbyteorder("<")
        fast = sys.byteorder == "little" and wire_dtype.kind != "b"
        example_bytes = math.prod(card.input_shape) * wire_dtype.itemsize
        heads: dict[int, tuple[int, bytes]] = {}
        for batch in range(1, min(max_batch, WIRE_MAX_BATCH) + 1 if fast else 1):
            head = pb.ModelInferRequest(
                model_name=model_name,
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(
                        name=card.input.name, datatype=datatype, shape=[batch, *card.input_shape]
                    )
                ],
            ).SerializeToString() + _field_header(_RAW_INPUT_FIELD, batch * example_bytes)
            heads[len(head) + batch * example_bytes] = (batch, head)
        return cls(
            model=weakref.ref(model),
            version=str(model.version),
            input_name=card.input.name,
            datatype=datatype,
            rank=len(card.input.shape),
            tail=list(card.input_shape),
            example_bytes=example_bytes,
            wire_dtype=wire_dtype,
            output_name=card.output.name,
            fast=fast,
            model_name=model_name,
            request_heads=heads,
            response_heads={},
        )

    def decode_wire(self, data: bytes) -> np.ndarray | None:
        """The input as float32 ``[batch, *input_shape]`` if ``data`` is byte for byte the
        plainest request (see the module docstring); else ``None``.

        Sound by the wire format alone: the head is a serialization of exactly the
        expected fields followed by the header of one ``raw_input_contents`` entry of
        the length that remains, so any bytes that match parse to that request.
        """
        hit = self.request_heads.get(len(data))
        if hit is None or not data.startswith(hit[1]):
            return None
        batch, head = hit
        x = np.frombuffer(data, dtype=self.wire_dtype, offset=len(head)).reshape(batch, *self.tail)
        return x if x.dtype == np.float32 else x.astype(np.float32)

    def encode_wire(self, probs: np.ndarray) -> bytes:
        """The serialized response to a wire-path request (no ``id``) for float32 ``probs``."""
        head = self.response_heads.get(probs.shape)
        if head is None:
            head = self.response_heads[probs.shape] = pb.ModelInferResponse(
                model_name=self.model_name,
                model_version=self.version,
                outputs=[
                    pb.ModelInferResponse.InferOutputTensor(
                        name=self.output_name, datatype="FP32", shape=probs.shape
                    )
                ],
            ).SerializeToString() + _field_header(_RAW_OUTPUT_FIELD, probs.nbytes)
        return head + probs.tobytes()

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
        # Compute the next version's plan in the swapping thread, not in its first request.
        serving.add_listener(self._plan_for)
        self.parsed_calls = 0
        """ModelInfer requests (as bytes) that the wire path left to the parsed paths."""
        self.full_path_calls = 0
        """ModelInfer requests that took the full validating path. Both counters are for
        tests: not exact under concurrency, the increment is not atomic."""

    # -- helpers ------------------------------------------------------------------------
    def _plan_for(self, model: ServingModel) -> _Plan:
        plan = self._plan
        if plan is None or plan.model() is not model:
            plan = _Plan.of(model, self._name, self._max_batch)
            # Cache only the serving version's plan: a request still finishing on the
            # previous version must not evict it (each would then rebuild the other).
            if model is self._serving.current:
                self._plan = plan
        return plan

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
    def model_infer_bytes(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        """ModelInfer on the request's bytes, answering with the response's bytes: the
        wire path, else :meth:`ModelInfer` on the parsed request."""
        model = self._serving.current
        if model is not None:
            plan = self._plan_for(model)
            x = plan.decode_wire(data)
            if x is not None:
                try:
                    probs = model.infer_checked(x)
                except Exception as exc:
                    abort(context, exc, "ModelInfer")
                return plan.encode_wire(probs)
        self.parsed_calls += 1
        try:
            request = pb.ModelInferRequest.FromString(data)
        except DecodeError as exc:
            abort(
                context,
                InvalidInput(f"the request is not a valid ModelInferRequest message: {exc}"),
                "ModelInfer",
            )
        return self.ModelInfer(request, context).SerializeToString()

    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        model = self._serving.current
        if model is not None and request.model_name == self._name:
            plan = self._plan_for(model)
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


def add_to_server(servicer: InferenceServicer, server: grpc.Server) -> None:
    """Register ``servicer`` as ``inference.GRPCInferenceService`` on ``server``.

    Five methods are registered as the generated ``add_..._to_server`` would (protobuf
    messages in and out); ModelInfer with bytes in and out, served by
    :meth:`InferenceServicer.model_infer_bytes`.
    """
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            raise TypeError(f"{method.full_name} is streaming; only unary methods are expected")
        if method.name == "ModelInfer":
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(servicer.model_infer_bytes)
            continue
        request_class = message_factory.GetMessageClass(method.input_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=request_class.FromString,
            response_serializer=lambda response: response.SerializeToString(),
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
