"""A secure fleet on the cloud side: PKI, broker access control and the device registry.

:func:`init_secure` lays out everything ``edgefl cloud init --secure`` needs under the
cloud's data directory (every secret mode 0600)::

    secure.json                  what is where (this module's SecureFleet, as JSON)
    pki/ca.pem, pki/ca.key       the fleet CA (devices trust ca.pem)
    pki/broker.pem, .key         Mosquitto's TLS server certificate
    pki/superlink.pem, .key      the Flower SuperLink's TLS server certificate
    mqtt/passwd                  Mosquitto password file (PBKDF2-SHA512 hashes)
    mqtt/acl                     Mosquitto ACL file, regenerated from the registry
    mqtt/cloud.password          the cloud's own MQTT password (user ``cloud``)
    keys/signing.pem, .pub       the fleet's model-signing key (kept if present)
    devices/registry.json        enrolled devices: profile, SuperNode key, node id, status

Access control: anonymous clients are refused (``allow_anonymous false``, and the ACL
grants nothing before its first ``user`` line). The ``cloud`` user may publish and read
release topics and read every device's status and event topics. Each device may
publish only its own status and event topics and read release topics; its lines are
derived from :func:`protos.topics.acl_device_pattern_lines`, so the topic layout lives
in one place.

Enrolling or revoking a device changes only that device's password line and ACL block
(other devices' lines are kept byte for byte) under a lock file, so concurrent
``flash``/``revoke`` commands cannot lose each other's updates. Mosquitto rereads both
files on SIGHUP without dropping connected clients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import secrets
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.broker import hash_password
from devices import pki
from devices.errors import DevicesError
from protos import signing, topics

logger = logging.getLogger(__name__)

#: File in the data directory that marks (and describes) a secure fleet.
MANIFEST_NAME = "secure.json"
#: The cloud's MQTT user name; no device may take it.
CLOUD_USER = "cloud"
#: Default MQTT-over-TLS port devices connect to.
DEFAULT_BROKER_TLS_PORT = 8883
#: Default SuperLink port devices connect to.
DEFAULT_SUPERLINK_PORT = 9092
#: Bytes of randomness in a generated MQTT password (URL-safe base64 text).
PASSWORD_BYTES = 24


class FleetError(DevicesError, RuntimeError):
    """A secure-fleet operation that cannot be done (missing setup, unknown device...)."""


def generate_password() -> str:
    """A random MQTT password (192 bits)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


@dataclass(frozen=True)
class SecureFleet:
    """Where a secure fleet's files are; every path is absolute."""

    data_dir: Path
    fleet: str
    hosts: tuple[str, ...]
    broker_port: int
    superlink_port: int
    ca_cert: Path
    ca_key: Path
    broker_certfile: Path
    broker_keyfile: Path
    superlink_certfile: Path
    superlink_keyfile: Path
    broker_password_file: Path
    acl_file: Path
    cloud_username: str
    cloud_password_file: Path
    signing_private_key: Path
    signing_public_key: Path
    registry_file: Path

    @property
    def manifest_path(self) -> Path:
        return self.data_dir / MANIFEST_NAME

    @property
    def lock_path(self) -> Path:
        return self.data_dir / ".fleet.lock"

    def cloud_password(self) -> str:
        return self.cloud_password_file.read_text().strip()

    def broker_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`cloud.broker.BrokerConfig` (TLS, passwords, ACL)."""
        return {
            "allow_anonymous": False,
            "password_file": self.broker_password_file,
            "acl_file": self.acl_file,
            "cafile": self.ca_cert,
            "certfile": self.broker_certfile,
            "keyfile": self.broker_keyfile,
        }

    def to_json(self) -> str:
        doc: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            doc[f.name] = value
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, data_dir: Path) -> SecureFleet:
        """Read ``data_dir/secure.json``; :class:`FleetError` if this is not a secure fleet."""
        path = Path(data_dir) / MANIFEST_NAME
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise FleetError(
                f"{data_dir} is not a secure fleet (no {MANIFEST_NAME}); "
                "create one with `edgefl cloud init --secure`"
            ) from exc
        except ValueError as exc:
            raise FleetError(f"{path} is not valid JSON: {exc}") from exc
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in doc:
                raise FleetError(f"{path}: missing {f.name!r}")
            value = doc[f.name]
            if f.type in ("Path", Path):
                value = Path(value)
            elif f.name == "hosts":
                value = tuple(value)
            values[f.name] = value
        return cls(**values)


def _layout(
    data_dir: Path,
    *,
    fleet: str,
    hosts: tuple[str, ...],
    broker_port: int,
    superlink_port: int,
    signing_private_key: Path | None,
    signing_public_key: Path | None,
) -> SecureFleet:
    d = data_dir
    return SecureFleet(
        data_dir=d,
        fleet=fleet,
        hosts=hosts,
        broker_port=broker_port,
        superlink_port=superlink_port,
        ca_cert=d / "pki" / "ca.pem",
        ca_key=d / "pki" / "ca.key",
        broker_certfile=d / "pki" / "broker.pem",
        broker_keyfile=d / "pki" / "broker.key",
        superlink_certfile=d / "pki" / "superlink.pem",
        superlink_keyfile=d / "pki" / "superlink.key",
        broker_password_file=d / "mqtt" / "passwd",
        acl_file=d / "mqtt" / "acl",
        cloud_username=CLOUD_USER,
        cloud_password_file=d / "mqtt" / "cloud.password",
        signing_private_key=(signing_private_key or d / "keys" / "signing.pem").resolve(),
        signing_public_key=(signing_public_key or d / "keys" / "signing.pub").resolve(),
        registry_file=d / "devices" / "registry.json",
    )


def init_secure(
    data_dir: Path,
    *,
    fleet: str,
    hosts: Sequence[str] = (),
    broker_port: int = DEFAULT_BROKER_TLS_PORT,
    superlink_port: int = DEFAULT_SUPERLINK_PORT,
    signing_private_key: Path | None = None,
    signing_public_key: Path | None = None,
) -> SecureFleet:
    """Create (or complete) a secure fleet under ``data_dir`` and return where things are.

    Safe to run again: the CA, the signing key, the cloud's password and every enrolled
    device are kept, so no device needs re-flashing. Server certificates are reissued
    from the same CA when ``hosts`` names a host they do not cover. ``hosts`` are the
    names or addresses devices use to reach the cloud (``localhost`` and ``127.0.0.1``
    are always included).
    """
    topics.check_name(fleet, what="fleet")
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    previous: SecureFleet | None = None
    if (data_dir / MANIFEST_NAME).exists():
        previous = SecureFleet.load(data_dir)
        if previous.fleet != fleet:
            raise FleetError(
                f"{data_dir} already holds the secure fleet {previous.fleet!r}; "
                f"refusing to turn it into {fleet!r}"
            )
    all_hosts = tuple(dict.fromkeys([*(previous.hosts if previous else ()), *hosts]))
    for host in all_hosts:
        pki.check_host(host)
    sf = _layout(
        data_dir,
        fleet=fleet,
        hosts=all_hosts,
        broker_port=broker_port,
        superlink_port=superlink_port,
        signing_private_key=signing_private_key
        or (previous.signing_private_key if previous else None),
        signing_public_key=signing_public_key
        or (previous.signing_public_key if previous else None),
    )
    with _locked(sf):
        _ensure_ca(sf)
        ca_cert = pki.load_certificate(sf.ca_cert)
        ca_key = pki.load_private_key(sf.ca_key)
        for role, certfile, keyfile in (
            ("broker", sf.broker_certfile, sf.broker_keyfile),
            ("superlink", sf.superlink_certfile, sf.superlink_keyfile),
        ):
            if certfile.exists() and keyfile.exists():
                current = pki.load_certificate(certfile)
                if all(pki.covers_host(current, h) for h in all_hosts):
                    continue
            cert, key = pki.issue_server_certificate(
                ca_cert, ca_key, common_name=f"edgefl-{fleet}-{role}", hosts=all_hosts
            )
            pki.write_private_key(keyfile, key)
            pki.write_certificate(certfile, cert)
            logger.info("issued the %s certificate for %s", role, ", ".join(all_hosts))
        _ensure_signing_key(sf)
        if not sf.cloud_password_file.exists():
            pki.write_secret(sf.cloud_password_file, (generate_password() + "\n").encode())
        users = _read_password_lines(sf.broker_password_file)
        if CLOUD_USER not in users:
            users[CLOUD_USER] = f"{CLOUD_USER}:{hash_password(sf.cloud_password())}"
            _write_password_lines(sf.broker_password_file, users)
        registry = _read_registry(sf)
        _write_registry(sf, registry)
        _write_acl(sf, registry)
        pki.write_public(sf.manifest_path, sf.to_json().encode())
    return sf


def _ensure_ca(sf: SecureFleet) -> None:
    if sf.ca_cert.exists() and sf.ca_key.exists():
        return
    if sf.ca_cert.exists() or sf.ca_key.exists():
        raise FleetError(
            f"half a CA in {sf.ca_cert.parent}: restore the missing file rather than "
            "replace the CA (every device trusts it)"
        )
    cert, key = pki.create_ca(f"edgefl fleet {sf.fleet} CA")
    pki.write_private_key(sf.ca_key, key)
    pki.write_certificate(sf.ca_cert, cert)
    logger.info("created the fleet CA %s", sf.ca_cert)


def _ensure_signing_key(sf: SecureFleet) -> None:
    if sf.signing_private_key.exists():
        if not sf.signing_public_key.exists():
            key = signing.load_private_key(sf.signing_private_key)
            signing.write_public_key(key.public_key(), sf.signing_public_key)
        return
    key = signing.generate_private_key()
    signing.write_private_key(key, sf.signing_private_key)
    signing.write_public_key(key.public_key(), sf.signing_public_key)


# -- locking ---------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(sf: SecureFleet) -> Iterator[None]:
    sf.lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(sf.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# -- Mosquitto password and ACL files --------------------------------------------------


def _read_password_lines(path: Path) -> dict[str, str]:
    """``{user: the line as written}``, in file order."""
    users: dict[str, str] = {}
    if not path.exists():
        return users
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        user, sep, _ = line.partition(":")
        if sep:
            users[user] = line
    return users


def _write_password_lines(path: Path, users: dict[str, str]) -> None:
    pki.write_secret(path, ("\n".join(users.values()) + "\n").encode())


def device_acl_lines(fleet: str, device: str) -> list[str]:
    """The ACL block of one device: its own status/event topics (write), releases (read)."""
    topics.check_name(device, what="device id")
    lines = [f"user {device}"]
    for pattern in topics.acl_device_pattern_lines(fleet):
        # "pattern write edgefl/F/device/%u/status" -> "topic write edgefl/F/device/D/status"
        _, access, topic = pattern.split(" ", 2)
        lines.append(f"topic {access} {topic.replace('%u', device)}")
    return lines


def cloud_acl_lines(fleet: str, user: str = CLOUD_USER) -> list[str]:
    """The cloud's ACL block: publish and read releases, read every device's reports."""
    release_filter = next(
        line.split(" ", 2)[2]
        for line in topics.acl_device_pattern_lines(fleet)
        if "/release/" in line
    )
    return [
        f"user {user}",
        f"topic readwrite {release_filter}",
        f"topic read {topics.all_device_status_filter(fleet)}",
        f"topic read {topics.all_device_event_filter(fleet)}",
    ]


def render_acl(fleet: str, devices: Sequence[str], *, cloud_user: str = CLOUD_USER) -> str:
    """The whole ACL file: nothing for anonymous clients, the cloud, then each device."""
    blocks = [
        [
            "# Generated by edgefl (devices/secure_fleet.py); regenerated on every enrol/revoke.",
            "# No topic line precedes the first `user` line: anonymous clients get nothing.",
        ],
        cloud_acl_lines(fleet, cloud_user),
    ]
    blocks += [device_acl_lines(fleet, name) for name in sorted(devices)]
    return "\n\n".join("\n".join(block) for block in blocks) + "\n"


def _write_acl(sf: SecureFleet, registry: dict[str, DeviceRecord]) -> None:
    active = [name for name, rec in registry.items() if rec.status == ACTIVE]
    pki.write_secret(
        sf.acl_file, render_acl(sf.fleet, active, cloud_user=sf.cloud_username).encode()
    )


# -- device registry -------------------------------------------------------------------

ACTIVE = "active"
REVOKED = "revoked"


@dataclass
class DeviceRecord:
    """One device the cloud has enrolled (``devices/registry.json``)."""

    name: str
    profile: str
    status: str = ACTIVE
    enrolled_at: str = ""
    revoked_at: str | None = None
    #: OpenSSH public key of the SuperNode (None for devices that do not train).
    supernode_public_key: str | None = None
    #: SHA-256 of that key, for display.
    fingerprint: str | None = None
    #: Node id the SuperLink gave the key at registration (None until registered).
    node_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _read_registry(sf: SecureFleet) -> dict[str, DeviceRecord]:
    if not sf.registry_file.exists():
        return {}
    try:
        doc = json.loads(sf.registry_file.read_text())
    except ValueError as exc:
        raise FleetError(f"{sf.registry_file} is not valid JSON: {exc}") from exc
    known = {f.name for f in dataclasses.fields(DeviceRecord)}
    return {
        name: DeviceRecord(**{k: v for k, v in rec.items() if k in known})
        for name, rec in doc.get("devices", {}).items()
    }


def _write_registry(sf: SecureFleet, registry: dict[str, DeviceRecord]) -> None:
    doc = {
        "fleet": sf.fleet,
        "devices": {name: dataclasses.asdict(rec) for name, rec in sorted(registry.items())},
    }
    pki.write_public(sf.registry_file, (json.dumps(doc, indent=2) + "\n").encode())


def read_registry(sf: SecureFleet) -> dict[str, DeviceRecord]:
    """Every device ever enrolled (active and revoked), by name."""
    return _read_registry(sf)


@dataclass(frozen=True)
class Enrolment:
    """What :func:`enroll_device` changed, so that :func:`undo_enrolment` can put it back."""

    record: DeviceRecord
    #: The active record of the same name it replaced (``force``), else None.
    replaced: DeviceRecord | None
    #: The registry entry before (active or revoked), else None.
    previous: DeviceRecord | None
    #: The password-file line before, else None.
    previous_password_line: str | None


def enroll_device(
    sf: SecureFleet,
    name: str,
    *,
    profile: str,
    mqtt_password: str,
    supernode_public_key: bytes | None,
    force: bool = False,
) -> Enrolment:
    """Add (or with ``force`` replace) a device's broker credentials, ACL block and record.

    Other devices' password lines and ACL blocks are left exactly as they were. A
    revoked name may be enrolled again without ``force`` (it gets a new identity).
    """
    topics.check_name(name, what="device id")
    if name == sf.cloud_username:
        raise FleetError(f"{name!r} is reserved for the cloud's own MQTT user")
    with _locked(sf):
        registry = _read_registry(sf)
        previous = registry.get(name)
        replaced = previous if previous is not None and previous.status == ACTIVE else None
        if replaced is not None and not force:
            raise FleetError(
                f"device {name!r} is already enrolled in fleet {sf.fleet!r} "
                f"(since {replaced.enrolled_at}); flashing it again replaces its identity "
                "and locks out the device that holds it. Re-run with --force, or revoke it "
                f"first with `edgefl devices revoke {name}`."
            )
        key_text = supernode_public_key.decode().strip() if supernode_public_key else None
        record = DeviceRecord(
            name=name,
            profile=profile,
            enrolled_at=_now(),
            supernode_public_key=key_text,
            fingerprint=pki.public_key_fingerprint(supernode_public_key)
            if supernode_public_key
            else None,
        )
        users = _read_password_lines(sf.broker_password_file)
        previous_line = users.get(name)
        users[name] = f"{name}:{hash_password(mqtt_password)}"
        _write_password_lines(sf.broker_password_file, users)
        registry[name] = record
        _write_registry(sf, registry)
        _write_acl(sf, registry)
    logger.info("enrolled device %s (profile %s) in fleet %s", name, profile, sf.fleet)
    return Enrolment(record, replaced, previous, previous_line)


def undo_enrolment(sf: SecureFleet, enrolment: Enrolment) -> None:
    """Put the registry, password and ACL files back as they were before ``enrolment``."""
    name = enrolment.record.name
    with _locked(sf):
        registry = _read_registry(sf)
        users = _read_password_lines(sf.broker_password_file)
        if enrolment.previous is None:
            registry.pop(name, None)
        else:
            registry[name] = enrolment.previous
        if enrolment.previous_password_line is None:
            users.pop(name, None)
        else:
            users[name] = enrolment.previous_password_line
        _write_password_lines(sf.broker_password_file, users)
        _write_registry(sf, registry)
        _write_acl(sf, registry)


def set_node_id(sf: SecureFleet, name: str, node_id: str | None) -> None:
    """Record the SuperLink node id a device's key was registered under."""
    with _locked(sf):
        registry = _read_registry(sf)
        if name not in registry:
            raise FleetError(f"no device {name!r} in fleet {sf.fleet!r}")
        registry[name].node_id = node_id
        _write_registry(sf, registry)


def revoke_device(sf: SecureFleet, name: str) -> DeviceRecord:
    """Remove a device's password line and ACL block and mark it revoked.

    Returns the record as it was before (its ``node_id`` is what to unregister).
    """
    with _locked(sf):
        registry = _read_registry(sf)
        record = registry.get(name)
        if record is None:
            raise FleetError(f"no device {name!r} in fleet {sf.fleet!r}")
        if record.status == REVOKED:
            raise FleetError(f"device {name!r} was already revoked at {record.revoked_at}")
        before = dataclasses.replace(record)
        record.status = REVOKED
        record.revoked_at = _now()
        users = _read_password_lines(sf.broker_password_file)
        users.pop(name, None)
        _write_password_lines(sf.broker_password_file, users)
        _write_registry(sf, registry)
        _write_acl(sf, registry)
    logger.info("revoked device %s in fleet %s", name, sf.fleet)
    return before


def sync_supernode_registrations(
    sf: SecureFleet,
    *,
    register: Callable[[Path], str],
    unregister: Callable[[str], None],
) -> dict[str, str | None]:
    """Bring a running SuperLink in line with the registry (for ``cloud up``).

    Registers the key of every active device that has no node id yet and unregisters
    every revoked device that still has one. Returns ``{device: node id or None}`` for
    the devices it changed.
    """
    changed: dict[str, str | None] = {}
    for name, record in read_registry(sf).items():
        if record.status == ACTIVE and record.supernode_public_key and not record.node_id:
            key_path = sf.data_dir / "devices" / f".{name}.pub"
            pki.write_public(key_path, (record.supernode_public_key + "\n").encode())
            try:
                node_id = register(key_path)
            finally:
                key_path.unlink(missing_ok=True)
            set_node_id(sf, name, node_id)
            changed[name] = node_id
        elif record.status == REVOKED and record.node_id:
            unregister(record.node_id)
            set_node_id(sf, name, None)
            changed[name] = None
    return changed


# -- the running broker ----------------------------------------------------------------


def broker_pid_file(data_dir: Path) -> Path:
    """Where ``edgefl cloud up`` records the managed Mosquitto's PID."""
    return Path(data_dir) / "broker" / "mosquitto.pid"


def reload_broker_from_pid_file(data_dir: Path) -> bool:
    """SIGHUP the managed Mosquitto named by its PID file; False if none is running."""
    path = broker_pid_file(data_dir)
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return False
    try:
        with open(f"/proc/{pid}/comm") as fh:
            if "mosquitto" not in fh.read():
                logger.warning("stale broker PID file %s (pid %d is not mosquitto)", path, pid)
                return False
        os.kill(pid, signal.SIGHUP)
    except (OSError, ProcessLookupError):
        return False
    logger.info("asked mosquitto (pid %d) to reload its password and ACL files", pid)
    return True


# -- the running SuperLink -------------------------------------------------------------


def superlink_port_file(data_dir: Path) -> Path:
    """Where ``edgefl cloud up`` records the SuperLink's port."""
    return Path(data_dir) / "superlink.port"


def running_superlink(sf: SecureFleet, *, host: str = "127.0.0.1") -> Any | None:
    """A handle on the fleet's running SuperLink for ``flwr`` CLI calls, or None.

    The port comes from ``data_dir/superlink.port``, which ``edgefl cloud up`` writes;
    without that file, or when nothing listens on the port, None.
    """
    from edge.flower_node import SuperLink, SuperLinkTLS, write_flwr_config
    from edge.process import port_open

    try:
        port = int(superlink_port_file(sf.data_dir).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if not port_open(host, port):
        return None
    link = SuperLink(
        data_dir=sf.data_dir / "superlink-control",
        host=host,
        port=port,
        tls=SuperLinkTLS(sf.superlink_certfile, sf.superlink_keyfile, sf.ca_cert),
        enable_supernode_auth=True,
    )
    write_flwr_config(link.flwr_home, address=link.address, root_certificates=sf.ca_cert)
    return link


def unregister_supernode(link: Any, node_id: str) -> None:
    """``flwr supernode unregister NODE_ID``: the SuperLink refuses that key from now on."""
    link.unregister_supernode(node_id)
