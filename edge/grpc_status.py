"""The one table that maps device errors to gRPC status codes, and the servicers' abort.

Servicers (:mod:`edge.inference_service`, :mod:`edge.trainer_service`,
:mod:`edge.local_data_service`) catch errors at the boundary and call :func:`abort`;
the code comes from :data:`GRPC_STATUS`, most specific class first. The errors
themselves live in :mod:`edge.errors`, which imports no grpc, so settings and domain
modules load on a machine without it. Anything that is neither an
:class:`~edge.errors.EdgeError` nor a :class:`~protos.errors.CodecError` reaching a
servicer is a bug: it is logged with its traceback and answered with ``INTERNAL``
without its message, never a crash.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from edge.errors import (
    ConfigError,
    DataError,
    DigestMismatch,
    EdgeError,
    InstallError,
    InvalidInput,
    ModelNotFound,
    ModelNotLoaded,
    NoLocalData,
    NoRoomForSamples,
    StoreCorrupt,
    StoreError,
    TaskInputUnavailable,
    TaskRefused,
    TrainingCancelled,
)
from protos.errors import CodecError

__all__ = ["GRPC_STATUS", "abort", "grpc_status"]

logger = logging.getLogger(__name__)

#: Exception class → gRPC status code. The most specific class in an error's MRO wins.
GRPC_STATUS: dict[type[BaseException], grpc.StatusCode] = {
    CodecError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotLoaded: grpc.StatusCode.UNAVAILABLE,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    DigestMismatch: grpc.StatusCode.INVALID_ARGUMENT,
    StoreCorrupt: grpc.StatusCode.DATA_LOSS,
    StoreError: grpc.StatusCode.INTERNAL,
    InstallError: grpc.StatusCode.FAILED_PRECONDITION,
    TaskRefused: grpc.StatusCode.PERMISSION_DENIED,
    TaskInputUnavailable: grpc.StatusCode.UNAVAILABLE,
    TrainingCancelled: grpc.StatusCode.CANCELLED,
    NoLocalData: grpc.StatusCode.FAILED_PRECONDITION,
    NoRoomForSamples: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DataError: grpc.StatusCode.INTERNAL,
    ConfigError: grpc.StatusCode.INTERNAL,
    EdgeError: grpc.StatusCode.INTERNAL,
}


def grpc_status(exc: BaseException) -> grpc.StatusCode:
    """The status code for ``exc``: its most specific class found in :data:`GRPC_STATUS`."""
    for klass in type(exc).__mro__:
        code = GRPC_STATUS.get(klass)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> NoReturn:
    """Abort the call with the status mapped from ``exc``; unknown errors are logged."""
    code = grpc_status(exc)
    if isinstance(exc, EdgeError | CodecError):
        logger.info("%s: %s: %s", method, code.name, exc)
        message = str(exc)
    else:
        logger.exception("%s: unexpected error", method, exc_info=exc)
        message = f"internal error: {type(exc).__name__}"
    context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises
