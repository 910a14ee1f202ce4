"""The labelled samples a device trains on, kept on disk in a crash-safe record log.

File ``samples.log`` under the store's directory is a sequence of records::

    b"EFS1" | payload length (u32 LE) | CRC-32 of payload (u32 LE) | payload
    payload = n (u32) | rank (u32) | rank * dim (u32) | x: n*prod(dims) float32 LE | y: n int32 LE

An append writes one record and fsyncs before it returns, so an acknowledged sample
survives a crash. A crash in the middle of an append leaves a torn last record: on
load, reading stops at the first record that is short, has a bad magic or a bad CRC,
and the file is truncated back to the last good record (logged). So after a SIGKILL
the store holds every acknowledged batch and no partial one.

**Eviction policy: oldest first.** When an append would exceed the limit, the oldest
samples are dropped and the log is rewritten with the survivors (temp file, fsync,
rename), which also compacts it. :meth:`LocalData.clear` and
:meth:`LocalData.load_partition` replace the log the same way.

**The limit** is ``capacity`` samples, and with a disk budget (``max_bytes``, from
``[data] max_mb``) also what fits in the budget once the model store's files
(``reserved_bytes()``) are counted: the data directory holds models and samples, and
samples give way, because a device cannot serve without its model. The budget is
checked at every append against the log's real size (a log of many small records is
compacted when the next one would not fit), so ``samples.log`` plus the model files
stay within it. When the model files alone leave no room for one sample, an append
is refused with :class:`~edge.errors.NoRoomForSamples` and nothing stored changes
(opening the store then keeps what it holds, too); a new, bigger model shrinks the
room, and the next append evicts down to it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import DataError, InvalidInput, ModelNotLoaded, NoRoomForSamples
from edge.model_store import atomic_write

logger = logging.getLogger(__name__)

LOG_FILE = "samples.log"
EVICTION_POLICY = "oldest-first"
_MAGIC = b"EFS1"
_HEADER = struct.Struct("<4sII")
_MAX_RECORD = 1 << 30


@dataclass(frozen=True)
class SampleSpec:
    """What a valid sample looks like: the model's example shape and class count."""

    input_shape: tuple[int, ...]
    classes: int


@dataclass(frozen=True)
class AppendResult:
    """Outcome of one append."""

    accepted: int
    evicted: int
    total: int


@dataclass(frozen=True)
class DataStats:
    """Count, capacity and label histogram of the stored samples."""

    count: int
    capacity: int
    """Most samples kept now: ``capacity``, or fewer where the disk budget binds."""
    label_counts: dict[int, int]
    input_shape: tuple[int, ...]
    eviction_policy: str = EVICTION_POLICY


def _encode(x: np.ndarray, y: np.ndarray) -> bytes:
    dims = x.shape[1:]
    payload = b"".join(
        (
            struct.pack(f"<II{len(dims)}I", x.shape[0], len(dims), *dims),
            np.ascontiguousarray(x, dtype="<f4").tobytes(),
            np.ascontiguousarray(y, dtype="<i4").tobytes(),
        )
    )
    return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _record_overhead(rank: int) -> int:
    """Bytes of one record besides its samples: header, count, rank and dims."""
    return _HEADER.size + 8 + 4 * rank


def _sample_bytes(example_shape: tuple[int, ...]) -> int:
    """Bytes one sample takes in a record: float32 values and an int32 label."""
    return 4 * math.prod(example_shape) + 4


def _decode(payload: bytes) -> tuple[np.ndarray, np.ndarray]:
    n, rank = struct.unpack_from("<II", payload, 0)
    dims = struct.unpack_from(f"<{rank}I", payload, 8)
    offset = 8 + 4 * rank
    x_bytes = n * math.prod(dims) * 4
    if offset + x_bytes + 4 * n != len(payload):
        raise ValueError("record length does not match its shape")
    x = np.frombuffer(payload, dtype="<f4", count=n * math.prod(dims), offset=offset)
    y = np.frombuffer(payload, dtype="<i4", count=n, offset=offset + x_bytes)
    return x.reshape((n, *dims)).astype(np.float32), y.astype(np.int32)


def read_log(path: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, int]:
    """(records, length of the valid prefix, file length) of a sample log."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0, 0
    records: list[tuple[np.ndarray, np.ndarray]] = []
    offset = 0
    shape: tuple[int, ...] | None = None
    while offset + _HEADER.size <= len(data):
        magic, length, crc = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + length
        if magic != _MAGIC or length > _MAX_RECORD or end > len(data):
            break
        payload = data[offset + _HEADER.size : end]
        if zlib.crc32(payload) != crc:
            break
        try:
            x, y = _decode(payload)
        except (struct.error, ValueError):
            break
        if shape is not None and x.shape[1:] != shape:
            break
        shape = x.shape[1:]
        records.append((x, y))
        offset = end
    return records, offset, len(data)


class LocalData:
    """Append-only, capacity-capped sample store persisted under ``root``. Thread-safe."""

    def __init__(
        self,
        root: Path,
        capacity: int = 5000,
        spec: SampleSpec | None = None,
        *,
        max_bytes: int = 0,
        reserved_bytes: Callable[[], int] | None = None,
    ) -> None:
        """Open (creating) the store and load what survived; ``spec`` validates appends.

        ``max_bytes`` > 0 is a disk budget shared with whatever ``reserved_bytes()``
        reports in use (the model store); see the module docstring.
        """
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.root = Path(root)
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._reserved = reserved_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._path = self.root / LOG_FILE
        self._lock = threading.Lock()
        self._spec: SampleSpec | None = None
        records, good, size = read_log(self._path)
        if good < size:
            logger.warning(
                "sample log %s: ignoring %d bytes of a torn or corrupt tail",
                self._path,
                size - good,
            )
            try:
                with open(self._path, "r+b") as fh:
                    fh.truncate(good)
                    os.fsync(fh.fileno())
            except OSError as exc:
                raise DataError(f"cannot repair {self._path}: {exc}") from exc
        if records:
            self._x = np.concatenate([r[0] for r in records])
            self._y = np.concatenate([r[1] for r in records])
        else:
            self._x = np.zeros((0,), dtype=np.float32)
            self._y = np.zeros((0,), dtype=np.int32)
        limit = self._limit(self._x.shape[1:], self._budget()) if len(self) else capacity
        if limit == 0:
            # Not on open: a budget the models alone exceed refuses appends, but
            # wiping every stored sample at start would be out of all proportion.
            logger.error(
                "sample store %s: [data] max_mb leaves no room for samples; keeping the %d "
                "stored, refusing appends",
                self.root,
                len(self),
            )
        elif self._x.shape[0] > limit:
            logger.warning(
                "sample store %s: keeping the newest %d of %d samples (limit)",
                self.root,
                limit,
                self._x.shape[0],
            )
            self._x, self._y = self._x[len(self) - limit :], self._y[len(self) - limit :]
            self._rewrite()
        if spec is not None:
            self.set_spec(spec)
        logger.debug("sample store %s: %d samples", self.root, len(self))

    def __len__(self) -> int:
        return int(self._y.shape[0])

    def _budget(self) -> int | None:
        """Bytes ``samples.log`` may take now; ``None`` without a disk budget."""
        if self.max_bytes <= 0:
            return None
        reserved = self._reserved() if self._reserved is not None else 0
        return self.max_bytes - reserved

    def _limit(self, example_shape: tuple[int, ...], budget: int | None) -> int:
        """Most samples of ``example_shape`` kept within ``budget`` (see the module docstring)."""
        if budget is None:
            return self.capacity
        fits = (budget - _record_overhead(len(example_shape))) // _sample_bytes(example_shape)
        return max(0, min(self.capacity, fits))

    def _room(self, example_shape: tuple[int, ...]) -> tuple[int, int | None]:
        """(limit, budget) for a write of ``example_shape`` samples (the model store is
        measured once); :class:`NoRoomForSamples` when not one sample fits."""
        budget = self._budget()
        limit = self._limit(example_shape, budget)
        if limit < 1:
            assert budget is not None  # without a budget the limit is capacity >= 1
            raise NoRoomForSamples(
                f"no room for samples: the disk budget is {self.max_bytes / 2**20:.2f} MiB "
                f"([data] max_mb) and the model files use {(self.max_bytes - budget) / 2**20:.2f} "
                "MiB of it"
            )
        return limit, budget

    @property
    def spec(self) -> SampleSpec | None:
        """The sample shape and class count appends are checked against."""
        return self._spec

    def set_spec(self, spec: SampleSpec) -> None:
        """Check future appends against ``spec``; :class:`DataError` if stored samples differ."""
        with self._lock:
            if len(self) and tuple(self._x.shape[1:]) != tuple(spec.input_shape):
                raise DataError(
                    f"stored samples have shape {list(self._x.shape[1:])}, the model expects "
                    f"{list(spec.input_shape)}; clear the store"
                )
            self._spec = spec

    # -- validation ---------------------------------------------------------------------
    def _validate(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        spec = self._spec
        if spec is None:
            raise ModelNotLoaded("no model is loaded, so samples cannot be validated yet")
        problems: list[str] = []
        if x.dtype != np.float32:
            problems.append(f"x must be float32, got {x.dtype}")
        expected = ("n", *spec.input_shape)
        if x.ndim != len(spec.input_shape) + 1 or tuple(x.shape[1:]) != spec.input_shape:
            problems.append(f"x must have shape {list(expected)}, got {list(x.shape)}")
        if not np.issubdtype(y.dtype, np.integer):
            problems.append(f"y must hold integer labels, got {y.dtype}")
        if y.ndim != 1:
            problems.append(f"y must have shape [n], got {list(y.shape)}")
        elif x.ndim >= 1 and y.shape[0] != x.shape[0]:
            problems.append(f"x holds {x.shape[0]} samples but y {y.shape[0]} labels")
        if x.ndim >= 1 and x.shape[0] == 0:
            problems.append("no samples given")
        if not problems:
            if not np.all(np.isfinite(x)):
                problems.append("x holds NaN or infinite values")
            if y.size and (int(y.min()) < 0 or int(y.max()) >= spec.classes):
                problems.append(
                    f"labels must lie in [0, {spec.classes}), got {int(y.min())}..{int(y.max())}"
                )
        if problems:
            raise InvalidInput("invalid samples: " + "; ".join(problems))
        return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int32)

    # -- mutation -----------------------------------------------------------------------
    def append(self, x: np.ndarray, y: np.ndarray) -> AppendResult:
        """Validate and persist a batch; evicts the oldest samples beyond the limit."""
        xs, ys = self._validate(np.asarray(x), np.asarray(y))
        with self._lock:
            n = ys.shape[0]
            limit, budget = self._room(xs.shape[1:])
            new_x = xs if len(self) == 0 else np.concatenate([self._x, xs])
            new_y = ys if len(self) == 0 else np.concatenate([self._y, ys])
            evicted = max(0, new_y.shape[0] - limit)
            # Rewriting drops the evicted samples and also compacts the log, whose
            # per-record headers could otherwise outgrow the budget.
            if evicted or not self._record_fits(xs, budget):
                new_x, new_y = new_x[evicted:], new_y[evicted:]
                old = (self._x, self._y)
                self._x, self._y = new_x, new_y
                try:
                    self._rewrite()
                except DataError:
                    self._x, self._y = old
                    raise
            else:
                self._append_record(xs, ys)
                self._x, self._y = new_x, new_y
            logger.debug("appended %d samples (%d evicted, %d total)", n, evicted, len(self))
            return AppendResult(accepted=n, evicted=evicted, total=len(self))

    def _record_fits(self, xs: np.ndarray, budget: int | None) -> bool:
        """Whether appending ``xs`` as one more record keeps the log within ``budget``."""
        if budget is None:
            return True
        try:
            size = self._path.stat().st_size
        except FileNotFoundError:
            size = 0
        return (
            size + _record_overhead(xs.ndim - 1) + len(xs) * _sample_bytes(xs.shape[1:]) <= budget
        )

    def _append_record(self, x: np.ndarray, y: np.ndarray) -> None:
        record = _encode(x, y)
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise DataError(f"cannot open {self._path}: {exc}") from exc
        size = os.fstat(fd).st_size
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise DataError(f"cannot append to {self._path}: {exc}") from exc
        finally:
            os.close(fd)

    def _rewrite(self) -> None:
        body = _encode(self._x, self._y) if len(self) else b""
        try:
            atomic_write(self._path, body)
        except OSError as exc:
            raise DataError(f"cannot rewrite {self._path}: {exc}") from exc

    def clear(self) -> int:
        """Remove every sample; returns how many were removed."""
        with self._lock:
            removed = len(self)
            self._x = np.zeros((0,), dtype=np.float32)
            self._y = np.zeros((0,), dtype=np.int32)
            self._rewrite()
            logger.info("sample store %s: cleared %d samples", self.root, removed)
            return removed

    def load_partition(self, x: np.ndarray, y: np.ndarray) -> AppendResult:
        """Replace the contents with ``(x, y)`` (emulated devices); the newest that fit
        the limit are kept."""
        xs, ys = self._validate(np.asarray(x), np.asarray(y))
        with self._lock:
            limit, _ = self._room(xs.shape[1:])
            evicted = max(0, ys.shape[0] - limit)
            self._x, self._y = xs[evicted:], ys[evicted:]
            self._rewrite()
            return AppendResult(accepted=int(ys.shape[0]), evicted=evicted, total=len(self))

    # -- reading ------------------------------------------------------------------------
    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of all samples ``(x, y)`` in arrival order (oldest first)."""
        with self._lock:
            return self._x.copy(), self._y.copy()

    def stats(self) -> DataStats:
        """Count, capacity, label histogram and sample shape."""
        with self._lock:
            labels, counts = np.unique(self._y, return_counts=True)
            shape = (
                tuple(int(d) for d in self._x.shape[1:])
                if len(self)
                else (self._spec.input_shape if self._spec else ())
            )
            return DataStats(
                count=len(self),
                capacity=self._limit(shape, self._budget()) if shape else self.capacity,
                label_counts={int(k): int(v) for k, v in zip(labels, counts, strict=True)},
                input_shape=shape,
            )
