"""The one place that converts between protobuf messages and Python/numpy objects.

Nothing else in edgefl reads or builds the internals of a ``*_pb2`` message for the
edgefl contracts: services call the ``*_to_proto`` / ``*_from_proto`` pairs here. All
decoding validates: a malformed message raises a :class:`protos.errors.CodecError`
subclass whose message names the field and the problem.

Tensor bytes are little-endian and row-major (C order) on the wire, whatever the host.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protos.edgefl.v1 import release_pb2, status_pb2, tensor_pb2
from protos.errors import ManifestError, PackageError, StatusError, TensorError

#: Largest number of elements accepted in one tensor (2**28 ≈ 268 M, ~1 GiB of fp32).
MAX_TENSOR_ELEMENTS = 1 << 28
#: Largest rank accepted.
MAX_RANK = 8

# edgefl.v1.DataType <-> numpy dtype (little-endian).
_DTYPES: dict[Any, np.dtype[Any]] = {
    tensor_pb2.FLOAT32: np.dtype("<f4"),
    tensor_pb2.FLOAT64: np.dtype("<f8"),
    tensor_pb2.FLOAT16: np.dtype("<f2"),
    tensor_pb2.INT8: np.dtype("i1"),
    tensor_pb2.INT16: np.dtype("<i2"),
    tensor_pb2.INT32: np.dtype("<i4"),
    tensor_pb2.INT64: np.dtype("<i8"),
    tensor_pb2.UINT8: np.dtype("u1"),
    tensor_pb2.BOOL: np.dtype("?"),
}
_DTYPE_BY_KIND: dict[tuple[str, int], Any] = {
    (dt.kind, dt.itemsize): code for code, dt in _DTYPES.items()
}

# KServe V2 datatype strings <-> numpy dtypes (little-endian).
KSERVE_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


def kserve_datatype(dtype: np.dtype[Any] | str) -> str:
    """The KServe datatype string for a numpy dtype (``float32`` → ``FP32``)."""
    dt = np.dtype(dtype)
    for name, candidate in KSERVE_DTYPES.items():
        if candidate.kind == dt.kind and candidate.itemsize == dt.itemsize:
            return name
    raise TensorError(f"dtype {dt} has no KServe datatype")


def check_shape(shape: Iterable[int], *, what: str = "tensor") -> tuple[int, ...]:
    """Validate a shape from the wire: rank ≤ MAX_RANK, dims ≥ 0, size ≤ MAX_TENSOR_ELEMENTS."""
    dims = tuple(int(d) for d in shape)
    if len(dims) > MAX_RANK:
        raise TensorError(f"{what}: rank {len(dims)} exceeds the maximum of {MAX_RANK}")
    for d in dims:
        if d < 0:
            raise TensorError(f"{what}: negative dimension {d} in shape {list(dims)}")
    count = math.prod(dims)
    if count > MAX_TENSOR_ELEMENTS:
        raise TensorError(
            f"{what}: shape {list(dims)} has {count} elements, over the limit of "
            f"{MAX_TENSOR_ELEMENTS}"
        )
    return dims


def array_from_bytes(
    data: bytes, dtype: np.dtype[Any], shape: Iterable[int], *, what: str = "tensor"
) -> np.ndarray:
    """Decode little-endian row-major bytes into a native-endian array, checking the length."""
    dims = check_shape(shape, what=what)
    expected = math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise TensorError(
            f"{what}: {len(data)} bytes do not match shape {list(dims)} x {dtype.name} "
            f"({expected} bytes expected)"
        )
    arr = np.frombuffer(data, dtype=dtype).reshape(dims)
    if dtype.kind == "b":
        # Only 0 and 1 are valid booleans; anything else would be undefined in numpy.
        raw = np.frombuffer(data, dtype=np.uint8)
        if raw.size and int(raw.max()) > 1:
            raise TensorError(f"{what}: BOOL data holds bytes other than 0 and 1")
    return arr.astype(dtype.newbyteorder("="), copy=True)


def array_to_bytes(arr: np.ndarray) -> bytes:
    """Encode an array as little-endian row-major bytes."""
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not _little_endian_host()):
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.tobytes(order="C")


def _little_endian_host() -> bool:
    return bool(np.little_endian)


# --- tensors ---------------------------------------------------------------------------


def tensor_to_proto(name: str, arr: np.ndarray) -> tensor_pb2.Tensor:
    dt = np.dtype(arr.dtype)
    code = _DTYPE_BY_KIND.get((dt.kind, dt.itemsize))
    if code is None:
        raise TensorError(f"tensor {name!r}: dtype {dt} is not supported on the wire")
    return tensor_pb2.Tensor(name=name, dtype=code, shape=list(arr.shape), data=array_to_bytes(arr))


def tensor_from_proto(msg: tensor_pb2.Tensor) -> tuple[str, np.ndarray]:
    what = f"tensor {msg.name!r}" if msg.name else "tensor"
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise TensorError(f"{what}: unknown or unspecified dtype code {msg.dtype}")
    return msg.name, array_from_bytes(msg.data, dtype, msg.shape, what=what)


def tensors_to_proto(arrays: Mapping[str, np.ndarray]) -> list[tensor_pb2.Tensor]:
    """Named arrays → Tensor messages, in name order (deterministic)."""
    return [tensor_to_proto(name, arrays[name]) for name in sorted(arrays)]


def tensors_from_proto(msgs: Iterable[tensor_pb2.Tensor]) -> dict[str, np.ndarray]:
    """Tensor messages → named arrays. Names must be non-empty and unique."""
    out: dict[str, np.ndarray] = {}
    for msg in msgs:
        if not msg.name:
            raise TensorError("tensor without a name in a list of named tensors")
        if msg.name in out:
            raise TensorError(f"tensor {msg.name!r} appears more than once")
        name, arr = tensor_from_proto(msg)
        out[name] = arr
    return out


# --- configuration values -------------------------------------------------------------

ConfigScalar = bool | int | float | str


def config_to_proto(config: Mapping[str, ConfigScalar]) -> dict[str, tensor_pb2.ConfigValue]:
    out: dict[str, tensor_pb2.ConfigValue] = {}
    for key, value in config.items():
        if isinstance(value, bool):
            out[key] = tensor_pb2.ConfigValue(bool_value=value)
        elif isinstance(value, int):
            out[key] = tensor_pb2.ConfigValue(int_value=value)
        elif isinstance(value, float):
            out[key] = tensor_pb2.ConfigValue(double_value=value)
        elif isinstance(value, str):
            out[key] = tensor_pb2.ConfigValue(string_value=value)
        else:
            raise TensorError(f"config {key!r}: unsupported type {type(value).__name__}")
    return out


def config_from_proto(config: Mapping[str, tensor_pb2.ConfigValue]) -> dict[str, ConfigScalar]:
    out: dict[str, ConfigScalar] = {}
    for key, value in config.items():
        kind = value.WhichOneof("kind")
        if kind is None:
            raise TensorError(f"config {key!r}: no value set")
        out[key] = getattr(value, kind)
    return out


# --- model packages (release artifacts) ------------------------------------------------


@dataclass(frozen=True)
class ModelPackage:
    """A release artifact: the LiteRT flatbuffer, its card and one set of weights."""

    architecture_id: str
    tflite: bytes
    card_json: str
    weights: dict[str, np.ndarray] = field(default_factory=dict)


def package_to_bytes(pkg: ModelPackage) -> bytes:
    """Serialize deterministically: the same package always gives the same bytes."""
    msg = release_pb2.ModelPackage(
        architecture_id=pkg.architecture_id,
        tflite=pkg.tflite,
        card_json=pkg.card_json,
        weights=tensors_to_proto(pkg.weights),
    )
    return msg.SerializeToString(deterministic=True)


def package_from_bytes(data: bytes) -> ModelPackage:
    msg = release_pb2.ModelPackage()
    try:
        msg.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError, sometimes others
        raise PackageError(f"model package is not a valid protobuf: {exc}") from exc
    missing = [
        name for name in ("architecture_id", "tflite", "card_json") if not getattr(msg, name)
    ]
    if missing:
        raise PackageError(f"model package is missing {', '.join(missing)}")
    try:
        json.loads(msg.card_json)
    except ValueError as exc:
        raise PackageError(f"model package card is not JSON: {exc}") from exc
    return ModelPackage(
        architecture_id=msg.architecture_id,
        tflite=msg.tflite,
        card_json=msg.card_json,
        weights=tensors_from_proto(msg.weights),
    )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- release manifests -----------------------------------------------------------------

_HEX = frozenset("0123456789abcdef")


def _is_sha256_hex(value: str) -> bool:
    return len(value) == 64 and set(value) <= _HEX


@dataclass(frozen=True)
class Manifest:
    """A release manifest as a plain value. ``signature`` is empty until signed."""

    fleet: str
    version: int
    parent_version: int
    round: int
    created_at_ms: int
    architecture_id: str
    artifact_sha256: str
    artifact_size: int
    chunk_size: int
    chunk_sha256: tuple[str, ...]
    metrics: dict[str, float] = field(default_factory=dict)
    pinned: bool = False
    sequence: int = 0
    signature: bytes = b""
    signing_key_id: str = ""
    #: 0 on a promoted release; n >= 1 on a candidate of rollout phase n.
    phase: int = 0
    #: Candidates: the cohort bound (devices whose protos.cohort position is below it).
    cohort_ppm: int = 0
    #: Candidates: one of CANDIDATE_ACTIONS.
    action: str = ""
    #: Candidates: the fleet's promoted version (compared against, returned to on revert).
    served_version: int = 0

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_sha256)

    @property
    def candidate(self) -> bool:
        """Whether this is a staged rollout's candidate (not a promoted release)."""
        return self.phase > 0


#: What a candidate asks its cohort to do (``Manifest.action``).
CANDIDATE_ACTIONS = ("check", "serve", "revert", "halt")


def manifest_to_proto(m: Manifest) -> release_pb2.ReleaseManifest:
    return release_pb2.ReleaseManifest(
        fleet=m.fleet,
        version=m.version,
        parent_version=m.parent_version,
        round=m.round,
        created_at_ms=m.created_at_ms,
        architecture_id=m.architecture_id,
        artifact_sha256=m.artifact_sha256,
        artifact_size=m.artifact_size,
        chunking=release_pb2.Chunking(
            chunk_size=m.chunk_size,
            chunk_count=m.chunk_count,
            chunk_sha256=list(m.chunk_sha256),
        ),
        metrics=dict(m.metrics),
        signature=m.signature,
        signing_key_id=m.signing_key_id,
        pinned=m.pinned,
        sequence=m.sequence,
        phase=m.phase,
        cohort_ppm=m.cohort_ppm,
        action=m.action,
        served_version=m.served_version,
    )


def manifest_to_bytes(m: Manifest) -> bytes:
    return manifest_to_proto(m).SerializeToString(deterministic=True)


def manifest_from_bytes(data: bytes, *, max_chunks: int = 1 << 16) -> Manifest:
    """Parse and validate a manifest received from the network.

    Raises :class:`ManifestError` naming every problem found (not only the first).
    Signature verification is not done here (see :mod:`protos.signing`).
    """
    msg = release_pb2.ReleaseManifest()
    try:
        msg.ParseFromString(data)
    except Exception as exc:
        raise ManifestError(f"manifest is not a valid protobuf: {exc}") from exc
    problems: list[str] = []
    if not msg.fleet:
        problems.append("fleet is empty")
    if msg.version <= 0:
        problems.append(f"version must be positive, got {msg.version}")
    if msg.parent_version < 0 or (msg.version > 0 and msg.parent_version >= msg.version):
        problems.append(
            f"parent_version {msg.parent_version} must be ≥ 0 and below version {msg.version}"
        )
    if msg.round < 0:
        problems.append(f"round must be ≥ 0, got {msg.round}")
    if msg.created_at_ms <= 0:
        problems.append("created_at_ms is missing")
    if not msg.architecture_id:
        problems.append("architecture_id is empty")
    if not _is_sha256_hex(msg.artifact_sha256):
        problems.append("artifact_sha256 is not 64 lower-case hex digits")
    if msg.artifact_size <= 0:
        problems.append(f"artifact_size must be positive, got {msg.artifact_size}")
    ch = msg.chunking
    if ch.chunk_size <= 0:
        problems.append(f"chunking.chunk_size must be positive, got {ch.chunk_size}")
    if ch.chunk_count != len(ch.chunk_sha256):
        problems.append(
            f"chunking.chunk_count {ch.chunk_count} differs from {len(ch.chunk_sha256)} digests"
        )
    if len(ch.chunk_sha256) == 0 or len(ch.chunk_sha256) > max_chunks:
        problems.append(f"chunk count {len(ch.chunk_sha256)} is not within 1..{max_chunks}")
    if any(not _is_sha256_hex(d) for d in ch.chunk_sha256):
        problems.append("a chunk digest is not 64 lower-case hex digits")
    if ch.chunk_size > 0 and msg.artifact_size > 0 and len(ch.chunk_sha256) > 0:
        expected_chunks = -(-msg.artifact_size // ch.chunk_size)
        if expected_chunks != len(ch.chunk_sha256):
            problems.append(
                f"{msg.artifact_size} bytes in chunks of {ch.chunk_size} make "
                f"{expected_chunks} chunks, not {len(ch.chunk_sha256)}"
            )
    bad_metrics = [k for k, v in msg.metrics.items() if not math.isfinite(v)]
    if bad_metrics:
        problems.append(f"metrics not finite: {', '.join(sorted(bad_metrics))}")
    if msg.sequence < 0:
        problems.append(f"sequence must be ≥ 0, got {msg.sequence}")
    if msg.phase < 0:
        problems.append(f"phase must be ≥ 0, got {msg.phase}")
    elif msg.phase == 0 and (msg.cohort_ppm or msg.action or msg.served_version):
        problems.append("a promoted release (phase 0) carries no cohort, action or served_version")
    elif msg.phase > 0:
        if not 0 < msg.cohort_ppm <= 1_000_000:
            problems.append(f"cohort_ppm must be in 1..1000000, got {msg.cohort_ppm}")
        if msg.action not in CANDIDATE_ACTIONS:
            problems.append(f"action {msg.action!r} is not one of {', '.join(CANDIDATE_ACTIONS)}")
        if msg.pinned:
            problems.append("a candidate cannot be pinned")
        if not 0 <= msg.served_version < msg.version:
            problems.append(
                f"served_version {msg.served_version} must be ≥ 0 and below version {msg.version}"
            )
    if problems:
        raise ManifestError("invalid release manifest: " + "; ".join(problems))
    return Manifest(
        fleet=msg.fleet,
        version=msg.version,
        parent_version=msg.parent_version,
        round=msg.round,
        created_at_ms=msg.created_at_ms,
        architecture_id=msg.architecture_id,
        artifact_sha256=msg.artifact_sha256,
        artifact_size=msg.artifact_size,
        chunk_size=ch.chunk_size,
        chunk_sha256=tuple(ch.chunk_sha256),
        metrics=dict(msg.metrics),
        pinned=msg.pinned,
        sequence=msg.sequence,
        signature=msg.signature,
        signing_key_id=msg.signing_key_id,
        phase=msg.phase,
        cohort_ppm=msg.cohort_ppm,
        action=msg.action,
        served_version=msg.served_version,
    )


#: First line of the signed form; a new layout gets a new prefix.
SIGNED_FORM_PREFIX = b"edgefl.release-manifest.v2\n"
#: First line of a candidate's signed form (a staged rollout's phase, ``phase`` ≥ 1).
CANDIDATE_FORM_PREFIX = b"edgefl.release-candidate.v1\n"

#: How the signed bytes are built, in Markdown (docs/reference.md renders it).
SIGNED_FORM_DOC = """\
A release manifest's Ed25519 signature (RFC 8032, pure Ed25519, no pre-hash) covers
these bytes, never the protobuf encoding. They hold no floating-point text, so any
language can rebuild them from the manifest's values:

1. the line `edgefl.release-manifest.v2`;
2. one line `name=value` per field below, in this order: `fleet`, `version`,
   `parent_version`, `round`, `created_at_ms`, `architecture_id`, `artifact_sha256`,
   `artifact_size`, `chunk_size`, `chunk_count`, then one `chunk_sha256=` line per chunk
   in chunk order, `metric_count`, then one `metric=` line per metric in the byte order
   of the metric names' UTF-8, then `pinned` and `sequence`.

Every line ends with a single line feed (0x0a), the last one included; nothing else
separates or surrounds them. Values are written as:

| kind | fields | written as |
|---|---|---|
| integer | `version`, `parent_version`, `round`, `created_at_ms`, `artifact_size`, `chunk_size`, `chunk_count`, `metric_count`, `sequence` | ASCII decimal, no sign for values ≥ 0, no leading zeros (`0` for zero) |
| string | `fleet`, `architecture_id` | its UTF-8 byte length in decimal, `:`, then the UTF-8 bytes (`4:demo`) |
| digest | `artifact_sha256`, each `chunk_sha256` | 64 lower-case hex digits |
| boolean | `pinned` | `true` or `false` |
| metric | each `metric` | the name as a string (length, `:`, bytes), one space, then the 16 lower-case hex digits of the value's IEEE 754 binary64 bit pattern, most significant byte first (0.5 → `3fe0000000000000`) |

`signature` and `signing_key_id` are not part of the signed bytes. `signing_key_id` is
the first 16 hex digits of the SHA-256 of the raw 32-byte public key.

A *candidate* (`phase` ≥ 1, staged rollouts) is signed over the same lines with the first
line `edgefl.release-candidate.v1` instead, followed after `sequence` by four more lines:
`phase`, `cohort_ppm`, `served_version` (integers) and `action` (a string). The different
first line means a candidate's signature can never pass as a promoted release's, and a
promoted release (`phase` 0) keeps exactly the `v2` bytes above, so devices that predate
candidates verify it unchanged.
"""


def _signed_str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return str(len(raw)).encode("ascii") + b":" + raw


def manifest_signing_bytes(m: Manifest) -> bytes:
    """The bytes a manifest's signature covers (the layout is :data:`SIGNED_FORM_DOC`).

    Signature fields are ignored. Strings are length-prefixed, so no character in an
    architecture id or metric name can forge a line; metric values are their IEEE 754
    bit patterns in hex, so no float formatting is involved.
    """
    lines: list[bytes] = [
        b"fleet=" + _signed_str(m.fleet),
        b"version=%d" % m.version,
        b"parent_version=%d" % m.parent_version,
        b"round=%d" % m.round,
        b"created_at_ms=%d" % m.created_at_ms,
        b"architecture_id=" + _signed_str(m.architecture_id),
        b"artifact_sha256=" + m.artifact_sha256.encode("ascii"),
        b"artifact_size=%d" % m.artifact_size,
        b"chunk_size=%d" % m.chunk_size,
        b"chunk_count=%d" % len(m.chunk_sha256),
        *(b"chunk_sha256=" + digest.encode("ascii") for digest in m.chunk_sha256),
        b"metric_count=%d" % len(m.metrics),
    ]
    for name in sorted(m.metrics, key=lambda k: k.encode("utf-8")):
        bits = struct.pack(">d", float(m.metrics[name])).hex()
        lines.append(b"metric=" + _signed_str(name) + b" " + bits.encode("ascii"))
    lines += [b"pinned=" + (b"true" if m.pinned else b"false"), b"sequence=%d" % m.sequence]
    if m.phase <= 0:
        return SIGNED_FORM_PREFIX + b"".join(line + b"\n" for line in lines)
    lines += [
        b"phase=%d" % m.phase,
        b"cohort_ppm=%d" % m.cohort_ppm,
        b"served_version=%d" % m.served_version,
        b"action=" + _signed_str(m.action),
    ]
    return CANDIDATE_FORM_PREFIX + b"".join(line + b"\n" for line in lines)


def split_chunks(data: bytes, chunk_size: int) -> list[bytes]:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]


# --- device status ---------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceStatus:
    device_id: str
    fleet: str
    serving_version: int
    state: str  # SERVING, TRAINING, UPDATING, DEGRADED, OFFLINE
    timestamp_ms: int
    last_round_trained: int = 0
    sample_count: int = 0
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    disk_free_bytes: int = 0
    memory_available_bytes: int = 0
    profile: str = ""
    last_error: str = ""
    last_metrics: dict[str, float] = field(default_factory=dict)
    edgefl_version: str = ""


DEVICE_STATES = ("SERVING", "TRAINING", "UPDATING", "DEGRADED", "OFFLINE")


def status_to_bytes(s: DeviceStatus) -> bytes:
    if s.state not in DEVICE_STATES:
        raise StatusError(f"unknown device state {s.state!r}")
    msg = status_pb2.DeviceStatus(
        device_id=s.device_id,
        fleet=s.fleet,
        serving_version=s.serving_version,
        state=status_pb2.DeviceState.Value(s.state),
        last_round_trained=s.last_round_trained,
        sample_count=s.sample_count,
        resources=status_pb2.ResourceUsage(
            cpu_percent=s.cpu_percent,
            rss_bytes=s.rss_bytes,
            disk_free_bytes=s.disk_free_bytes,
            memory_available_bytes=s.memory_available_bytes,
        ),
        timestamp_ms=s.timestamp_ms,
        profile=s.profile,
        last_error=s.last_error,
        last_metrics=dict(s.last_metrics),
        edgefl_version=s.edgefl_version,
    )
    return msg.SerializeToString(deterministic=True)


#: Wire number → name of the device states a status may carry (not UNSPECIFIED).
_STATE_NAMES: dict[int, str] = {
    number: name
    for name, number in status_pb2.DeviceState.items()
    if number != status_pb2.DEVICE_STATE_UNSPECIFIED
}


def status_from_bytes(data: bytes) -> DeviceStatus:
    """Decode and check a status. The cloud decodes ~2,000 a second from 10,000 devices
    (#18): each field is read once, and the state's name comes from a dict (protobuf's
    ``DeviceState.values()`` builds a list per call, ``Name()`` another lookup)."""
    msg = status_pb2.DeviceStatus()
    try:
        msg.ParseFromString(data)
    except Exception as exc:
        raise StatusError(f"device status is not a valid protobuf: {exc}") from exc
    device_id = msg.device_id
    serving_version = msg.serving_version
    state = _STATE_NAMES.get(msg.state)
    if not device_id or state is None or serving_version < 0:
        problems = []
        if not device_id:
            problems.append("device_id is empty")
        if state is None:
            problems.append(f"state {msg.state} is not a known device state")
        if serving_version < 0:
            problems.append("serving_version is negative")
        raise StatusError("invalid device status: " + "; ".join(problems))
    resources = msg.resources
    metrics = msg.last_metrics
    return DeviceStatus(
        device_id=device_id,
        fleet=msg.fleet,
        serving_version=serving_version,
        state=state,
        timestamp_ms=msg.timestamp_ms,
        last_round_trained=msg.last_round_trained,
        sample_count=msg.sample_count,
        cpu_percent=resources.cpu_percent,
        rss_bytes=resources.rss_bytes,
        disk_free_bytes=resources.disk_free_bytes,
        memory_available_bytes=resources.memory_available_bytes,
        profile=msg.profile,
        last_error=msg.last_error,
        last_metrics=dict(metrics) if metrics else {},
        edgefl_version=msg.edgefl_version,
    )


@dataclass(frozen=True)
class DeviceEvent:
    device_id: str
    timestamp_ms: int
    kind: str
    detail: str = ""
    version: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def event_to_bytes(e: DeviceEvent) -> bytes:
    return status_pb2.DeviceEvent(
        device_id=e.device_id,
        timestamp_ms=e.timestamp_ms,
        kind=e.kind,
        detail=e.detail,
        version=e.version,
        metrics=dict(e.metrics),
    ).SerializeToString(deterministic=True)


def event_from_bytes(data: bytes) -> DeviceEvent:
    msg = status_pb2.DeviceEvent()
    try:
        msg.ParseFromString(data)
    except Exception as exc:
        raise StatusError(f"device event is not a valid protobuf: {exc}") from exc
    if not msg.device_id or not msg.kind:
        raise StatusError("device event needs device_id and kind")
    metrics = {k: v for k, v in msg.metrics.items() if math.isfinite(v)}
    return DeviceEvent(msg.device_id, msg.timestamp_ms, msg.kind, msg.detail, msg.version, metrics)
