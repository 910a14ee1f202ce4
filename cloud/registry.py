"""The model registry: runs, rounds, model versions, artifacts and device status.

One database (any SQLAlchemy URL; by default the SQLite file ``var/registry.db``) holds
everything the cloud knows about the fleet. The Flower ServerApp process writes runs,
rounds and versions; the MQTT listener writes device status and events; the web UI
process reads. Several :class:`Registry` objects, in several threads or processes, may
use the same database at once.

Artifacts are content-addressed and live **in the database** (table ``artifacts``,
keyed by the SHA-256 hex digest of the bytes). Writing a blob happens in the same
transaction as the version that refers to it, so a version never points at a missing
or half-written blob, and writing the same bytes twice stores them once. Reading a
version's bytes recomputes the digest and raises :class:`ArtifactCorruptError` if the
stored bytes do not match.

The schema is versioned with Alembic (:mod:`cloud.migrations`): opening a registry
upgrades its database in place to this release's schema, and refuses one a newer
release wrote (:class:`SchemaError`).

SQLite specifics: the database runs in WAL mode (readers never block the writer),
with a busy timeout, and every write transaction starts with ``BEGIN IMMEDIATE`` so
that two processes never deadlock upgrading a read lock to a write lock.

Every query returns plain frozen dataclasses, never ORM objects. Timestamps the
registry sets itself are seconds since the Unix epoch (float); timestamps that come
from devices keep their milliseconds (``timestamp_ms``).

Errors::

    RegistryError (RuntimeError)
    ├── NotFoundError (LookupError)   no such run / version / device
    ├── ArtifactCorruptError          stored bytes do not match their digest
    ├── SchemaError                   the database's schema cannot be upgraded (newer, foreign)
    └── InvalidRecordError (ValueError)  bad status, round number, metrics ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from sqlalchemy import (
    Engine,
    and_,
    bindparam,
    case,
    create_engine,
    event,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from cloud import migrations
from cloud.errors import CloudError
from cloud.registry_models import (
    ArtifactRow,
    DeviceRow,
    EventRow,
    MetaRow,
    PublishRow,
    RolloutRow,
    RoundReplyRow,
    RoundRow,
    RunRow,
    ServingRow,
    VersionRow,
)
from protos.codec import DEVICE_STATES, DeviceEvent, DeviceStatus, sha256_hex

logger = logging.getLogger(__name__)

#: Environment variable naming the registry's SQLAlchemy URL.
REGISTRY_URL_ENV = "EDGEFL_REGISTRY_URL"
#: Where the registry lives when neither an URL nor the environment variable is given.
DEFAULT_REGISTRY_PATH = Path("var") / "registry.db"
#: How long (ms) a SQLite connection waits for another writer before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Run states accepted by :meth:`Registry.finish_run` (``running`` is the initial one).
RUN_STATUSES = ("running", "completed", "failed", "stopped", "interrupted")
#: How far (ms) a device's status timestamp may lie ahead of the time the cloud received
#: it: the clock skew tolerated between devices and the cloud. A status further ahead is
#: refused; one within the tolerance is stored with the receive time as its timestamp.
MAX_STATUS_AHEAD_MS = 5 * 60 * 1000

_CHANGES_KEY = "changes"
_WRITE_OPTION = "edgefl_write"
#: Status rows in one SQLite upsert statement (16 parameters each; SQLite allows 32,766).
SQLITE_ROWS_PER_STATEMENT = 1000
#: "Not computed yet", for values cached on first use.
_UNSET = object()


class RegistryError(CloudError, RuntimeError):
    """Base class of every error the registry raises."""


class NotFoundError(RegistryError, LookupError):
    """The run, version or device asked for does not exist."""


class ArtifactCorruptError(RegistryError):
    """A stored artifact whose bytes no longer match their SHA-256 digest."""


class SchemaError(RegistryError):
    """The database's schema is newer than this edgefl's, or not a registry's."""


class InvalidRecordError(RegistryError, ValueError):
    """A value the registry refuses to store (unknown status, negative round, NaN ...)."""


# --- what queries return -----------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One federated run."""

    id: int
    num_rounds: int
    strategy: str
    config: dict[str, Any]
    flower_run_id: str | None
    status: str
    started_at: float
    finished_at: float | None


@dataclass(frozen=True)
class ModelVersion:
    """One registered model version and the artifact it points at."""

    version: int
    architecture_id: str
    round: int
    run_id: int | None
    parent_version: int | None
    metrics: dict[str, float]
    participants: list[str]
    sha256: str
    size: int
    created_at: float


@dataclass(frozen=True)
class Serving:
    """What the fleet should serve: a version, whether an operator pinned it, a sequence."""

    version: int
    pinned: bool
    sequence: int
    updated_at: float


@dataclass(frozen=True)
class RoundReply:
    """One device's answer in one round (``ok=False`` carries the error)."""

    device_id: str
    ok: bool
    num_examples: int
    metrics: dict[str, float]
    error: str
    received_at: float


@dataclass(frozen=True)
class RoundRecord:
    """Bookkeeping of one round: who was asked, who answered, what came out."""

    run_id: int
    round: int
    sampled: list[str]
    started_at: float | None
    finished_at: float | None
    aggregated_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    version: int | None
    dropped: list[str]
    replies: list[RoundReply] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    @property
    def duration(self) -> float | None:
        """Seconds from start to finish, ``None`` while running or if never started."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)

    @property
    def replied(self) -> list[str]:
        """Devices that answered successfully."""
        return [r.device_id for r in self.replies if r.ok]

    @property
    def failed(self) -> list[str]:
        """Devices that answered with an error."""
        return [r.device_id for r in self.replies if not r.ok]

    @property
    def pending(self) -> list[str]:
        """Sampled devices with no answer yet and not dropped."""
        answered = {r.device_id for r in self.replies} | set(self.dropped)
        return [d for d in self.sampled if d not in answered]


@dataclass(frozen=True)
class Device(DeviceStatus):
    """The latest status a device reported, plus when the cloud received it.

    Its fields are :class:`~protos.codec.DeviceStatus`'s (the one definition of a
    status) and ``received_at``; the ``devices`` row and the API view are built from
    them (:data:`_STATUS_COLUMNS`, :func:`cloud.web.schemas.device_out`).
    """

    received_at: float = 0.0
    """When the cloud stored the status (seconds since the Unix epoch)."""

    @property
    def online(self) -> bool:
        """A device is online unless its last status says OFFLINE."""
        return self.state != "OFFLINE"


@dataclass(frozen=True)
class Event:
    """A stored device event; ``id`` grows with arrival order."""

    id: int
    device_id: str
    timestamp_ms: int
    kind: str
    detail: str
    version: int


@dataclass(frozen=True)
class StoredRollout:
    """A staged rollout as the rollout controller stored it (its document left unparsed)."""

    version: int
    status: str
    state_json: str
    updated_at: float


@dataclass(frozen=True)
class RegistryStats:
    """Counts over the whole registry, read in one transaction (what ``/metrics`` shows)."""

    runs_by_status: dict[str, int]
    rounds_finished: int
    rounds_running: int
    #: Durations (seconds) of every finished round that has a start time.
    round_durations: list[float]
    #: Device answers over all rounds: ``ok``, ``failed``, ``dropped`` (timed out).
    replies: dict[str, int]
    #: The newest round (highest run, then round): its number and how many were sampled.
    latest_round: int
    latest_round_sampled: int
    devices_by_state: dict[str, int]
    #: Online (not OFFLINE) devices by the version they serve.
    online_by_version: dict[int, int]
    #: The version the fleet should serve (0 before the first release).
    current_version: int
    versions: int
    artifacts: int
    artifact_bytes: int
    events: int
    #: Durations (seconds) of every recorded publish.
    publish_durations: list[float]


class Spread(TypedDict):
    """How far a version has spread: online devices serving it, online, known devices."""

    serving: int
    online: int
    total: int


# --- helpers ---------------------------------------------------------------------------------


def default_url() -> str:
    """``$EDGEFL_REGISTRY_URL`` or the SQLite file ``var/registry.db`` (relative to cwd)."""
    return os.environ.get(REGISTRY_URL_ENV) or f"sqlite:///{DEFAULT_REGISTRY_PATH}"


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """The SQLAlchemy URL of a SQLite file."""
    return f"sqlite:///{Path(path)}"


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _dumps(value: Any) -> str:
    """Compact, key-sorted JSON (one encoder for all: ``json.dumps`` with options builds
    a new one per call, which was a third of a status upsert's CPU, #18)."""
    return _ENCODER.encode(value)


def _metrics(values: Mapping[str, Any] | None, *, what: str) -> dict[str, float]:
    """Validate metrics: string keys, finite numbers (bools and ints become floats)."""
    out: dict[str, float] = {}
    for key, value in (values or {}).items():
        if not isinstance(key, str) or not key:
            raise InvalidRecordError(f"{what}: metric names must be non-empty strings")
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise InvalidRecordError(f"{what}: metric {key!r} is not a number: {value!r}") from exc
        if not math.isfinite(number):
            raise InvalidRecordError(f"{what}: metric {key!r} is not finite ({number})")
        out[key] = number
    return out


def _check_round(server_round: int) -> None:
    if server_round < 0:
        raise InvalidRecordError(f"round must be ≥ 0, got {server_round}")


def _configure_sqlite(engine: Engine, *, in_memory: bool) -> None:
    """WAL, busy timeout, foreign keys, and ``BEGIN IMMEDIATE`` for write transactions."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's own is deferred
        # and issued lazily, which is what makes two writers deadlock).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        if not in_memory:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get(_WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


# --- the registry ----------------------------------------------------------------------------


class Registry:
    """Runs, rounds, versions, artifacts and devices in one SQL database.

    Thread-safe: each call opens its own session from a connection pool. Safe across
    processes on one SQLite file (WAL + ``BEGIN IMMEDIATE``) and on server databases
    (version numbers are retried on a unique-key conflict).
    """

    def __init__(self, url: str | None = None, *, echo: bool = False) -> None:
        self.url = url or default_url()
        parsed = make_url(self.url)
        self._is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {"echo": echo}
        if self._is_sqlite:
            database = parsed.database or ""
            in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            if in_memory:
                kwargs["poolclass"] = StaticPool
            else:
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self._engine = create_engine(self.url, **kwargs)
            _configure_sqlite(self._engine, in_memory=in_memory)
        else:
            kwargs["pool_pre_ping"] = True
            self._engine = create_engine(self.url, **kwargs)
        self._write_engine = self._engine.execution_options(**{_WRITE_OPTION: True})
        self._upsert_sql: object = _UNSET
        # StaticPool shares one connection: serialize its users within this process.
        self._local_lock = threading.RLock() if kwargs.get("poolclass") is StaticPool else None
        try:
            with self._maybe_locked(), self._write_engine.begin() as conn:
                migrations.upgrade(conn)
        except migrations.MigrationError as exc:
            self._engine.dispose()
            raise SchemaError(str(exc)) from exc
        logger.debug("registry opened at %s", parsed.render_as_string(hide_password=True))

    def close(self) -> None:
        """Release pooled connections; the object must not be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- sessions --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _read(self) -> Iterator[Session]:
        with self._maybe_locked(), Session(self._engine) as session, session.begin():
            yield session

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        """A write transaction that bumps the change counter before committing."""
        with (
            self._maybe_locked(),
            Session(self._write_engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            yield session
            self._bump(session)

    @contextlib.contextmanager
    def _maybe_locked(self) -> Iterator[None]:
        if self._local_lock is None:
            yield
        else:
            with self._local_lock:
                yield

    @staticmethod
    def _bump(session: Session) -> None:
        row = session.get(MetaRow, _CHANGES_KEY)
        if row is None:
            session.add(MetaRow(key=_CHANGES_KEY, value=1))
        else:
            row.value = row.value + 1

    # -- change feed -------------------------------------------------------------------------

    def change_token(self) -> int:
        """A counter that grows with every write, from any process."""
        with self._read() as session:
            row = session.get(MetaRow, _CHANGES_KEY)
            return 0 if row is None else int(row.value)

    def changes_since(self, token: int) -> tuple[int, bool]:
        """``(current token, whether anything was written since token)``."""
        current = self.change_token()
        return current, current != token

    # -- runs --------------------------------------------------------------------------------

    def start_run(
        self,
        *,
        num_rounds: int,
        strategy: str,
        config: Mapping[str, Any],
        flower_run_id: str | None = None,
    ) -> int:
        """Record a new run in state ``running``; returns its id."""
        if num_rounds < 0:
            raise InvalidRecordError(f"num_rounds must be ≥ 0, got {num_rounds}")
        with self._write() as session:
            row = RunRow(
                flower_run_id=flower_run_id,
                num_rounds=num_rounds,
                strategy=strategy,
                config_json=_dumps(dict(config)),
                status="running",
                started_at=time.time(),
            )
            session.add(row)
            session.flush()
            run_id = int(row.id)
        logger.info("run %s started: %s rounds, strategy %s", run_id, num_rounds, strategy)
        return run_id

    def finish_run(self, run_id: int, status: str) -> None:
        """Set a run's status (``completed``, ``failed``, ``stopped``, ``interrupted``: a
        cloud-side fault stopped it and the next ``cloud up`` resumes it)."""
        if status not in RUN_STATUSES:
            raise InvalidRecordError(f"run status must be one of {RUN_STATUSES}, got {status!r}")
        with self._write() as session:
            row = session.get(RunRow, run_id)
            if row is None:
                raise NotFoundError(f"no run {run_id}")
            row.status = status
            row.finished_at = None if status == "running" else time.time()
        logger.info("run %s %s", run_id, status)

    def get_run(self, run_id: int) -> Run:
        with self._read() as session:
            row = session.get(RunRow, run_id)
            if row is None:
                raise NotFoundError(f"no run {run_id}")
            return _run(row)

    def latest_run(self) -> Run | None:
        """The most recently started run, or ``None``."""
        with self._read() as session:
            row = session.scalars(select(RunRow).order_by(RunRow.id.desc()).limit(1)).first()
            return None if row is None else _run(row)

    def list_runs(self) -> list[Run]:
        """All runs, oldest first."""
        with self._read() as session:
            return [_run(r) for r in session.scalars(select(RunRow).order_by(RunRow.id))]

    # -- versions and artifacts -------------------------------------------------------------

    def add_version(
        self,
        *,
        package: bytes,
        architecture_id: str,
        round: int,
        run_id: int | None,
        parent_version: int | None,
        metrics: Mapping[str, float],
        participants: Sequence[str] | None = None,
    ) -> ModelVersion:
        """Register a model version; idempotent per ``(run_id, round)``.

        Adding a version for a ``(run_id, round)`` that already has one returns the
        existing version unchanged (a cloud restarted mid-run re-registers its last
        round). Without a run, the same round with the same bytes is the same version.
        Version numbers are consecutive integers starting at 1.
        """
        if not package:
            raise InvalidRecordError("a model version needs a non-empty package")
        if not architecture_id:
            raise InvalidRecordError("a model version needs an architecture_id")
        _check_round(round)
        clean_metrics = _metrics(metrics, what=f"version of round {round}")
        digest = sha256_hex(package)
        for attempt in range(5):
            try:
                with self._write() as session:
                    existing = self._find_version(session, run_id, round, digest)
                    if existing is not None:
                        if existing.artifact_sha256 != digest:
                            logger.warning(
                                "run %s round %s already has version %s (%s); "
                                "ignoring a different package %s",
                                run_id,
                                round,
                                existing.version,
                                existing.artifact_sha256[:12],
                                digest[:12],
                            )
                        return self._version(session, existing)
                    if run_id is not None and session.get(RunRow, run_id) is None:
                        raise NotFoundError(f"no run {run_id}")
                    if parent_version is not None and (
                        session.get(VersionRow, parent_version) is None
                    ):
                        raise NotFoundError(f"parent version {parent_version} does not exist")
                    self._put_artifact(session, digest, package)
                    number = int(session.scalar(select(func.max(VersionRow.version))) or 0) + 1
                    row = VersionRow(
                        version=number,
                        artifact_sha256=digest,
                        architecture_id=architecture_id,
                        round=round,
                        run_id=run_id,
                        parent_version=parent_version,
                        metrics_json=_dumps(clean_metrics),
                        participants_json=_dumps(sorted(participants or [])),
                        created_at=time.time(),
                    )
                    session.add(row)
                    session.flush()
                    result = self._version(session, row)
                logger.info(
                    "version %s registered (run %s, round %s, sha256 %s)",
                    number,
                    run_id,
                    round,
                    digest[:12],
                )
                return result
            except IntegrityError:
                # Another writer took the same version number or (run, round): re-read.
                if attempt == 4:
                    raise
                logger.debug("version insert conflicted, retrying", exc_info=True)
        raise RegistryError("unreachable")  # pragma: no cover

    @staticmethod
    def _find_version(
        session: Session, run_id: int | None, server_round: int, digest: str
    ) -> VersionRow | None:
        query = select(VersionRow).where(VersionRow.round == server_round)
        if run_id is None:
            query = query.where(VersionRow.run_id.is_(None), VersionRow.artifact_sha256 == digest)
        else:
            query = query.where(VersionRow.run_id == run_id)
        return session.scalars(query.limit(1)).first()

    @staticmethod
    def _put_artifact(session: Session, digest: str, data: bytes) -> None:
        """Store a blob once; an existing blob with this digest is left as is."""
        if session.get(ArtifactRow, digest) is None:
            session.add(
                ArtifactRow(sha256=digest, size=len(data), data=data, created_at=time.time())
            )
            session.flush()

    @staticmethod
    def _version(session: Session, row: VersionRow) -> ModelVersion:
        size = session.scalar(
            select(ArtifactRow.size).where(ArtifactRow.sha256 == row.artifact_sha256)
        )
        return ModelVersion(
            version=row.version,
            architecture_id=row.architecture_id,
            round=row.round,
            run_id=row.run_id,
            parent_version=row.parent_version,
            metrics=json.loads(row.metrics_json),
            participants=json.loads(row.participants_json),
            sha256=row.artifact_sha256,
            size=int(size or 0),
            created_at=row.created_at,
        )

    def latest_version(self) -> ModelVersion | None:
        """The highest version number, or ``None`` on an empty registry (resume point)."""
        with self._read() as session:
            row = session.scalars(
                select(VersionRow).order_by(VersionRow.version.desc()).limit(1)
            ).first()
            return None if row is None else self._version(session, row)

    def get_version(self, version: int) -> ModelVersion:
        with self._read() as session:
            row = session.get(VersionRow, version)
            if row is None:
                raise NotFoundError(f"no model version {version}")
            return self._version(session, row)

    def list_versions(self) -> list[ModelVersion]:
        """All versions, oldest first."""
        with self._read() as session:
            rows = session.scalars(select(VersionRow).order_by(VersionRow.version)).all()
            return [self._version(session, r) for r in rows]

    def version_bytes(self, version: int) -> bytes:
        """The package bytes of a version, after checking them against their digest."""
        with self._read() as session:
            row = session.get(VersionRow, version)
            if row is None:
                raise NotFoundError(f"no model version {version}")
            data = session.scalar(
                select(ArtifactRow.data).where(ArtifactRow.sha256 == row.artifact_sha256)
            )
            expected = row.artifact_sha256
        if data is None:
            raise ArtifactCorruptError(f"version {version}: artifact {expected} is missing")
        actual = sha256_hex(bytes(data))
        if actual != expected:
            raise ArtifactCorruptError(
                f"version {version}: stored artifact has SHA-256 {actual}, expected {expected}"
            )
        return bytes(data)

    def artifact_bytes(self, digest: str) -> bytes:
        """A blob by its SHA-256 hex digest, verified."""
        with self._read() as session:
            data = session.scalar(select(ArtifactRow.data).where(ArtifactRow.sha256 == digest))
        if data is None:
            raise NotFoundError(f"no artifact {digest}")
        if sha256_hex(bytes(data)) != digest:
            raise ArtifactCorruptError(f"artifact {digest} does not match its digest")
        return bytes(data)

    def artifact_count(self) -> int:
        """How many distinct blobs are stored."""
        with self._read() as session:
            return int(session.scalar(select(func.count()).select_from(ArtifactRow)) or 0)

    def set_current(
        self,
        version: int,
        *,
        pinned: bool,
        sequence: int | None = None,
        publish_seconds: float | None = None,
    ) -> Serving:
        """Record what the fleet should serve. ``sequence`` defaults to the previous + 1.

        ``publish_seconds`` (how long publishing the release took) also records the
        publish in the ``publishes`` table, which ``/metrics`` reads.
        """
        if publish_seconds is not None and not (
            math.isfinite(publish_seconds) and publish_seconds >= 0
        ):
            raise InvalidRecordError(f"publish_seconds must be ≥ 0, got {publish_seconds}")
        with self._write() as session:
            if session.get(VersionRow, version) is None:
                raise NotFoundError(f"no model version {version}")
            row = session.get(ServingRow, 1)
            now = time.time()
            if row is None:
                row = ServingRow(
                    id=1,
                    version=version,
                    pinned=pinned,
                    sequence=1 if sequence is None else sequence,
                    updated_at=now,
                )
                session.add(row)
            else:
                row.version = version
                row.pinned = pinned
                row.sequence = row.sequence + 1 if sequence is None else sequence
                row.updated_at = now
            if publish_seconds is not None:
                session.add(
                    PublishRow(
                        version=version,
                        sequence=row.sequence,
                        pinned=pinned,
                        published_at=now,
                        duration_s=float(publish_seconds),
                    )
                )
            session.flush()
            result = Serving(row.version, bool(row.pinned), row.sequence, row.updated_at)
        logger.info("fleet serves version %s (pinned=%s)", version, pinned)
        return result

    def current(self) -> Serving | None:
        """What the fleet should serve, or ``None`` before the first release."""
        with self._read() as session:
            row = session.get(ServingRow, 1)
            if row is None:
                return None
            return Serving(row.version, bool(row.pinned), row.sequence, row.updated_at)

    # -- rounds ------------------------------------------------------------------------------

    def _round_row(self, session: Session, run_id: int, server_round: int) -> RoundRow:
        _check_round(server_round)
        row = session.get(RoundRow, (run_id, server_round))
        if row is None:
            if session.get(RunRow, run_id) is None:
                raise NotFoundError(f"no run {run_id}")
            row = RoundRow(run_id=run_id, round=server_round)
            session.add(row)
            session.flush()
        return row

    def round_started(
        self,
        run_id: int,
        round: int,
        *,
        sampled: Sequence[str],
        started_at: float | None = None,
    ) -> None:
        """A round began with these devices. Starting it again (after a restart) resets it."""
        with self._write() as session:
            row = self._round_row(session, run_id, round)
            row.sampled_json = _dumps(sorted(sampled))
            row.started_at = time.time() if started_at is None else started_at
            row.finished_at = None
            row.dropped_json = "[]"
            for reply in session.scalars(
                select(RoundReplyRow).where(
                    RoundReplyRow.run_id == run_id, RoundReplyRow.round == round
                )
            ):
                session.delete(reply)

    def round_reply(
        self,
        run_id: int,
        round: int,
        device_id: str,
        *,
        ok: bool,
        num_examples: int = 0,
        metrics: Mapping[str, float] | None = None,
        error: str = "",
    ) -> None:
        """A device answered (or failed) in a round; a second answer replaces the first."""
        clean = _metrics(metrics, what=f"reply of {device_id} in round {round}")
        with self._write() as session:
            self._round_row(session, run_id, round)
            row = session.get(RoundReplyRow, (run_id, round, device_id))
            if row is None:
                row = RoundReplyRow(run_id=run_id, round=round, device_id=device_id)
                session.add(row)
            row.ok = ok
            row.num_examples = int(num_examples)
            row.metrics_json = _dumps(clean)
            row.error = error
            row.received_at = time.time()

    def round_finished(
        self,
        run_id: int,
        round: int,
        *,
        aggregated_metrics: Mapping[str, float],
        version: int | None,
        dropped: Sequence[str],
    ) -> None:
        """A round ended: its aggregated metrics, the version it produced, who timed out."""
        clean = _metrics(aggregated_metrics, what=f"aggregate of round {round}")
        with self._write() as session:
            row = self._round_row(session, run_id, round)
            row.aggregated_metrics_json = _dumps(clean)
            row.version = version
            row.dropped_json = _dumps(sorted(dropped))
            row.finished_at = time.time()
            if row.started_at is None:
                row.started_at = row.finished_at

    def record_evaluation(self, run_id: int, round: int, metrics: Mapping[str, float]) -> None:
        """Server-side evaluation of the global model after ``round`` (0 = initial model)."""
        clean = _metrics(metrics, what=f"evaluation of round {round}")
        with self._write() as session:
            row = self._round_row(session, run_id, round)
            row.eval_metrics_json = _dumps(clean)

    def list_rounds(self, run_id: int) -> list[RoundRecord]:
        """Every round of a run in order, with its replies."""
        with self._read() as session:
            rows = session.scalars(
                select(RoundRow).where(RoundRow.run_id == run_id).order_by(RoundRow.round)
            ).all()
            replies: dict[int, list[RoundReply]] = {}
            for r in session.scalars(
                select(RoundReplyRow)
                .where(RoundReplyRow.run_id == run_id)
                .order_by(RoundReplyRow.round, RoundReplyRow.device_id)
            ):
                replies.setdefault(r.round, []).append(
                    RoundReply(
                        device_id=r.device_id,
                        ok=bool(r.ok),
                        num_examples=r.num_examples,
                        metrics=json.loads(r.metrics_json),
                        error=r.error,
                        received_at=r.received_at,
                    )
                )
            return [
                RoundRecord(
                    run_id=row.run_id,
                    round=row.round,
                    sampled=json.loads(row.sampled_json),
                    started_at=row.started_at,
                    finished_at=row.finished_at,
                    aggregated_metrics=json.loads(row.aggregated_metrics_json),
                    eval_metrics=json.loads(row.eval_metrics_json),
                    version=row.version,
                    dropped=json.loads(row.dropped_json),
                    replies=replies.get(row.round, []),
                )
                for row in rows
            ]

    # -- devices -----------------------------------------------------------------------------

    def upsert_device_status(self, status: DeviceStatus, *, received_ms: int | None = None) -> bool:
        """Store a device's status unless a newer one is already stored.

        Timestamps are bounded by the receive time ``received_ms`` (default: now): a
        status more than :data:`MAX_STATUS_AHEAD_MS` ahead of it raises
        :class:`InvalidRecordError`; one less far ahead is stored with the receive time,
        so a forged status "from the year 2100" can never make the device's later, real
        statuses look older. A stored timestamp beyond the tolerance (written before this
        rule) counts as no timestamp at all.

        Returns whether the stored status changed (an older, re-delivered status is
        ignored, so MQTT redeliveries and retained messages cannot roll a device back).

        One exception: an older OFFLINE status still marks an online device OFFLINE.
        That is how a device's Last Will arrives: the agent composes it when it
        connects, so when the broker publishes it after the device died, its timestamp
        and version are those of the connection, older than the statuses sent since.
        Only the state changes then; the stored version and timestamp stay, being newer
        knowledge, so the device's next status after it reconnects is accepted. A stale
        OFFLINE redelivered while the device is up is corrected by its next status.
        """
        now_ms = int(time.time() * 1000) if received_ms is None else received_ms
        _check_status(status, now_ms)
        return self.upsert_device_statuses([status], received_ms=now_ms) > 0

    def upsert_device_statuses(
        self, statuses: Sequence[DeviceStatus], *, received_ms: int | None = None
    ) -> int:
        """Store many statuses (in arrival order) in one transaction; returns how many changed.

        Each status follows the rules of :meth:`upsert_device_status`. An invalid one is
        logged and skipped: the others in the batch are still stored. On SQLite and
        PostgreSQL the rules run in the database (``INSERT ... ON CONFLICT DO UPDATE ...
        WHERE``), compiled once and handed to the driver with plain parameters (see
        :meth:`_status_upsert_sql`), per round of distinct devices; other databases go
        row by row. The fleet monitor writes here ~2,000 statuses a second from 10,000
        devices: the same upsert through SQLAlchemy's per-row parameter processing and
        ``RETURNING`` cost ~110 µs of CPU per status, the driver directly ~40 µs (#18).
        """
        now = time.time()
        now_ms = int(now * 1000) if received_ms is None else received_ms
        rounds: list[list[dict[str, Any]]] = []
        seen: dict[str, int] = {}
        for status in statuses:
            try:
                values = _status_values(status, _check_status(status, now_ms), now, now_ms)
            except InvalidRecordError as exc:
                logger.warning("status of %r not stored: %s", status.device_id, exc)
                continue
            # A device twice in one batch goes into the next round, so that its second
            # status meets the first one's result, as two separate upserts would.
            n = seen.get(status.device_id, 0)
            seen[status.device_id] = n + 1
            if n == len(rounds):
                rounds.append([])
            rounds[n].append(values)
        if not rounds:
            return 0
        changed = 0
        upsert = self._status_upsert_sql()
        with self._write() as session:
            if upsert is None:
                for values_list in rounds:
                    changed += _apply_rows(session, values_list, now_ms + MAX_STATUS_AHEAD_MS)
                return changed
            frozen_above_ms = now_ms + MAX_STATUS_AHEAD_MS
            dbapi = session.connection().connection.driver_connection
            cursor = dbapi.cursor()  # type: ignore[union-attr]
            try:
                for values_list in rounds:
                    changed += upsert(cursor, values_list, frozen_above_ms)
            finally:
                cursor.close()
        return changed

    def _status_upsert_sql(self) -> Callable[[Any, list[dict[str, Any]], int], int] | None:
        """The dialect's status upsert as driver SQL: ``write(cursor, rows, frozen_above_ms)``
        stores rows of distinct devices and returns how many changed.

        ``frozen_above_ms`` is the clock skew bound: a stored timestamp beyond it counts as
        older than any status (written before timestamps were bounded). ``None`` when the
        database has no ``INSERT ... ON CONFLICT``. Compiled once per registry.

        On SQLite one statement carries up to :data:`SQLITE_ROWS_PER_STATEMENT` rows
        (``VALUES (…), (…), …``): Python's driver releases the GIL around every statement
        step, and ``executemany`` steps once per row; with the web API busy in another
        thread, taking the GIL back for each row made a 10,000-status batch take seconds.
        psycopg's ``executemany`` pipelines its rows and is used as it is.
        """
        if self._upsert_sql is not _UNSET:
            return self._upsert_sql  # type: ignore[return-value]
        statement = self._status_upsert()
        if statement is None:
            self._upsert_sql = None
            return None
        compiled = statement.compile(dialect=self._engine.dialect)
        constants = {k: v for k, v in compiled.params.items() if k not in _STATUS_COLUMNS}
        sql = str(compiled)
        names = compiled.positiontup
        if names is None:  # psycopg: named parameters, one dict per row

            def executemany(cursor: Any, rows: list[dict[str, Any]], frozen: int) -> int:
                cursor.executemany(
                    sql, [{**constants, **row, "frozen_above_ms": frozen} for row in rows]
                )
                return max(0, cursor.rowcount)  # the sum over the rows

            self._upsert_sql = executemany
            return executemany
        columns = [n for n in names if n in _STATUS_COLUMNS]
        rest = names[len(columns) :]
        one_row = "(" + ", ".join("?" * len(columns)) + ")"
        head, found, tail = sql.partition(f"VALUES {one_row}")
        if not found or names[: len(columns)] != columns or set(columns) & set(rest):
            raise RegistryError(f"unexpected shape of the status upsert: {sql[:200]}…")

        def many_rows(cursor: Any, rows: list[dict[str, Any]], frozen: int) -> int:
            after = [frozen if n == "frozen_above_ms" else constants[n] for n in rest]
            changed = 0
            start = 0
            for size in _chunk_sizes(len(rows)):
                chunk = rows[start : start + size]
                start += size
                values = ", ".join([one_row] * size)
                params = [row[c] for row in chunk for c in columns]
                cursor.execute(f"{head}VALUES {values}{tail}", [*params, *after])
                changed += max(0, cursor.rowcount)  # rows this statement changed
            return changed

        self._upsert_sql = many_rows
        return many_rows

    def _status_upsert(self) -> Any:
        """The dialect's ``INSERT ... ON CONFLICT DO UPDATE`` for statuses (None: no such)."""
        backend = self._engine.dialect.name
        if backend == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        elif backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
        else:
            return None
        table: Any = DeviceRow.__table__
        ins = insert(table).values({name: bindparam(name) for name in _STATUS_COLUMNS})
        new = ins.excluded
        newer = or_(
            new.timestamp_ms >= table.c.timestamp_ms,
            table.c.timestamp_ms > bindparam("frozen_above_ms"),
        )
        keep_or_take = {
            name: case((newer, new[name]), else_=table.c[name])
            for name in _STATUS_COLUMNS
            if name not in ("device_id", "state", "received_at")
        }
        return ins.on_conflict_do_update(
            index_elements=[table.c.device_id],
            set_={
                **keep_or_take,
                # An older OFFLINE (a Last Will) still marks the device OFFLINE.
                "state": case((newer, new.state), else_=literal("OFFLINE")),
                "received_at": new.received_at,
            },
            where=or_(newer, and_(new.state == "OFFLINE", table.c.state != "OFFLINE")),
        )

    def get_device(self, device_id: str) -> Device:
        with self._read() as session:
            row = session.get(DeviceRow, device_id)
            if row is None:
                raise NotFoundError(f"no device {device_id!r}")
            return _device(row)

    def known_device_ids(self) -> set[str]:
        """Devices with a stored status, and devices that answered in a federated round."""
        with self._read() as session:
            known = set(session.scalars(select(DeviceRow.device_id)))
            known.update(session.scalars(select(RoundReplyRow.device_id).distinct()))
        return known

    def devices_serving_unknown_versions(self, limit: int = 20) -> list[tuple[str, int]]:
        """``(device, version)`` of devices serving a version the registry does not know."""
        with self._read() as session:
            rows = session.execute(
                select(DeviceRow.device_id, DeviceRow.serving_version)
                .where(
                    DeviceRow.serving_version != 0,
                    DeviceRow.serving_version.not_in(select(VersionRow.version)),
                )
                .order_by(DeviceRow.device_id)
                .limit(limit)
            ).all()
        return [(str(d), int(v)) for d, v in rows]

    def version_numbers(self) -> set[int]:
        """Every registered version number."""
        with self._read() as session:
            return {int(v) for v in session.scalars(select(VersionRow.version))}

    def list_devices(
        self,
        *,
        offset: int = 0,
        limit: int | None = None,
        state: str | None = None,
        search: str | None = None,
        version: int | None = None,
    ) -> list[Device]:
        """Devices that ever reported, by id: all of them, or one filtered page.

        ``state`` keeps one state, ``search`` the ids containing it (case-insensitive),
        ``version`` the devices serving it; ``offset``/``limit`` cut a page of the result.
        """
        if offset < 0 or (limit is not None and limit < 0):
            raise InvalidRecordError("offset and limit must not be negative")
        query = _filter_devices(select(DeviceRow), state, search, version)
        query = query.order_by(DeviceRow.device_id).offset(offset)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as session:
            return [_device(r) for r in session.scalars(query)]

    def count_devices(
        self, *, state: str | None = None, search: str | None = None, version: int | None = None
    ) -> int:
        """How many devices :meth:`list_devices` would return without a page."""
        query = _filter_devices(select(func.count()).select_from(DeviceRow), state, search, version)
        with self._read() as session:
            return int(session.scalar(query) or 0)

    def record_event(self, event: DeviceEvent) -> int:
        """Store a device event; returns its id."""
        if not event.device_id or not event.kind:
            raise InvalidRecordError("a device event needs device_id and kind")
        with self._write() as session:
            row = EventRow(
                device_id=event.device_id,
                timestamp_ms=event.timestamp_ms,
                kind=event.kind,
                detail=event.detail,
                version=event.version,
            )
            session.add(row)
            session.flush()
            return int(row.id)

    def record_events(self, events: Sequence[DeviceEvent]) -> int:
        """Store many events in one transaction; an invalid one is logged and skipped.

        Returns how many were stored.
        """
        valid = []
        for item in events:
            if item.device_id and item.kind:
                valid.append(item)
            else:
                logger.warning("event %r not stored: it needs device_id and kind", item)
        if valid:
            with self._write() as session:
                session.add_all(
                    EventRow(
                        device_id=e.device_id,
                        timestamp_ms=e.timestamp_ms,
                        kind=e.kind,
                        detail=e.detail,
                        version=e.version,
                    )
                    for e in valid
                )
        return len(valid)

    def save_rollout(self, version: int, status: str, state: Mapping[str, Any]) -> None:
        """Store (or replace) the state of the staged rollout of ``version``.

        ``state`` is the rollout controller's own document (:mod:`cloud.rollout`); it
        must be JSON without NaN or infinities.
        """
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidRecordError(f"a rollout's version is an integer ≥ 1, got {version!r}")
        if not status or len(status) > 16:
            raise InvalidRecordError(f"a rollout's status is 1 to 16 characters, got {status!r}")
        try:
            document = json.dumps(dict(state), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidRecordError(f"rollout {version}: state is not plain JSON: {exc}") from exc
        with self._write() as session:
            row = session.get(RolloutRow, version)
            if row is None:
                session.add(
                    RolloutRow(
                        version=version, status=status, state_json=document, updated_at=time.time()
                    )
                )
            else:
                row.status, row.state_json, row.updated_at = status, document, time.time()

    def list_rollouts(self, limit: int = 100) -> list[StoredRollout]:
        """The stored rollouts of the ``limit`` newest candidate versions, newest first."""
        with self._read() as session:
            rows = session.scalars(
                select(RolloutRow).order_by(RolloutRow.version.desc()).limit(max(0, limit))
            )
            return [StoredRollout(r.version, r.status, r.state_json, r.updated_at) for r in rows]

    def list_events(self, limit: int = 100) -> list[Event]:
        """The newest ``limit`` events, newest first."""
        with self._read() as session:
            rows = session.scalars(
                select(EventRow).order_by(EventRow.id.desc()).limit(max(0, limit))
            )
            return [
                Event(r.id, r.device_id, r.timestamp_ms, r.kind, r.detail, r.version) for r in rows
            ]

    def spread(self, version: int) -> Spread:
        """Online devices serving ``version``, online devices, and all known devices."""
        with self._read() as session:
            total = int(session.scalar(select(func.count()).select_from(DeviceRow)) or 0)
            online_q = (
                select(func.count()).select_from(DeviceRow).where(DeviceRow.state != "OFFLINE")
            )
            online = int(session.scalar(online_q) or 0)
            serving = int(session.scalar(online_q.where(DeviceRow.serving_version == version)) or 0)
        return Spread(serving=serving, online=online, total=total)

    def stats(self) -> RegistryStats:
        """Counts of runs, rounds, replies, devices, versions and publishes (one read)."""
        with self._read() as session:

            def count(model: type[Any]) -> int:
                return int(session.scalar(select(func.count()).select_from(model)) or 0)

            runs_by_status = {
                str(status): int(n)
                for status, n in session.execute(
                    select(RunRow.status, func.count()).group_by(RunRow.status)
                )
            }
            finished = running = 0
            durations: list[float] = []
            dropped = 0
            for started, ended, dropped_json in session.execute(
                select(RoundRow.started_at, RoundRow.finished_at, RoundRow.dropped_json)
            ):
                if ended is None:
                    running += started is not None
                    continue
                finished += 1
                dropped += len(json.loads(dropped_json))
                if started is not None:
                    durations.append(max(0.0, float(ended) - float(started)))
            latest = session.execute(
                select(RoundRow.round, RoundRow.sampled_json)
                .order_by(RoundRow.run_id.desc(), RoundRow.round.desc())
                .limit(1)
            ).first()
            replies = {"ok": 0, "failed": 0, "dropped": dropped}
            for ok, n in session.execute(
                select(RoundReplyRow.ok, func.count()).group_by(RoundReplyRow.ok)
            ):
                replies["ok" if ok else "failed"] += int(n)
            by_state = {
                str(state): int(n)
                for state, n in session.execute(
                    select(DeviceRow.state, func.count()).group_by(DeviceRow.state)
                )
            }
            by_version = {
                int(version): int(n)
                for version, n in session.execute(
                    select(DeviceRow.serving_version, func.count())
                    .where(DeviceRow.state != "OFFLINE")
                    .group_by(DeviceRow.serving_version)
                )
            }
            serving = session.get(ServingRow, 1)
            artifact_bytes = int(session.scalar(select(func.sum(ArtifactRow.size))) or 0)
            publishes = [float(d) for d in session.scalars(select(PublishRow.duration_s))]
            return RegistryStats(
                runs_by_status=runs_by_status,
                rounds_finished=finished,
                rounds_running=running,
                round_durations=durations,
                replies=replies,
                latest_round=0 if latest is None else int(latest[0]),
                latest_round_sampled=0 if latest is None else len(json.loads(latest[1])),
                devices_by_state=by_state,
                online_by_version=by_version,
                current_version=0 if serving is None else int(serving.version),
                versions=count(VersionRow),
                artifacts=count(ArtifactRow),
                artifact_bytes=artifact_bytes,
                events=count(EventRow),
                publish_durations=publishes,
            )


def _filter_devices(query: Any, state: str | None, search: str | None, version: int | None) -> Any:
    if state is not None:
        if state not in DEVICE_STATES:
            raise InvalidRecordError(f"unknown device state {state!r}")
        query = query.where(DeviceRow.state == state)
    if search:
        escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(DeviceRow.device_id.ilike(f"%{escaped}%", escape="\\"))
    if version is not None:
        query = query.where(DeviceRow.serving_version == version)
    return query


def _check_status(status: DeviceStatus, now_ms: int) -> dict[str, float]:
    """Refuse a status the registry cannot store; returns its checked metrics.

    ``now_ms`` is when the cloud received it: a status dated more than
    :data:`MAX_STATUS_AHEAD_MS` later is refused.
    """
    if not status.device_id:
        raise InvalidRecordError("device status without device_id")
    if status.state not in DEVICE_STATES:
        raise InvalidRecordError(f"unknown device state {status.state!r}")
    if status.timestamp_ms > now_ms + MAX_STATUS_AHEAD_MS:
        raise InvalidRecordError(
            f"status of {status.device_id} is dated "
            f"{(status.timestamp_ms - now_ms) / 1000:.0f} s after it was received "
            f"(more than the {MAX_STATUS_AHEAD_MS // 1000} s of clock skew tolerated)"
        )
    return _metrics(status.last_metrics, what=f"status of {status.device_id}")


_STATUS_FIELDS = tuple(f.name for f in dataclasses.fields(DeviceStatus))
"""A status's fields, each a ``devices`` column of the same name except ``last_metrics``
(stored as JSON in ``last_metrics_json``)."""
_STATUS_COLUMNS = (
    *(name for name in _STATUS_FIELDS if name != "last_metrics"),
    "last_metrics_json",
    "received_at",
)
"""The ``devices`` columns a status writes."""


def _chunk_sizes(n: int) -> list[int]:
    """``n`` rows as statements of :data:`SQLITE_ROWS_PER_STATEMENT` rows, then powers of two.

    The driver keeps a prepared statement per distinct SQL text (128 of them); a
    1,000-row upsert is a large one, and one per leftover size grew the cloud's RSS by
    ~90 MB in the telemetry benchmark. These sizes make at most 11 distinct texts.
    """
    sizes = [SQLITE_ROWS_PER_STATEMENT] * (n // SQLITE_ROWS_PER_STATEMENT)
    rest = n % SQLITE_ROWS_PER_STATEMENT
    sizes += [1 << bit for bit in range(rest.bit_length() - 1, -1, -1) if rest >> bit & 1]
    return sizes


def _status_values(
    status: DeviceStatus, last_metrics: dict[str, float], now: float, now_ms: int
) -> dict[str, Any]:
    """The ``devices`` row a checked status becomes (its timestamp at most ``now_ms``).

    Spelled out field by field: the fleet monitor builds ~2,000 of these a second (#18);
    ``test_registry`` checks the keys are exactly :data:`_STATUS_COLUMNS`.
    """
    return {
        "device_id": status.device_id,
        "fleet": status.fleet,
        "serving_version": status.serving_version,
        "state": status.state,
        "timestamp_ms": min(status.timestamp_ms, now_ms),
        "last_round_trained": status.last_round_trained,
        "sample_count": status.sample_count,
        "cpu_percent": status.cpu_percent,
        "rss_bytes": status.rss_bytes,
        "disk_free_bytes": status.disk_free_bytes,
        "memory_available_bytes": status.memory_available_bytes,
        "profile": status.profile,
        "last_error": status.last_error,
        "edgefl_version": status.edgefl_version,
        "last_metrics_json": _dumps(last_metrics),
        "received_at": now,
    }


def _apply_rows(session: Session, values_list: list[dict[str, Any]], frozen_above_ms: int) -> int:
    """The upsert rules row by row (databases without ``ON CONFLICT``); returns changes.

    A stored timestamp above ``frozen_above_ms`` (beyond the skew tolerance) does not count.
    """
    changed = 0
    for values in values_list:
        row = session.get(DeviceRow, values["device_id"])
        if row is not None and frozen_above_ms >= row.timestamp_ms > values["timestamp_ms"]:
            if values["state"] != "OFFLINE" or row.state == "OFFLINE":
                continue
            row.state = "OFFLINE"
            row.received_at = values["received_at"]
        elif row is None:
            session.add(DeviceRow(**values))
        else:
            for name, value in values.items():
                setattr(row, name, value)
        changed += 1
    return changed


def _run(row: RunRow) -> Run:
    return Run(
        id=row.id,
        num_rounds=row.num_rounds,
        strategy=row.strategy,
        config=json.loads(row.config_json),
        flower_run_id=row.flower_run_id,
        status=row.status,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def _device(row: DeviceRow) -> Device:
    values = {name: getattr(row, name) for name in _STATUS_FIELDS if name != "last_metrics"}
    return Device(
        **values, last_metrics=json.loads(row.last_metrics_json), received_at=row.received_at
    )
