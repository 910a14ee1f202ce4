"""Eclipse Mosquitto: configuration files, password hashing and the broker process.

edgefl does not embed a broker; it writes a Mosquitto configuration and runs the
``mosquitto`` binary (Debian package ``mosquitto``). The same code serves the demo,
``edgefl cloud up`` and the test fixtures.

Retained messages (the current release, its chunks, device status) survive a broker
restart because persistence is on by default.

Limits that hold against whoever may publish (#15):

* **Payload size.** ``message_size_limit`` (default :data:`DEFAULT_MESSAGE_SIZE_LIMIT`,
  raised to fit the release chunk size by :func:`message_size_limit_for`) applies to
  every topic: a larger PUBLISH is dropped, not forwarded and not retained (Mosquitto
  2.0.11 also closes its sender's connection). Mosquitto 2.0 has no per-topic limit; the smaller
  limit for device reports is enforced where they are consumed
  (:data:`cloud.fleet_monitor.MAX_REPORT_BYTES`).
* **Client id bound to the user name** (``bind_client_id``, secure fleets): Mosquitto's
  per-listener ``use_username_as_clientid`` replaces every client id with the login's
  user name, so one device's credentials can never take over another device's session
  (which would fire that device's Last Will). The cloud's own clients share one user and
  connect to a second listener on loopback (``local_port``) that does not rename them.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cloud.bridge import BridgeConfig
from cloud.errors import CloudError
from edge.process import ManagedProcess, ProcessError, free_port

logger = logging.getLogger(__name__)

#: PBKDF2 iterations Mosquitto 2.x uses for its ``$7$`` password hashes.
PBKDF2_ITERATIONS = 101
#: QoS 1 messages Mosquitto queues per client beyond those in flight (its own default is 1000).
#: The cloud's fleet monitor receives about four messages per device for every release
#: (statuses and the install event) at once; above the limit Mosquitto drops them, logging
#: only "Outgoing messages are being dropped". A queued message is a reference to one
#: stored copy, so a large limit costs little memory.
DEFAULT_MAX_QUEUED_MESSAGES = 1_000_000
#: QoS 1 messages Mosquitto sends a client before waiting for its PUBACKs (its default: 20).
#: With 20, a subscriber's throughput is 20 messages per round trip: the fleet monitor
#: got ~300 statuses/s on a loaded 2-core machine while 10,000 devices sent 2,000/s
#: (benchmarks/bench_telemetry.py), and the rest piled up in the broker.
DEFAULT_MAX_INFLIGHT_MESSAGES = 1000
#: Largest PUBLISH payload by default (bytes): a release chunk (128 KiB by default) and a
#: manifest fit many times over; a 10 MB payload on any topic is dropped.
DEFAULT_MESSAGE_SIZE_LIMIT = 1024 * 1024
#: Room above the chunk size for the largest message (a manifest with many chunk digests).
MESSAGE_SIZE_MARGIN = 64 * 1024


def message_size_limit_for(chunk_size: int) -> int:
    """The broker's payload limit for releases cut in ``chunk_size`` chunks."""
    return max(DEFAULT_MESSAGE_SIZE_LIMIT, chunk_size + MESSAGE_SIZE_MARGIN)


class BrokerError(CloudError, RuntimeError):
    """Mosquitto is missing, misconfigured or did not start."""


def mosquitto_binary() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError(
        "the mosquitto binary was not found; install it with `sudo apt-get install mosquitto`"
    )


def mosquitto_version(binary: str | None = None) -> str:
    """The version Mosquitto reports (e.g. ``2.0.11``)."""
    out = subprocess.run(
        [binary or mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=10
    ).stdout
    match = re.search(r"mosquitto version (\S+)", out)
    if not match:
        raise BrokerError(f"cannot read the mosquitto version from: {out[:200]!r}")
    return match.group(1)


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A Mosquitto 2.x password-file hash (``$7$``: PBKDF2-SHA512)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def write_private(path: Path, text: str) -> None:
    """Write atomically, readable only by the owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_password_file(path: Path, users: dict[str, str]) -> None:
    """Write ``user:hash`` lines for ``{user: plaintext password}``."""
    lines = [f"{user}:{hash_password(pw)}" for user, pw in sorted(users.items())]
    write_private(path, "\n".join(lines) + "\n")


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


@dataclass
class BrokerConfig:
    """What goes into a generated ``mosquitto.conf``."""

    port: int
    host: str = "127.0.0.1"
    data_dir: Path = field(default_factory=lambda: Path("mosquitto"))
    allow_anonymous: bool = True
    password_file: Path | None = None
    acl_file: Path | None = None
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    persistence: bool = True
    #: Largest PUBLISH payload the broker accepts, on every topic (0 = no limit).
    message_size_limit: int = DEFAULT_MESSAGE_SIZE_LIMIT
    #: QoS 1 messages queued per client beyond those in flight (Mosquitto ``max_queued_messages``).
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES
    #: QoS 1 messages in flight per client (Mosquitto ``max_inflight_messages``).
    max_inflight_messages: int = DEFAULT_MAX_INFLIGHT_MESSAGES
    #: Seconds between updates of the ``$SYS/broker/...`` statistics topics (Mosquitto's default).
    sys_interval: int = 10
    #: Bridges to the cloud broker (a regional broker's; see :mod:`cloud.bridge`).
    bridges: tuple[BridgeConfig, ...] = ()
    #: On the main listener, replace each client id with the user name
    #: (``use_username_as_clientid``): needs every client to log in (secure fleets).
    bind_client_id: bool = False
    #: A second, plain-TCP listener on 127.0.0.1 for the cloud's own clients, which does
    #: not rename client ids (0 = none). Same users and ACL as the main listener.
    local_port: int = 0

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    def render(
        self, header: str = "Generated by edgefl; edit the edgefl configuration instead."
    ) -> str:
        """The ``mosquitto.conf`` text, starting with ``header`` as a comment."""
        lines = [
            f"# {header}",
            "per_listener_settings false",
            # Run as whoever started us: as root, Mosquitto would otherwise switch to the
            # `mosquitto` user and lose access to our data directory.
            f"user {_current_user()}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"listener {self.port} {self.host}",
        ]
        if self.tls:
            if self.keyfile is None:
                raise BrokerError("TLS needs both certfile and keyfile")
            lines += [f"certfile {self.certfile}", f"keyfile {self.keyfile}"]
            if self.cafile is not None:
                lines.append(f"cafile {self.cafile}")
            lines.append("tls_version tlsv1.2")
        if self.bind_client_id:
            if self.allow_anonymous:
                raise BrokerError("bind_client_id needs allow_anonymous false (a user name)")
            lines.append("use_username_as_clientid true")
        if self.local_port:
            lines.append(f"listener {self.local_port} 127.0.0.1")
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.data_dir}/",
                "autosave_interval 2",
            ]
        if self.message_size_limit:
            lines.append(f"message_size_limit {self.message_size_limit}")
        lines.append(f"max_queued_messages {self.max_queued_messages}")
        lines.append(f"max_inflight_messages {self.max_inflight_messages}")
        lines.append(f"sys_interval {self.sys_interval}")
        lines += [
            f"log_dest file {self.data_dir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
        ]
        for bridge in self.bridges:
            lines += ["", *bridge.render_lines()]
        lines.append("")
        return "\n".join(lines)


class Broker:
    """A running Mosquitto process for one :class:`BrokerConfig`.

    With ``conf_text`` (a ``mosquitto.conf`` written elsewhere, e.g. by ``edgefl cloud
    bridge-config``), Mosquitto runs that file instead of ``config.render()``; ``config``
    still says where it listens and where its data directory (and log) is.
    """

    def __init__(self, config: BrokerConfig, *, conf_text: str | None = None) -> None:
        self.config = config
        self.conf_text = conf_text
        self.conf_path = config.data_dir / "mosquitto.conf"
        self.process: ManagedProcess | None = None

    @classmethod
    def on_free_port(cls, data_dir: Path, **kwargs: object) -> Broker:
        return cls(BrokerConfig(port=free_port(), data_dir=data_dir, **kwargs))  # type: ignore[arg-type]

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def log_path(self) -> Path:
        return self.config.data_dir / "mosquitto.log"

    def start(self, *, timeout: float = 15.0) -> Broker:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        text = self.config.render() if self.conf_text is None else self.conf_text
        write_private(self.conf_path, text)  # may hold a bridge password
        self.process = ManagedProcess(
            "mosquitto",
            [mosquitto_binary(), "-c", str(self.conf_path)],
            log_path=self.config.data_dir / "stdout.log",
        )
        # Held before it starts: an interrupt right after the fork still finds it to stop.
        self.process.start()
        try:
            # Something listening is not enough: another process may hold the port while
            # our Mosquitto exits with "Address already in use". Wait for it to say it runs.
            self.process.wait_until(self._running, timeout=timeout, what="running")
            self.process.wait_for_port(self.config.host, self.config.port, timeout=timeout)
        except ProcessError as exc:
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            self.process.stop()
            # One line for the operator (Mosquitto's own error, if it gave one); the whole
            # log only with `edgefl -v`, and in the file.
            logger.info("mosquitto log %s:\n%s", self.log_path, log[-4000:])
            errors = [line for line in log.splitlines() if "Error" in line]
            why = errors[-1].split(": ", 1)[-1] if errors else str(exc).splitlines()[0]
            raise BrokerError(f"mosquitto did not start: {why} (log: {self.log_path})") from exc
        logger.info("mosquitto listening on %s:%d (pid %d)", self.host, self.port, self.process.pid)
        return self

    def _running(self) -> bool:
        try:
            log = self.log_path.read_text(errors="replace")
        except OSError:
            return False
        return f"port {self.config.port}" in log and " running" in log

    def reload(self) -> None:
        """SIGHUP: Mosquitto rereads its password and ACL files; clients stay connected."""
        if self.process is None or not self.process.alive():
            raise BrokerError("broker is not running")
        self.process.signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def restart(self, *, timeout: float = 15.0) -> None:
        self.stop()
        self.start(timeout=timeout)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
