"""Versioned, crash-safe on-disk store of model packages (release artifacts).

Layout under ``root``::

    v00000007-<sha256>.pkg   one file per stored version, named by version and digest
    current                  "7 <sha256>\\n": the version to serve
    state.json               small node state (last release sequence, last round trained)

Every write goes to a temporary file in the same directory, is fsynced, renamed over
its target and the directory is fsynced: after a crash (power loss, SIGKILL) a file is
either the old one or the new one, never half of each. A package file is complete
before ``current`` may name it, so ``current`` always points at a complete version.
Leftover temporary files are removed when the store is opened.

Digests are checked before anything is written (:meth:`ModelStore.install`) and again
whenever a version is read; a version that no longer verifies is moved aside as
``*.corrupt`` and :meth:`ModelStore.current` falls back to the newest good version.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.errors import DigestMismatch, InstallError, ModelNotFound, StoreCorrupt, StoreError
from protos.codec import ModelPackage, package_from_bytes, sha256_hex

logger = logging.getLogger(__name__)

CURRENT_FILE = "current"
STATE_FILE = "state.json"
_TMP_PREFIX = ".tmp-"
_PKG_RE = re.compile(r"^v(\d{8,})-([0-9a-f]{64})\.pkg$")


@dataclass(frozen=True)
class StoredModel:
    """One verified stored version: its number, digest, file and bytes."""

    version: int
    sha256: str
    path: Path
    data: bytes

    def package(self) -> ModelPackage:
        """Decode the bytes (raises :class:`protos.errors.PackageError` if malformed)."""
        return package_from_bytes(self.data)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file.

    Temp file in the same directory, fsync, rename, fsync the directory. On error the
    temp file is removed and the ``OSError`` propagates.
    """
    tmp = path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}-{path.name}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


class ModelStore:
    """The versions a device has received; one of them is ``current``.

    Safe to use from several threads of one process; one process per ``root``.
    """

    def __init__(self, root: Path, keep: int = 3) -> None:
        """Open (creating if needed) the store at ``root``; keep ``keep`` versions besides current."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self._lock = threading.RLock()
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(f"{_TMP_PREFIX}*"):
            logger.info("removing leftover temporary file %s", leftover.name)
            with contextlib.suppress(OSError):
                leftover.unlink()

    # -- reading ------------------------------------------------------------------------
    def _files(self) -> dict[int, tuple[str, Path]]:
        out: dict[int, tuple[str, Path]] = {}
        for path in self.root.iterdir():
            match = _PKG_RE.match(path.name)
            if match:
                out[int(match.group(1))] = (match.group(2), path)
        return out

    def disk_bytes(self) -> int:
        """Bytes the store's files take (packages, pointer, state, leftovers)."""
        total = 0
        for path in self.root.iterdir():
            with contextlib.suppress(OSError):  # removed meanwhile
                if path.is_file():
                    total += path.stat().st_size
        return total

    def versions(self) -> list[int]:
        """Stored version numbers, ascending."""
        with self._lock:
            return sorted(self._files())

    def _load(self, version: int, sha256: str, path: Path) -> StoredModel:
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise ModelNotFound(f"model version {version} is not stored") from exc
        except OSError as exc:
            raise StoreError(f"cannot read version {version}: {exc}") from exc
        actual = sha256_hex(data)
        if actual != sha256:
            raise StoreCorrupt(
                f"stored version {version} has digest {actual[:12]}…, expected {sha256[:12]}…"
            )
        return StoredModel(version, sha256, path, data)

    def get(self, version: int) -> StoredModel:
        """The stored, digest-verified ``version``; :class:`ModelNotFound` or :class:`StoreCorrupt`."""
        with self._lock:
            entry = self._files().get(version)
            if entry is None:
                raise ModelNotFound(f"model version {version} is not stored")
            return self._load(version, entry[0], entry[1])

    def _read_pointer(self) -> tuple[int, str] | None:
        try:
            text = (self.root / CURRENT_FILE).read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreCorrupt(f"cannot read the current pointer: {exc}") from exc
        parts = text.split()
        if len(parts) != 2 or not parts[0].isdigit() or not re.fullmatch(r"[0-9a-f]{64}", parts[1]):
            raise StoreCorrupt(f"current pointer is malformed: {text[:80]!r}")
        return int(parts[0]), parts[1]

    def current_version(self) -> int | None:
        """The version the pointer names (not verified), or ``None``."""
        with self._lock:
            try:
                pointer = self._read_pointer()
            except StoreCorrupt:
                return None
            return None if pointer is None else pointer[0]

    def current(self) -> StoredModel | None:
        """The current version, digest-verified; ``None`` when nothing is installed.

        When the current version is missing or corrupt, the newest other version that
        verifies becomes current (logged at ERROR); the corrupt file is moved aside.
        """
        with self._lock:
            bad: int | None = None
            try:
                pointer = self._read_pointer()
            except StoreCorrupt as exc:
                logger.error("model store %s: %s", self.root, exc)
                pointer = None
                bad = -1
            if pointer is not None:
                version, sha = pointer
                try:
                    return self._load(version, sha, self._path(version, sha))
                except (StoreCorrupt, ModelNotFound) as exc:
                    logger.error("model store %s: current version unusable: %s", self.root, exc)
                    self._quarantine(version, sha)
                    bad = version
            if bad is None:
                return None
            return self._fall_back(exclude=bad)

    def _fall_back(self, exclude: int) -> StoredModel | None:
        for version, (sha, path) in sorted(self._files().items(), reverse=True):
            if version == exclude:
                continue
            try:
                good = self._load(version, sha, path)
            except (StoreCorrupt, ModelNotFound) as exc:
                logger.error("model store %s: %s", self.root, exc)
                self._quarantine(version, sha)
                continue
            logger.error("model store %s: falling back to version %d", self.root, version)
            self._write_pointer(version, sha)
            return good
        logger.error("model store %s: no stored version verifies", self.root)
        return None

    def _quarantine(self, version: int, sha: str) -> None:
        path = self._path(version, sha)
        with contextlib.suppress(OSError):
            os.replace(path, path.with_name(path.name + ".corrupt"))

    def _path(self, version: int, sha256: str) -> Path:
        return self.root / f"v{version:08d}-{sha256}.pkg"

    # -- writing ------------------------------------------------------------------------
    def _write_pointer(self, version: int, sha256: str) -> None:
        atomic_write(self.root / CURRENT_FILE, f"{version} {sha256}\n".encode("ascii"))

    def install(self, version: int, data: bytes, sha256: str) -> StoredModel:
        """Verify, store and make ``version`` current; returns it.

        Raises :class:`DigestMismatch` (nothing written) when ``data`` does not hash to
        ``sha256``; :class:`InstallError` when the version is stored with other bytes or
        the disk fails (full disk included): the store is then unchanged.
        """
        return self._store(version, data, sha256, make_current=True)

    def stage(self, version: int, data: bytes, sha256: str) -> StoredModel:
        """Store ``version`` beside the current one without making it current (a candidate).

        Same checks and errors as :meth:`install`; the ``current`` pointer is untouched,
        so a restart keeps serving what it served. :meth:`activate` serves it later.
        """
        return self._store(version, data, sha256, make_current=False)

    def _store(self, version: int, data: bytes, sha256: str, *, make_current: bool) -> StoredModel:
        if version < 1:
            raise InstallError(f"version must be >= 1, got {version}")
        actual = sha256_hex(data)
        if actual != sha256.lower():
            raise DigestMismatch(
                f"package for version {version} hashes to {actual[:12]}…, announced {sha256[:12]}…"
            )
        with self._lock:
            existing = self._files().get(version)
            if existing is not None and existing[0] != actual:
                raise InstallError(
                    f"version {version} is already stored with another digest ({existing[0][:12]}…)"
                )
            path = self._path(version, actual)
            try:
                if existing is None:
                    atomic_write(path, data)
                if make_current:
                    self._write_pointer(version, actual)
            except OSError as exc:
                if existing is None:
                    with contextlib.suppress(OSError):
                        path.unlink()
                reason = "disk full" if exc.errno == errno.ENOSPC else str(exc)
                raise InstallError(f"cannot store version {version}: {reason}") from exc
            if make_current:
                logger.info("model store %s: installed version %d", self.root, version)
                self._collect_garbage(version)
            else:
                logger.info("model store %s: staged version %d", self.root, version)
                current = self.current_version()
                if current is not None:
                    self._collect_garbage(current, also_keep=version)
            return StoredModel(version, actual, path, bytes(data))

    def has(self, version: int, sha256: str) -> bool:
        """Whether ``version`` is stored with digest ``sha256`` (file name only, not re-hashed)."""
        with self._lock:
            entry = self._files().get(version)
            return entry is not None and entry[0] == sha256.lower()

    def activate(self, version: int) -> StoredModel:
        """Make the stored ``version`` current (pin or roll back); verifies it first."""
        with self._lock:
            stored = self.get(version)
            try:
                self._write_pointer(version, stored.sha256)
            except OSError as exc:
                raise StoreError(f"cannot activate version {version}: {exc}") from exc
            logger.info("model store %s: activated version %d", self.root, version)
            return stored

    def rollback(self) -> StoredModel:
        """Activate the newest stored version below the current one."""
        with self._lock:
            current = self.current_version()
            older = [v for v in self.versions() if current is None or v < current]
            if not older:
                raise ModelNotFound(f"no stored version older than {current} to roll back to")
            return self.activate(older[-1])

    def _collect_garbage(self, current: int, also_keep: int | None = None) -> None:
        others = sorted((v for v in self._files() if v not in (current, also_keep)), reverse=True)
        for version in others[self.keep :]:
            _sha, path = self._files()[version]
            try:
                path.unlink()
                logger.debug("model store %s: removed version %d", self.root, version)
            except OSError as exc:
                logger.warning("cannot remove old version %d: %s", version, exc)

    # -- node state ---------------------------------------------------------------------
    def read_state(self) -> dict[str, Any]:
        """The persisted node state (empty dict when none was written or it is unreadable)."""
        with self._lock:
            try:
                state = json.loads((self.root / STATE_FILE).read_text(encoding="utf-8"))
            except FileNotFoundError:
                return {}
            except (OSError, ValueError) as exc:
                logger.error("model store %s: node state unreadable, ignored: %s", self.root, exc)
                return {}
            return state if isinstance(state, dict) else {}

    def write_state(self, state: dict[str, Any]) -> None:
        """Replace the node state atomically (JSON)."""
        body = json.dumps(state, sort_keys=True, indent=1).encode("utf-8")
        with self._lock:
            try:
                atomic_write(self.root / STATE_FILE, body)
            except OSError as exc:
                raise StoreError(f"cannot write node state: {exc}") from exc
