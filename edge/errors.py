"""The errors of the edge package: one tree, rooted at :class:`EdgeError`.

Every error the device side raises is an :class:`EdgeError`, so a caller can catch
the package's errors in one clause. Where an error also is a standard kind (a bad
value, a failed runtime step), it keeps that base too (``ValueError``,
``RuntimeError``). The classes defined in other modules are listed with them::

    EdgeError
    ├── ConfigError          the settings file or EDGEFL_* variables are invalid (all problems)
    │                        (cloud.config.ConfigError is one too)
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
    ├── TaskInputUnavailable a task's message never arrived from the SuperNode → UNAVAILABLE
    ├── TrainingCancelled    a Fit stopped between steps (task timed out, run stopped,
    │                        device shutting down)                       → CANCELLED
    ├── DataError            the local sample store failed               → INTERNAL
    │   ├── NoLocalData      training/evaluation with no samples stored  → FAILED_PRECONDITION
    │   │   └── NoHeldOutData too few samples for a held-out split (a check) → FAILED_PRECONDITION
    │   └── NoRoomForSamples the disk budget leaves no room for samples  → RESOURCE_EXHAUSTED
    ├── model_card.ModelCardError         a model card is malformed (ValueError)
    ├── litert_model.ModelContractError   a .tflite lacks the card's signatures (ValueError)
    ├── litert_model.WeightMismatchError  weights do not fit the runtime model (ValueError)
    ├── model_check.UnsafeModelError      a model crashed or hung in the sandbox (RuntimeError)
    ├── run_approval.ApprovalError        a run approval is missing or not the fleet's (ValueError)
    ├── process.ProcessError              a child process did not start or get ready (RuntimeError)
    ├── mqtt_util.MqttError               a broker connection or request failed (RuntimeError)
    ├── flower_node.FlowerError           a Flower process or CLI call failed (RuntimeError)
    └── server.BindError                  the gRPC server could not bind (RuntimeError)

The status codes on the right are the gRPC layer's (:data:`edge.grpc_status.GRPC_STATUS`);
this module imports no grpc. :class:`protos.errors.CodecError` (malformed wire data) is
the protos package's tree and maps to ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

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


class TaskInputUnavailable(EdgeError):
    """A task's message never arrived from the SuperNode; nothing of it ran."""


class TrainingCancelled(EdgeError):
    """Training stopped between two steps; the served model and local data are untouched."""


class DataError(EdgeError):
    """The local sample store cannot complete an operation."""


class NoLocalData(DataError):
    """Training or evaluation was asked for while no samples are stored."""


class NoHeldOutData(NoLocalData):
    """An evaluation or shadow check needs a held-out part, and the device holds too few
    samples for one (see :mod:`edge.local_data_split`)."""


class NoRoomForSamples(DataError):
    """``[data] max_mb`` leaves no room for a single sample (the models take it all)."""
