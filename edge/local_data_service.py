"""``edgefl.v1.LocalData``: the gRPC face of :class:`edge.local_data.LocalData`."""

from __future__ import annotations

import logging

import grpc

from edge.errors import InvalidInput
from edge.grpc_status import abort
from edge.local_data import LocalData
from protos import codec
from protos.edgefl.v1 import local_data_pb2, local_data_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = local_data_pb2.DESCRIPTOR.services_by_name["LocalData"].full_name


class LocalDataServicer(local_data_pb2_grpc.LocalDataServicer):
    """Append / Stats / Clear on the device's sample store."""

    def __init__(self, data: LocalData) -> None:
        self._data = data

    def Append(
        self, request: local_data_pb2.AppendRequest, context: grpc.ServicerContext
    ) -> local_data_pb2.AppendResponse:
        try:
            if not request.HasField("x") or not request.HasField("y"):
                raise InvalidInput("both x and y are required")
            _, x = codec.tensor_from_proto(request.x)
            _, y = codec.tensor_from_proto(request.y)
            result = self._data.append(x, y)
        except Exception as exc:
            abort(context, exc, "LocalData.Append")
        return local_data_pb2.AppendResponse(
            accepted=result.accepted, evicted=result.evicted, total=result.total
        )

    def Stats(
        self, request: local_data_pb2.StatsRequest, context: grpc.ServicerContext
    ) -> local_data_pb2.StatsResponse:
        try:
            stats = self._data.stats()
        except Exception as exc:
            abort(context, exc, "LocalData.Stats")
        return local_data_pb2.StatsResponse(
            count=stats.count,
            capacity=stats.capacity,
            label_counts=stats.label_counts,
            input_shape=list(stats.input_shape),
            eviction_policy=stats.eviction_policy,
        )

    def Clear(
        self, request: local_data_pb2.ClearRequest, context: grpc.ServicerContext
    ) -> local_data_pb2.ClearResponse:
        try:
            removed = self._data.clear()
        except Exception as exc:
            abort(context, exc, "LocalData.Clear")
        return local_data_pb2.ClearResponse(removed=removed)
