"""Errors raised while decoding or validating wire data.

Everything that arrives from another process (a gRPC request, an MQTT payload, a
stored artifact, a topic) is decoded by :mod:`protos.codec`, checked by
:mod:`protos.signing` or parsed by :mod:`protos.topics`; anything wrong with it raises
one of these, with a message that names the problem. :class:`CodecError` is the one
base of the protos package::

    CodecError (ValueError)
    ├── TensorError              a tensor's dtype, shape or byte length is wrong
    ├── ManifestError            a release manifest is missing fields or is inconsistent
    ├── PackageError             a model package cannot be parsed
    ├── StatusError              a device status report cannot be parsed
    ├── signing.SignatureError   a manifest signature is missing, foreign or wrong
    └── topics.TopicError        a fleet/device name unfit for a topic, or an unknown topic

Services map ``CodecError`` to ``INVALID_ARGUMENT`` (gRPC) or to a rejected release
(MQTT); it never escapes as a crash.
"""

from __future__ import annotations


class CodecError(ValueError):
    """Wire data that cannot be decoded into a valid domain object."""


class TensorError(CodecError):
    """A tensor whose dtype, shape or byte length is not acceptable."""


class ManifestError(CodecError):
    """A release manifest with missing or inconsistent fields."""


class PackageError(CodecError):
    """A model package (the release artifact) that cannot be parsed."""


class StatusError(CodecError):
    """A device status report or event that cannot be parsed."""
