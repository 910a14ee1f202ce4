"""Errors of the device side, and the one table that maps them to gRPC status codes.

Every domain object in :mod:`edge` raises one of these; servicers catch them at the
boundary and abort the call with the status code from :data:`GRPC_STATUS`::

    EdgeError
    ├── ConfigError          the settings file or EDGEFL_* variables are invalid (all problems)
    ├── ModelNotFound        unknown model name or version               → NOT_FOUND
    ├── ModelNotLoaded       no model is being served yet                → UNAVAILABLE
    ├── InvalidInput         a request does not fit the model card       → INVALID_ARGUMENT
    │   └── WeightMismatch   weights differ from the card (wraps litert_model.WeightMismatchError)
    ├── StoreError           the on-disk model store failed              → INTERNAL
    │   ├── DigestMismatch   bytes do not hash to the announced SHA-256  → INVALID_ARGUMENT
    │   └── StoreCorrupt     a stored version no longer verifies         → DATA_LOSS
    ├── InstallError         a release could not be installed or served  → FAILED_PRECONDITION
    ├── TaskRefused          a Flower message the device will not execute (unapproved run,
    │                        unknown content keys or message type)       → PERMISSION_DENIED
    ├── TrainingCancelled    a Fit stopped between steps (task timed out, run stopped,
    │                        device shutting down)                       → CANCELLED
    └── DataError            the local sample store failed               → INTERNAL
        ├── NoLocalData      training/evaluation with no samples stored  → FAILED_PRECONDITION
        └── NoRoomForSamples the disk budget leaves no room for samples  → RESOURCE_EXHAUSTED

:class:`protos.errors.CodecError` (malformed wire data) maps to ``INVALID_ARGUMENT``.
Anything else reaching a servicer is a bug: it is logged with its traceback and
answered with ``INTERNAL``, never a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, NoReturn

import grpc

from protos.errors import CodecError

if TYPE_CHECKING:
    from edge.litert_model import WeightMismatchError

logger = logging.getLogger(__name__)


class EdgeError(Exception):
    """Base class of every error raised by the edge package."""


class ConfigError(EdgeError):
    """Invalid settings; ``problems`` lists every problem found, not only the first.

    Given a list, the message is ``invalid <subject>: `` and the problems; given one
    string, the message is that string (a problem that needs its own explanation).
    """

    subject = "edgefl settings"
    """What the settings are, for the message (the cloud's subclass says ``cloud settings``)."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        if isinstance(problems, str):
            self.problems = [problems]
            message = problems
        else:
            self.problems = list(problems)
            message = self.describe(self.problems)
        super().__init__(message)

    @classmethod
    def describe(cls, problems: list[str]) -> str:
        """The message for ``problems``: one line, problems separated by ``; ``."""
        return f"invalid {cls.subject}: " + "; ".join(problems)


class ModelNotFound(EdgeError):
    """A request names a model or version this device does not serve or store."""


class ModelNotLoaded(EdgeError):
    """No model is loaded yet (fresh device waiting for its first release)."""


class InvalidInput(EdgeError):
    """A request's tensors or configuration do not fit the model card."""


class WeightMismatch(InvalidInput):
    """Weights offered for training or installing differ from the model card.

    ``problems`` lists every missing, unexpected, mis-shaped or mis-typed weight.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("weights do not match the model card: " + "; ".join(self.problems))

    @classmethod
    def wrap(cls, exc: WeightMismatchError) -> WeightMismatch:
        """Convert the runtime's :class:`~edge.litert_model.WeightMismatchError`."""
        err = cls(exc.problems)
        err.__cause__ = exc
        return err


class StoreError(EdgeError):
    """The on-disk model store cannot complete an operation."""


class DigestMismatch(StoreError):
    """Bytes whose SHA-256 differs from the digest they were announced with."""


class StoreCorrupt(StoreError):
    """A stored version (or the pointer to it) no longer verifies."""


class InstallError(EdgeError):
    """A release could not be installed or served; the previous version keeps serving."""


class TaskRefused(EdgeError):
    """A Flower message this device will not execute; nothing of it ran."""


class TrainingCancelled(EdgeError):
    """Training stopped between two steps; the served model and local data are untouched."""


class DataError(EdgeError):
    """The local sample store cannot complete an operation."""


class NoLocalData(DataError):
    """Training or evaluation was asked for while no samples are stored."""


class NoRoomForSamples(DataError):
    """``[data] max_mb`` leaves no room for a single sample (the models take it all)."""


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
