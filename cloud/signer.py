"""The release signer: the one part of the cloud that holds the fleet's signing key.

It runs inside ``edgefl cloud up`` (a thread of the supervisor process, which never
imports run-supplied code) and listens on a Unix socket, ``data_dir/signer/signer.sock``
(directory mode 0700, socket 0600). Each ``cloud up`` writes a fresh random token to
``data_dir/signer/token`` (0600); a request without it is refused. The ServerApp
registers a round's version in the registry and then asks the signer to *release* it;
only the signer signs the manifest (through :class:`cloud.publisher.Publisher`, which
builds the canonical signed form with :mod:`protos.codec` and :mod:`protos.signing`)
and publishes it.

Before signing, the signer checks what it signs against the registry and the fleet's
base model (:meth:`ReleaseSigner.check`):

* the version exists and its artifact matches its recorded SHA-256;
* it is the newest version in the registry and newer than what the fleet serves (no
  jumps back, no stale leftovers: a rollback is an operator's pin, not a release);
* it belongs to the newest run, and that run is running;
* its package decodes, names the fleet's architecture, carries the base model's own
  ``model.tflite`` and ``card.json`` byte for byte, and the same weight names, shapes
  and dtypes as the initial package, all finite.

A release is atomic from the fleet's point of view: the version becomes the registry's
current one (:meth:`cloud.registry.Registry.set_current`) only after the broker
acknowledged every chunk and the manifest. If the broker cannot be reached, the reply
says ``retry`` and nothing is marked; the ServerApp asks again until the broker is
back (:meth:`SignerClient.release_when_possible`).

**Wire format**: one JSON object per line each way, UTF-8, at most
:data:`MAX_REQUEST_BYTES` per request::

    → {"token": "…", "op": "release", "version": 7}
    ← {"ok": true, "version": 7, "sequence": 12}
    ← {"ok": false, "retry": true, "error": "cannot reach the MQTT broker …"}
    ← {"ok": false, "retry": false, "error": "version 7 is not the newest …"}
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cloud.config import CloudSettings
from cloud.errors import CloudError
from cloud.registry import Registry
from protos import codec, signing

logger = logging.getLogger(__name__)

#: Largest request line the signer reads.
MAX_REQUEST_BYTES = 4096
#: Seconds a client waits for one reply (a release of a large model takes a while).
REPLY_TIMEOUT_S = 300.0
#: Longest pause between two attempts while the broker or the signer is away.
MAX_RETRY_DELAY_S = 10.0
#: Every release is recorded as a registry event of this source and kind.
EVENT_SOURCE = "cloud"
RELEASED_EVENT_KIND = "release published"
#: Operator actions on staged rollouts the signer's socket answers besides "release".
ROLLOUT_OPS = ("rollout-status", "rollout-promote", "rollout-halt")
#: Event kind of a current release published again (after a broker restart).
REPUBLISHED_EVENT_KIND = "release republished"


class SignerError(CloudError, RuntimeError):
    """The signer refused a release (the request or the version is wrong)."""


class SignerUnavailable(SignerError):
    """The release could not be done now (broker or signer away); asking again may work."""


def signer_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "signer"


def socket_path(data_dir: Path) -> Path:
    return signer_dir(data_dir) / "signer.sock"


def token_path(data_dir: Path) -> Path:
    return signer_dir(data_dir) / "token"


#: Longest path a Unix socket address holds (``sun_path`` is 108 bytes on Linux).
_SUN_PATH_MAX = 107


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """An address for the socket at ``path``, short enough for ``bind``/``connect``.

    A long data directory (a deep checkout, pytest's temporary directories) is reached
    through ``/proc/self/fd/N/`` of an open descriptor on the socket's directory.
    """
    if len(os.fsencode(str(path))) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class _Refused(Exception):
    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class ReleaseSigner:
    """Checks, signs, publishes and records releases; the key never leaves this object."""

    def __init__(self, settings: CloudSettings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self._key = signing.load_private_key(settings.signing.private_key)
        self._lock = threading.RLock()
        self._base = _BaseModel.load(settings)
        #: Test hook: called with the version right before its publish starts.
        self.before_publish: Callable[[int], None] | None = None
        from cloud.rollout import RolloutController

        #: Staged rollouts (``[rollout] policy = "staged"``); idle under "immediate".
        self.rollout = RolloutController(
            settings, registry, publisher=self._publisher, promote=self._promote
        )

    @property
    def key(self) -> Any:
        """The signing key, for other signatures this process makes (run approvals)."""
        return self._key

    def check(self, version: int) -> None:
        """Raise :class:`SignerError` unless ``version`` may be released now."""
        try:
            self._check(version)
        except _Refused as exc:
            raise (SignerUnavailable if exc.retry else SignerError)(str(exc)) from None

    def _check(self, version: int) -> None:
        from cloud.registry import ArtifactCorruptError, NotFoundError

        try:
            v = self.registry.get_version(version)
            data = self.registry.version_bytes(version)
        except NotFoundError as exc:
            raise _Refused(str(exc), retry=False) from None
        except ArtifactCorruptError as exc:
            raise _Refused(f"version {version}: {exc}", retry=False) from None
        latest = self.registry.latest_version()
        if latest is None or latest.version != version:
            raise _Refused(
                f"version {version} is not the newest in the registry "
                f"(newest: {None if latest is None else latest.version})",
                retry=False,
            )
        current = self.registry.current()
        if current is not None and version <= current.version:
            raise _Refused(
                f"version {version} is not newer than the fleet's version {current.version} "
                "(a rollback is a pin: `edgefl cloud model pin`)",
                retry=False,
            )
        run = self.registry.latest_run()
        if run is None or v.run_id != run.id or run.status != "running":
            raise _Refused(
                f"version {version} does not belong to the running run "
                f"(its run: {v.run_id}; newest run: "
                f"{None if run is None else f'{run.id}, {run.status}'})",
                retry=False,
            )
        problem = self._base.problem_with(data, v.architecture_id)
        if problem is not None:
            raise _Refused(f"version {version}: {problem}", retry=False)

    def release(self, version: int) -> int:
        """Check, sign, publish, then mark current; returns the release's sequence.

        Idempotent: releasing the version the fleet already serves returns its sequence.
        """
        from cloud.publisher import PublishError

        with self._lock:
            current = self.registry.current()
            if current is not None and current.version == version and not current.pinned:
                return current.sequence
            self.check(version)
            if not (self.rollout.staged and current is not None):
                return self._publish_release(version)
        # Staged: the version becomes a candidate; the controller runs its phases and
        # calls _promote when the last one passes; the round goes on at once. (Outside
        # our lock: the controller takes its own lock first, then ours in _promote.)
        try:
            return self.rollout.submit(version)
        except (PublishError, OSError, RuntimeError) as exc:
            raise SignerUnavailable(f"candidate {version} not published: {exc}") from exc

    def _promote(self, version: int) -> int:
        """Release ``version`` fleet-wide (the last phase of its rollout passed)."""
        from cloud.publisher import PublishError

        with self._lock:
            current = self.registry.current()
            if current is not None and current.version == version and not current.pinned:
                return current.sequence
            try:
                return self._publish_release(version)
            except SignerUnavailable:
                raise
            except (PublishError, OSError) as exc:
                raise SignerUnavailable(str(exc)) from exc

    def _publish_release(self, version: int) -> int:
        from cloud.publisher import PublishError
        from cloud.releases import publish_version

        with self._lock:
            if self.before_publish is not None:
                self.before_publish(version)
            try:
                with self._publisher() as publisher:
                    manifest = publish_version(self.registry, publisher, version, pinned=False)
            except (PublishError, OSError, RuntimeError) as exc:
                raise SignerUnavailable(f"version {version} not published: {exc}") from exc
            self._record(version, f"version {version} released (sequence {manifest.sequence})")
            return manifest.sequence

    def republish_current(self) -> int | None:
        """Publish the fleet's current version again; its new sequence (None: no release yet).

        For a broker that restarted: Mosquitto saves its retained messages every
        ``autosave_interval`` seconds, so one that was SIGKILLed can come back with an
        older release's retained manifest (and chunks), which a device starting up
        would take for the newest. Publishing the current version again puts its
        manifest and chunks back (and clears the older release's chunks); devices that
        already serve it only note the new sequence.
        """
        from cloud.publisher import PublishError
        from cloud.releases import publish_version

        with self._lock:
            current = self.registry.current()
            if current is None:
                return None
            try:
                with self._publisher() as publisher:
                    manifest = publish_version(
                        self.registry, publisher, current.version, pinned=current.pinned
                    )
            except (PublishError, OSError, RuntimeError) as exc:
                raise SignerUnavailable(
                    f"version {current.version} not republished: {exc}"
                ) from exc
            self._record(
                current.version,
                f"version {current.version} republished (sequence {manifest.sequence})",
                kind=REPUBLISHED_EVENT_KIND,
            )
            return manifest.sequence

    def _record(self, version: int, detail: str, *, kind: str = RELEASED_EVENT_KIND) -> None:
        from protos.codec import DeviceEvent

        try:
            self.registry.record_event(
                DeviceEvent(
                    device_id=EVENT_SOURCE,
                    timestamp_ms=int(time.time() * 1000),
                    kind=kind,
                    detail=detail,
                    version=version,
                )
            )
        except Exception:
            logger.exception("could not record the release of version %d", version)

    def pin(self, version: int) -> int:
        """Publish a stored version as a pin (the operator's rollback); returns its sequence."""
        from cloud.publisher import PublishError
        from cloud.releases import publish_version

        with self._lock:
            self.registry.get_version(version)  # NotFoundError before touching the broker
            try:
                with self._publisher() as publisher:
                    manifest = publish_version(self.registry, publisher, version, pinned=True)
            except (PublishError, OSError, RuntimeError) as exc:
                raise SignerUnavailable(f"version {version} not pinned: {exc}") from exc
            return manifest.sequence

    def _publisher(self) -> Any:
        from cloud.releases import make_publisher

        return make_publisher(self.settings, signing_key=self._key)


class _BaseModel:
    """What every release of this fleet must share with the base model."""

    def __init__(
        self, architecture_id: str, tflite: bytes, card_json: str, shapes: dict[str, Any]
    ) -> None:
        self.architecture_id = architecture_id
        self.tflite = tflite
        self.card_json = card_json
        self.shapes = shapes

    @classmethod
    def load(cls, settings: CloudSettings) -> _BaseModel:
        from cloud.releases import base_package

        arch, tflite, card_json = base_package(settings.model.dir)
        initial = settings.data_dir / "initial.pkg"
        shapes: dict[str, Any] = {}
        if initial.exists():
            pkg = codec.package_from_bytes(initial.read_bytes())
            shapes = {k: (np.asarray(v).shape, np.asarray(v).dtype) for k, v in pkg.weights.items()}
        return cls(arch, tflite, card_json, shapes)

    def problem_with(self, data: bytes, registered_arch: str) -> str | None:
        try:
            pkg = codec.package_from_bytes(data)
        except Exception as exc:  # any decoding problem is a refusal, never a crash
            return f"package does not decode: {exc}"
        if registered_arch != self.architecture_id or pkg.architecture_id != self.architecture_id:
            return (
                f"architecture {pkg.architecture_id!r} (registered {registered_arch!r}) is not "
                f"the fleet's {self.architecture_id!r}"
            )
        if pkg.tflite != self.tflite or pkg.card_json != self.card_json:
            return "model.tflite or card.json differ from the fleet's base model"
        if self.shapes:
            got = {k: (np.asarray(v).shape, np.asarray(v).dtype) for k, v in pkg.weights.items()}
            if got != self.shapes:
                return "weight names, shapes or dtypes differ from the base model's"
        for name, w in pkg.weights.items():
            arr = np.asarray(w)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                return f"weight {name!r} holds NaN or infinite values"
        return None


class _Handler(socketserver.StreamRequestHandler):
    server: _SignerServer

    def handle(self) -> None:
        self.connection.settimeout(REPLY_TIMEOUT_S)
        try:
            line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
        except OSError:
            return
        reply = self.server.answer(line)
        try:
            self.wfile.write(json.dumps(reply).encode() + b"\n")
        except OSError:
            logger.warning("signer: the client left before its reply")


class _SignerServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, address: str, signer: ReleaseSigner, token: str) -> None:
        self.signer = signer
        self.token = token
        super().__init__(address, _Handler)

    def answer(self, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_REQUEST_BYTES:
            return {"ok": False, "retry": False, "error": "request too long"}
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "retry": False, "error": "request is not a JSON object"}
        token = doc.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token, self.token):
            logger.warning("signer: request with a wrong token refused")
            return {"ok": False, "retry": False, "error": "wrong token"}
        version = doc.get("version")
        op = doc.get("op")
        if op in ROLLOUT_OPS:
            return self._rollout(op, version)
        if op != "release" or isinstance(version, bool) or not isinstance(version, int):
            return {
                "ok": False,
                "retry": False,
                "error": f"expected op 'release' (or one of {', '.join(ROLLOUT_OPS)}) "
                "and an integer version",
            }
        try:
            sequence = self.signer.release(version)
        except SignerUnavailable as exc:
            logger.warning("signer: %s (the ServerApp will ask again)", exc)
            return {"ok": False, "retry": True, "error": str(exc)}
        except SignerError as exc:
            logger.error("signer: release of version %d refused: %s", version, exc)
            return {"ok": False, "retry": False, "error": str(exc)}
        except Exception as exc:  # a bug must not kill the signer thread
            logger.exception("signer: release of version %d failed", version)
            return {"ok": False, "retry": True, "error": f"signer failed: {exc}"}
        return {"ok": True, "version": version, "sequence": sequence}

    def _rollout(self, op: str, version: Any) -> dict[str, Any]:
        """The operator's rollout actions (``edgefl cloud rollout …``)."""
        from cloud.rollout import RolloutError

        rollout = self.signer.rollout
        if op == "rollout-status":
            return {"ok": True, "status": rollout.status()}
        if isinstance(version, bool) or not isinstance(version, int):
            return {"ok": False, "retry": False, "error": f"{op} needs an integer version"}
        try:
            if op == "rollout-promote":
                sequence = rollout.promote(version)
                return {"ok": True, "version": version, "sequence": sequence}
            rollout.halt(version)
            return {"ok": True, "version": version}
        except RolloutError as exc:
            return {"ok": False, "retry": False, "error": str(exc)}
        except SignerUnavailable as exc:
            return {"ok": False, "retry": True, "error": str(exc)}
        except Exception as exc:  # the broker away, or a bug: the signer thread lives on
            logger.exception("signer: %s of version %d failed", op, version)
            return {"ok": False, "retry": True, "error": f"{op} failed: {exc}"}


class SignerService:
    """The Unix-socket server around a :class:`ReleaseSigner` (started by ``cloud up``)."""

    def __init__(self, settings: CloudSettings, registry: Registry) -> None:
        self.data_dir = settings.data_dir
        self.signer = ReleaseSigner(settings, registry)
        self._server: _SignerServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def socket_path(self) -> Path:
        return socket_path(self.data_dir)

    def start(self) -> SignerService:
        d = signer_dir(self.data_dir)
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        token = secrets.token_urlsafe(32)
        tmp = token_path(self.data_dir).with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        os.replace(tmp, token_path(self.data_dir))
        path = self.socket_path
        path.unlink(missing_ok=True)  # left by a killed predecessor (the data dir is ours)
        old_umask = os.umask(0o177)
        try:
            with _addressable(path) as address:
                self._server = _SignerServer(address, self.signer, token)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="signer",
            daemon=True,
        )
        self._thread.start()
        self.signer.rollout.start()
        logger.info("release signer listening on %s", path)
        return self

    def stop(self) -> None:
        self.signer.rollout.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.socket_path.unlink(missing_ok=True)


class SignerClient:
    """How the ServerApp asks the signer of the cloud in ``data_dir`` for a release."""

    def __init__(self, data_dir: Path, *, timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self.data_dir = Path(data_dir)
        self.timeout_s = timeout_s

    def release(self, version: int) -> int:
        """One attempt; returns the sequence, or raises SignerError / SignerUnavailable."""
        return int(self._ask({"op": "release", "version": version})["sequence"])

    def rollout(self, op: str, version: int | None = None) -> dict[str, Any]:
        """An operator's rollout action (one of :data:`ROLLOUT_OPS`); the reply object."""
        return self._ask({"op": op, "version": version})

    def _ask(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            token = token_path(self.data_dir).read_text().strip()
        except OSError as exc:
            raise SignerUnavailable(
                f"no signer token ({exc}): is `edgefl cloud up` running?"
            ) from exc
        request = json.dumps({"token": token, **body}).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout_s)
                with _addressable(socket_path(self.data_dir)) as address:
                    sock.connect(address)
                sock.sendall(request + b"\n")
                with sock.makefile("rb") as fh:
                    line = fh.readline(1024 * 1024)
        except OSError as exc:
            raise SignerUnavailable(f"cannot reach the release signer: {exc}") from exc
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise SignerUnavailable(f"the signer gave no reply ({line[:100]!r})") from exc
        if not isinstance(reply, dict):
            raise SignerUnavailable(f"the signer gave no reply ({line[:100]!r})")
        if reply.get("ok"):
            return reply
        error = str(reply.get("error", "unknown error"))
        if reply.get("retry"):
            raise SignerUnavailable(error)
        raise SignerError(error)

    def release_when_possible(self, version: int, *, wait_s: float) -> int:
        """Ask until the release is done: a broker or signer outage only delays it.

        Raises :class:`SignerError` at once when the signer refuses the version, and
        :class:`SignerUnavailable` when ``wait_s`` pass without a release.
        """
        deadline = time.monotonic() + wait_s
        delay = 1.0
        warned = False
        while True:
            try:
                return self.release(version)
            except SignerUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                if not warned:
                    logger.warning("version %d not released yet (%s); retrying", version, exc)
                    warned = True
                time.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)
