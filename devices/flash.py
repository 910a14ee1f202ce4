"""Flash one device: make its identity and bundle, and enrol it with the cloud.

``edgefl devices flash --profile P --name NAME --cloud HOST (--boot DIR | --out FILE)``
writes a **bundle**, the directory ``edgefl/`` that a device boots from::

    edgefl/README.md                 what to do with it (for the operator)
    edgefl/edge.toml                 the device's settings (paths relative to the bundle)
    edgefl/identity.json             device id, fleet, profile, key fingerprint, software
    edgefl/secrets/mqtt.password     its own broker password            (mode 0600)
    edgefl/secrets/supernode.key     its SuperNode ECDSA key (OpenSSH)  (mode 0600)
    edgefl/supernode.pub             the matching public key
    edgefl/trust/ca.pem              the fleet CA (broker + SuperLink certificates)
    edgefl/trust/signing.pub         the fleet's model-signing key
    edgefl/model/initial.pkg         the initial model package, when the cloud has one
    edgefl/software/edgefl_fleet-V-py3-none-any.whl   the exact edgefl that flashed it
    edgefl/software/constraints.txt  every dependency pinned
    edgefl/wheels/*.whl              with --wheelhouse: every dependency (offline install)
    edgefl/systemd/edgefl-edge.service
    edgefl/systemd/edgefl-provision.service   retries provisioning until it succeeded
    edgefl/cloud-init/user-data      #cloud-config: packages, user, starts provisioning
    edgefl/provision.sh              installs the wheel by path, verifies it, enables the unit

A boot partition is usually FAT, where file modes mean nothing: ``provision.sh``
copies the bundle to ``/etc/edgefl`` (root:edgefl, secrets 0640) and deletes the
secrets from the boot partition only once the installed software verified. It runs
as ``edgefl-provision.service``, a oneshot that runs at every boot (and again every
minute while booted) until it has succeeded once; its state is in
``/var/lib/edgefl-provision/status``. Devices that do not train (profiles with
``training.enabled = false``) get no SuperNode key and no ``[flower]`` section.

Writes are atomic: into ``--boot DIR`` through a temporary directory renamed to
``DIR/edgefl``; into ``--out FILE.tar.gz`` through a temporary file renamed over it.
Secrets are created 0600 and stay 0600 inside the tarball. The cloud side
(:mod:`devices.secure_fleet`) gets the device's password line, ACL block and registry
record; nothing of another device changes. An existing identity is replaced only
with ``force``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from devices import pki, software
from devices.profiles import Profile, load_profile
from devices.secure_fleet import (
    ACTIVE,
    FleetError,
    SecureFleet,
    enroll_device,
    generate_password,
    read_registry,
    set_node_id,
    undo_enrolment,
)
from protos import topics

logger = logging.getLogger(__name__)

#: Name of the bundle directory (on the boot partition and inside the tarball).
BUNDLE_NAME = "edgefl"
#: Where provision.sh installs the bundle on the device.
INSTALL_DIR = "/etc/edgefl"
#: The device's state directory (systemd StateDirectory).
STATE_DIR = "/var/lib/edgefl"
#: The virtualenv edgefl-fleet[edge] is installed into.
VENV_DIR = "/opt/edgefl/venv"
#: The systemd unit that runs the edge node (gRPC services, agent, SuperNode).
SERVICE_NAME = "edgefl-edge.service"
#: The oneshot unit that provisions the device, retried until it succeeded once.
PROVISION_SERVICE = "edgefl-provision.service"
#: Where provisioning keeps its state (``status``: one line; ``done``: the version).
PROVISION_STATE_DIR = "/var/lib/edgefl-provision"
#: Seconds between provisioning attempts while the device is up.
PROVISION_RETRY_S = 60
#: File in the cloud data directory holding the model package new devices start with.
INITIAL_PACKAGE_NAME = "initial.pkg"
#: First lines of files edgefl writes to a boot partition (to recognise its own).
USER_DATA_MARKER = "# edgefl-managed"
#: Suffix of the copy of an image's own ``user-data`` that a merge keeps.
ORIGINAL_SUFFIX = ".edgefl-orig"


class FlashError(FleetError):
    """A flash that cannot be done: existing identity, unknown host, bad output path."""


@dataclass(frozen=True)
class BundleFile:
    """One file of a bundle: its bytes and mode."""

    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class FlashResult:
    """What :func:`flash` made."""

    name: str
    fleet: str
    profile: str
    #: The bundle directory (``--boot``) or the tarball (``--out``).
    bundle: Path
    #: Bundle-relative paths of every file written.
    files: tuple[str, ...]
    #: SuperLink node id of the device's key, when it was registered at flash time.
    node_id: str | None = None
    #: Whether a running broker was asked to reload its password and ACL files.
    broker_reloaded: bool = False
    #: Whether an older identity of the same name was replaced (``force``).
    replaced: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


def resolve_cloud_data_dir(cloud_dir: Path) -> Path:
    """The secure fleet's data directory from either that directory or one with cloud.toml."""
    cloud_dir = Path(cloud_dir)
    if (cloud_dir / "secure.json").exists():
        return cloud_dir.resolve()
    if (cloud_dir / "cloud.toml").exists():
        from cloud.config import load

        data_dir = load(cloud_dir / "cloud.toml").data_dir
        if (data_dir / "secure.json").exists():
            return data_dir
        raise FlashError(
            f"the cloud in {cloud_dir} is not a secure fleet: flashing needs "
            "`edgefl cloud init --secure` (certificates, broker passwords and ACL)"
        )
    raise FlashError(
        f"{cloud_dir} holds neither cloud.toml nor a secure fleet; pass --cloud-dir "
        "(the directory of cloud.toml) or create one with `edgefl cloud init --secure`"
    )


def fleet_floor(data_dir: Path) -> int:
    """The sequence of the release the fleet serves now (0 before the first).

    A device flashed with it as ``[trust] min_sequence`` refuses any older release, even
    after losing its data directory. Read from the cloud's default registry
    (``data_dir/registry.db``); a cloud on another database gives 0 (no floor).
    """
    db = data_dir / "registry.db"
    if not db.exists():
        return 0
    from cloud.registry import Registry, sqlite_url

    with Registry(sqlite_url(db)) as registry:
        current = registry.current()
    return 0 if current is None else current.sequence


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- rendering ---------------------------------------------------------------------------


def render_edge_toml(
    *,
    sf: SecureFleet,
    profile: Profile,
    name: str,
    cloud_host: str,
    has_model: bool,
) -> str:
    """The device's ``edge.toml``; relative paths resolve against the bundle directory."""
    from edge import config as edge_config

    settings = edge_config.Settings(
        device=edge_config.DeviceSettings(
            id=name, fleet=sf.fleet, profile=profile.name, data_dir=Path(STATE_DIR)
        ),
        grpc=edge_config.GrpcSettings(
            host="127.0.0.1",
            port=profile.ports.grpc,
            serving_threads=profile.litert.serving_threads,
        ),
        litert=edge_config.LiteRTSettings(
            threads=profile.litert.threads, delegate=profile.litert.delegate
        ),
        training=edge_config.TrainingSettings(epochs=profile.training.epochs),
        data=edge_config.DataSettings(
            capacity=profile.data.cap_samples, max_mb=profile.data.cap_mb
        ),
        mqtt=edge_config.MqttSettings(
            host=cloud_host,
            port=sf.broker_port,
            username=name,
            password_file=Path("secrets/mqtt.password"),
            ca_file=Path("trust/ca.pem"),
        ),
        trust=edge_config.TrustSettings(
            signing_public_key=Path("trust/signing.pub"),
            min_sequence=fleet_floor(sf.data_dir),
        ),
        model=edge_config.ModelSettings(
            initial_package=Path("model/initial.pkg") if has_model else None
        ),
        flower=edge_config.FlowerSettings(
            superlink=_hostport(cloud_host, sf.superlink_port),
            root_certificates=Path("trust/ca.pem"),
            auth_private_key=Path("secrets/supernode.key"),
            port=profile.ports.supernode,
        )
        if profile.training.enabled
        else None,
    )
    return edge_config.render_settings(
        settings,
        header=(
            f"Generated by `edgefl devices flash` for device {name} (profile {profile.name}).\n"
            "Paths are relative to this file's directory. The secrets it names are mode 0600."
        ),
    )


def render_service_unit(profile: Profile) -> str:
    """``edgefl-edge.service``: the edge node under systemd, hardened."""
    roles = (
        "inference, training, model updates"
        if profile.training.enabled
        else "inference, model updates"
    )
    return f"""\
# Generated by `edgefl devices flash` (profile {profile.name}).
[Unit]
Description=edgefl edge node ({roles})
Documentation=file:{INSTALL_DIR}/README.md
Wants=network-online.target
After=network-online.target time-sync.target

[Service]
Type=simple
User=edgefl
Group=edgefl
Environment=PYTHONUNBUFFERED=1
Environment=FLWR_TELEMETRY_ENABLED=0
Environment=FLWR_HOME={STATE_DIR}/flwr-home
ExecStart={VENV_DIR}/bin/edgefl edge up --config {INSTALL_DIR}/edge.toml
Restart=on-failure
RestartSec=5
TimeoutStopSec=30
KillMode=mixed
# Hardening: a read-only system except the state directory.
StateDirectory=edgefl
StateDirectoryMode=0700
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
CapabilityBoundingSet=

[Install]
WantedBy=multi-user.target
"""


def render_provision_unit(profile: Profile) -> str:
    """``edgefl-provision.service``: provisioning, at every boot until it succeeded once."""
    return f"""\
# Generated by `edgefl devices flash` (profile {profile.name}).
# Installs and verifies edgefl, then enables {SERVICE_NAME}. Runs at every boot, and
# again every {PROVISION_RETRY_S} s while it fails, until it has succeeded once.
[Unit]
Description=edgefl device provisioning (install, verify, enable {SERVICE_NAME})
Documentation=file:{INSTALL_DIR}/README.md
Wants=network-online.target
# Not After=cloud-final.service: cloud-final orders itself after multi-user.target,
# which waits for this unit (a cycle systemd breaks by dropping this job at boot).
After=network-online.target
ConditionPathExists=!{PROVISION_STATE_DIR}/done
StartLimitIntervalSec=0

[Service]
Type=oneshot
ExecStart=/bin/sh {INSTALL_DIR}/provision.sh run
Restart=on-failure
RestartSec={PROVISION_RETRY_S}
TimeoutStartSec=3h

[Install]
WantedBy=multi-user.target
"""


def render_provision_script(profile: Profile, *, wheel: software.Wheel, offline: bool) -> str:
    """``provision.sh``: install the bundle's wheel by path, verify it, enable the unit.

    ``start`` (what cloud-init runs) installs :data:`PROVISION_SERVICE` and starts it
    without waiting; ``run`` (what the unit runs; also by hand) provisions now and
    exits non-zero, saying why, when anything is wrong. Safe to re-run.
    """
    python = f"python{profile.os.python}"
    boot_bundle = f"{profile.os.boot_mount.rstrip('/')}/{BUNDLE_NAME}"
    wheel_rel = f"software/{wheel.path.name}"
    index = f"--no-index --find-links {INSTALL_DIR}/wheels " if offline else ""
    packages = " ".join(profile.os.packages)
    return f"""\
#!/bin/sh
# Generated by `edgefl devices flash` (profile {profile.name}). Run as root; safe to re-run.
#   sh provision.sh start   install {PROVISION_SERVICE} and start it (cloud-init runs this)
#   sh provision.sh run     provision now: what the unit runs; run it by hand on images
#                           without cloud-init
# `run` installs this bundle to {INSTALL_DIR}, edgefl-fleet {wheel.version} from the bundle's
# wheel (by path, sha256-checked, dependencies pinned by software/constraints.txt) into
# {VENV_DIR}, checks that `edgefl --version` and `import edge.cli` are that install, and
# only then enables {SERVICE_NAME} and deletes the secrets from the boot partition.
set -eu
BUNDLE=$(cd "$(dirname "$0")" && pwd)
BOOT_BUNDLE={boot_bundle}
VERSION={wheel.version}
WHEEL={INSTALL_DIR}/{wheel_rel}
WHEEL_SHA256={wheel.sha256}
STATE={PROVISION_STATE_DIR}
VENV={VENV_DIR}

status() {{
    mkdir -p "$STATE"
    printf '%s %s\\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(printf '%s' "$*" | tr '\\n' ' ')" \\
        > "$STATE/status"
    echo "edgefl-provision: $*"
}}
fail() {{
    status "failed: $*"
    echo "edgefl-provision: FAILED: $*" >&2
    exit 1
}}

install_bundle() {{
    id edgefl >/dev/null 2>&1 || useradd --system --home-dir {STATE_DIR} --shell /usr/sbin/nologin edgefl
    # The boot partition is FAT (no file modes): copy the bundle where modes hold.
    # Its secrets stay on the boot partition until the install verified.
    if [ "$BUNDLE" != "{INSTALL_DIR}" ] && [ -f "$BUNDLE/secrets/mqtt.password" ]; then
        install -d -m 0750 -o root -g edgefl {INSTALL_DIR}
        cp -R "$BUNDLE"/. {INSTALL_DIR}/
        chown -R root:edgefl {INSTALL_DIR}
        find {INSTALL_DIR} -type d -exec chmod 0750 {{}} +
        find {INSTALL_DIR} -type f -exec chmod 0640 {{}} +
    fi
    [ -f {INSTALL_DIR}/secrets/mqtt.password ] || fail "no secrets in {INSTALL_DIR} or $BUNDLE: flash the device again"
    install -m 0644 {INSTALL_DIR}/systemd/{PROVISION_SERVICE} /etc/systemd/system/{PROVISION_SERVICE}
    systemctl daemon-reload
    systemctl enable {PROVISION_SERVICE} >/dev/null 2>&1
}}

run() {{
    install_bundle
    status "installing edgefl-fleet $VERSION"
    if ! {python} -c 'import venv, ensurepip' >/dev/null 2>&1; then
        apt-get update || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y {packages} \\
            || fail "cannot install {packages} (network?)"
    fi
    echo "$WHEEL_SHA256  $WHEEL" | sha256sum -c - >/dev/null 2>&1 \\
        || fail "$WHEEL is not the wheel this bundle was flashed with (sha256 differs)"
    {python} -m venv --clear "$VENV" || fail "{python} -m venv failed"
    "$VENV/bin/python" -m pip install --no-input {index}\\
        -c {INSTALL_DIR}/software/constraints.txt "$WHEEL[edge]" \\
        || fail "pip install of $WHEEL failed (network or index unreachable?); retrying later"
    # The SuperNode runs with PYTHONOPTIMIZE=2 (no docstrings, less memory): compile its
    # bytecode now, while the venv is writable (the service may not write it).
    "$VENV/bin/python" -OO -m compileall -q -j 0 "$VENV/lib" >/dev/null 2>&1 \\
        || echo "edgefl-provision: some modules of $VENV did not compile with -OO (they are compiled when imported)" >&2

    status "verifying edgefl-fleet $VERSION"
    found=$("$VENV/bin/edgefl" --version 2>&1) || fail "$VENV/bin/edgefl --version failed: $found"
    [ "$found" = "edgefl $VERSION" ] || fail "$VENV/bin/edgefl --version says '$found', expected 'edgefl $VERSION'"
    origin=$("$VENV/bin/python" -c 'import edge.cli; print(edge.cli.__file__)' 2>&1) \\
        || fail "import edge.cli failed in $VENV: $origin"
    case "$origin" in
        "$VENV"/lib/*) ;;
        *) fail "import edge.cli resolves to $origin, not inside $VENV" ;;
    esac
    report=$(cd / && "$VENV/bin/edgefl" doctor --role edge --data-dir {STATE_DIR} 2>&1) \\
        || fail "edgefl doctor --role edge failed: $report"

    install -d -m 0700 -o edgefl -g edgefl {STATE_DIR}
    install -m 0644 {INSTALL_DIR}/systemd/{SERVICE_NAME} /etc/systemd/system/{SERVICE_NAME}
    systemctl daemon-reload
    systemctl enable {SERVICE_NAME} >/dev/null 2>&1
    systemctl restart --no-block {SERVICE_NAME}
    if [ "$BOOT_BUNDLE" != "{INSTALL_DIR}" ] && [ -d "$BOOT_BUNDLE/secrets" ]; then
        rm -f "$BOOT_BUNDLE"/secrets/*
    fi
    echo "$VERSION" > "$STATE/done"
    status "done: edgefl-fleet $VERSION installed and verified; {SERVICE_NAME} enabled"
}}

case "${{1:-run}}" in
    start)
        install_bundle
        status "pending: {PROVISION_SERVICE} started"
        systemctl start --no-block {PROVISION_SERVICE}
        ;;
    run) run ;;
    *) echo "usage: $0 [start|run]" >&2; exit 2 ;;
esac
"""


def render_user_data(profile: Profile, *, name: str) -> str:
    """cloud-init ``user-data``: packages, the ``edgefl`` user, then ``provision.sh``."""
    bundle = f"{profile.os.boot_mount.rstrip('/')}/{BUNDLE_NAME}"
    doc_lines = [
        "#cloud-config",
        f"{USER_DATA_MARKER}: written by `edgefl devices flash` for device {name}",
        f"# (profile {profile.name}, image family {profile.os.image_family}).",
        "users:",
        "  - default",
        "  - name: edgefl",
        "    system: true",
        "    lock_passwd: true",
        "    no_create_home: true",
        f"    homedir: {STATE_DIR}",
        "    shell: /usr/sbin/nologin",
        "package_update: true",
    ]
    if profile.os.apt_sources:
        doc_lines += ["apt:", "  sources:"]
        for i, source in enumerate(profile.os.apt_sources):
            doc_lines += [f"    edgefl-{i}:", f"      source: {json.dumps(source)}"]
    packages = ["ca-certificates", *profile.os.packages]
    doc_lines.append("packages:")
    doc_lines += [f"  - {json.dumps(p)}" for p in packages]
    doc_lines += [
        "runcmd:",
        f"  - [sh, {json.dumps(bundle + '/provision.sh')}, start]",
        "",
    ]
    return "\n".join(doc_lines)


def render_meta_data(name: str) -> str:
    """NoCloud ``meta-data``: the instance id that makes cloud-init treat a boot as first."""
    return f"instance-id: edgefl-{name}\n"


def make_seed_image(user_data: bytes, meta_data: bytes) -> bytes:
    """A NoCloud seed image (ISO 9660 labelled ``cidata``) made with ``cloud-localds``."""
    tool = shutil.which("cloud-localds")
    if tool is None:
        raise FlashError(
            "this profile's image reads cloud-init from a cidata seed image, made with "
            "cloud-localds: sudo apt-get install cloud-image-utils"
        )
    with tempfile.TemporaryDirectory(prefix="edgefl-seed-") as tmp:
        ud, md, img = Path(tmp) / "user-data", Path(tmp) / "meta-data", Path(tmp) / "seed.img"
        ud.write_bytes(user_data)
        md.write_bytes(meta_data)
        res = subprocess.run(
            [tool, str(img), str(ud), str(md)], capture_output=True, text=True, timeout=120
        )
        if res.returncode != 0 or not img.is_file():
            raise FlashError(f"cloud-localds failed: {res.stdout}{res.stderr}")
        return img.read_bytes()


def merge_user_data(existing: str, ours: str, *, source: str) -> str:
    """``existing`` cloud-config with ours merged in: users, packages, apt sources, runcmd.

    Everything else of ``existing`` is kept (Ubuntu Server for Pi ships a ``user-data``
    with its default user and SSH settings; Raspberry Pi Imager writes one with the
    operator's user and Wi-Fi). Comments do not survive the round trip through YAML.
    """
    if not existing.lstrip().startswith("#cloud-config"):
        raise FlashError(
            f"{source} is not a #cloud-config document (a script or MIME multipart?): "
            "edgefl cannot merge into it; replace it or merge cloud-init/user-data by hand"
        )
    try:
        doc = yaml.safe_load(existing)
    except yaml.YAMLError as exc:
        raise FlashError(f"{source} is not valid YAML ({exc}); fix or remove it") from exc
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise FlashError(f"{source} is not a cloud-config mapping; fix or remove it")
    mine = yaml.safe_load(ours)
    merged = dict(doc)
    users = doc.get("users", ["default"])  # no users key means the image's default user
    if not isinstance(users, list):
        users = [users]
    merged["users"] = [
        u for u in users if not (isinstance(u, dict) and u.get("name") == "edgefl")
    ] + [u for u in mine["users"] if isinstance(u, dict)]
    if "default" not in users and "users" not in doc:
        merged["users"].insert(0, "default")
    packages = list(doc.get("packages") or [])
    merged["packages"] = packages + [p for p in mine["packages"] if p not in packages]
    merged["package_update"] = True
    if "apt" in mine:
        apt = dict(doc.get("apt") or {})
        apt["sources"] = {**(apt.get("sources") or {}), **mine["apt"]["sources"]}
        merged["apt"] = apt
    runcmd = [c for c in doc.get("runcmd") or [] if c not in mine["runcmd"]]
    merged["runcmd"] = runcmd + mine["runcmd"]
    header = ours.split("\nusers:", 1)[0]
    return (
        f"{header}\n# Merged into the image's user-data; its original is kept in "
        f"user-data{ORIGINAL_SUFFIX}.\n" + yaml.safe_dump(merged, sort_keys=False)
    )


def render_readme(
    *,
    sf: SecureFleet,
    profile: Profile,
    name: str,
    cloud_host: str,
    has_model: bool,
    software_version: str,
    offline: bool,
) -> str:
    offline_text = "; every dependency from `wheels/`, no network needed" if offline else ""
    train = (
        f"It joins federated rounds through a Flower SuperNode connecting to "
        f"`{_hostport(cloud_host, sf.superlink_port)}` (TLS, authenticated by "
        "`secrets/supernode.key`)."
        if profile.training.enabled
        else "It does not train (profile limit, see below); it serves the model the fleet pushes."
    )
    return f"""\
# edgefl device bundle: {name}

Device `{name}` of fleet `{sf.fleet}`, profile **{profile.title}** (`{profile.name}`),
image family `{profile.os.image_family}`.

It connects to the broker at `{_hostport(cloud_host, sf.broker_port)}` (MQTT over TLS, user
`{name}`; it may publish only its own status and event topics). {train}
{"It starts from `model/initial.pkg`." if has_model else "It waits for the first model the fleet pushes."}

## Install
1. Write the `{profile.os.image_family}` image to the card/disk and mount its boot partition.
2. `edgefl devices flash ... --boot <mount point>` wrote this directory there as
   `{BUNDLE_NAME}/`, and the `user-data` cloud-init reads (see the device guide for
   where each image family reads it).
3. Boot. cloud-init installs the packages, creates the `edgefl` user and runs
   `provision.sh start`, which copies this bundle to `{INSTALL_DIR}` (root:edgefl, 0640)
   and starts `{PROVISION_SERVICE}`. That oneshot installs edgefl-fleet {software_version}
   from `software/` **by path** (sha256-checked; dependencies pinned by
   `software/constraints.txt`{offline_text}) into `{VENV_DIR}`, checks that
   `edgefl --version` says `edgefl {software_version}` and that `import edge.cli` comes
   from the venv, and only then enables `{SERVICE_NAME}` and deletes the secrets from
   the boot partition. If anything fails (no network at first boot, say) it keeps the
   secrets and tries again a minute later and at every boot, until it succeeds once.
   Without cloud-init, run `sudo sh {profile.os.boot_mount}/{BUNDLE_NAME}/provision.sh run`.
4. Check: `systemctl status {PROVISION_SERVICE}` and
   `cat {PROVISION_STATE_DIR}/status` (one line: `pending`, `installing`, `verifying`,
   `failed: <why>` or `done`), then `systemctl status {SERVICE_NAME}`,
   `journalctl -u {SERVICE_NAME}`.

## Secrets
`secrets/` holds this device's broker password and SuperNode key. Anyone holding them
can act as this device: keep the bundle private and delete copies once flashed. If a
bundle leaks or a device is lost, run `edgefl devices revoke {name}` on the cloud.

## Profile limits
{profile.limits or "None stated."}
"""


# -- writing -------------------------------------------------------------------------------


def build_bundle(
    *,
    sf: SecureFleet,
    profile: Profile,
    name: str,
    cloud_host: str,
    mqtt_password: str,
    device_key: pki.ec.EllipticCurvePrivateKey | None,
    initial_package: Path | None,
    wheel: software.Wheel,
    constraints: str,
    wheelhouse: list[Path] | None = None,
) -> dict[str, BundleFile]:
    """Every file of a bundle by bundle-relative path (nothing is written)."""
    has_model = initial_package is not None
    offline = wheelhouse is not None
    user_data = render_user_data(profile, name=name).encode()
    meta_data = render_meta_data(name).encode()
    files: dict[str, BundleFile] = {
        "README.md": BundleFile(
            render_readme(
                sf=sf,
                profile=profile,
                name=name,
                cloud_host=cloud_host,
                has_model=has_model,
                software_version=wheel.version,
                offline=offline,
            ).encode()
        ),
        "edge.toml": BundleFile(
            render_edge_toml(
                sf=sf, profile=profile, name=name, cloud_host=cloud_host, has_model=has_model
            ).encode()
        ),
        "secrets/mqtt.password": BundleFile((mqtt_password + "\n").encode(), 0o600),
        "trust/ca.pem": BundleFile(sf.ca_cert.read_bytes()),
        "trust/signing.pub": BundleFile(sf.signing_public_key.read_bytes()),
        f"systemd/{SERVICE_NAME}": BundleFile(render_service_unit(profile).encode()),
        f"systemd/{PROVISION_SERVICE}": BundleFile(render_provision_unit(profile).encode()),
        "cloud-init/user-data": BundleFile(user_data),
        "cloud-init/meta-data": BundleFile(meta_data),
        "provision.sh": BundleFile(
            render_provision_script(profile, wheel=wheel, offline=offline).encode(), 0o755
        ),
        f"software/{wheel.path.name}": BundleFile(wheel.path.read_bytes()),
        "software/constraints.txt": BundleFile(software.device_constraints(constraints).encode()),
    }
    for dep in wheelhouse or ():
        files[f"wheels/{dep.name}"] = BundleFile(dep.read_bytes())
    if profile.os.boot_media == "cidata":
        files["cloud-init/seed.img"] = BundleFile(make_seed_image(user_data, meta_data))
    identity: dict[str, object] = {
        "device": name,
        "fleet": sf.fleet,
        "profile": profile.name,
        "cloud_host": cloud_host,
        "flashed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "software": {
            "distribution": "edgefl-fleet",
            "version": wheel.version,
            "wheel": wheel.path.name,
            "sha256": wheel.sha256,
            "offline": offline,
        },
    }
    if device_key is not None:
        public = pki.device_public_key_openssh(device_key, comment=f"edgefl:{sf.fleet}:{name}")
        files["secrets/supernode.key"] = BundleFile(
            pki.device_private_key_openssh(device_key), 0o600
        )
        files["supernode.pub"] = BundleFile(public)
        identity["supernode_key_sha256"] = pki.public_key_fingerprint(public)
    if initial_package is not None:
        files["model/initial.pkg"] = BundleFile(initial_package.read_bytes())
    files["identity.json"] = BundleFile((json.dumps(identity, indent=2) + "\n").encode())
    return files


def _dir_mode(rel_dir: str) -> int:
    return 0o700 if rel_dir.split("/")[0] == "secrets" else 0o755


def _write_tree(root: Path, files: dict[str, BundleFile]) -> None:
    root.mkdir(mode=0o755, exist_ok=True)
    for rel, item in sorted(files.items()):
        path = root / rel
        parent_rel = str(Path(rel).parent)
        if parent_rel != ".":
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(path.parent, _dir_mode(parent_rel))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, item.mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(item.data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(path, item.mode)


def write_boot(
    boot: Path, files: dict[str, BundleFile], *, name: str, boot_media: str
) -> tuple[Path, list[str]]:
    """Write ``boot/edgefl`` atomically (temp dir + rename), and the image's user-data.

    ``boot-partition`` media: ``boot/user-data`` (merged into the image's own, whose
    original is kept as ``user-data.edgefl-orig``) and ``boot/meta-data``. ``cidata``
    media: nothing besides the bundle; the image reads ``cloud-init/seed.img``.
    """
    notes: list[str] = []
    target = boot / BUNDLE_NAME
    user_data = boot / "user-data"
    original = boot / f"user-data{ORIGINAL_SUFFIX}"
    ours = files["cloud-init/user-data"].data.decode()
    merged: str | None = None
    if boot_media == "boot-partition":
        # Merge (and so refuse what cannot be merged) before anything is written.
        if original.exists():
            merged = merge_user_data(original.read_text(), ours, source=str(original))
        elif user_data.exists() and USER_DATA_MARKER not in user_data.read_text(errors="replace")[:300]:
            merged = merge_user_data(user_data.read_text(), ours, source=str(user_data))
    staging = Path(tempfile.mkdtemp(prefix=f".{BUNDLE_NAME}-new-", dir=boot))
    old: Path | None = None
    try:
        _write_tree(staging, files)
        os.chmod(staging, 0o755)
        if target.exists():
            old = boot / f".{BUNDLE_NAME}-old-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(target, old)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not target.exists():
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if boot_media == "cidata":
        notes.append(
            f"this image reads cloud-init from a seed labelled cidata: write "
            f"{target / 'cloud-init' / 'seed.img'} to a USB stick (or attach it as a second "
            "disk) and leave it plugged in for the first boot"
        )
        return target, notes
    # NoCloud on these images reads user-data/meta-data at the partition's root.
    if merged is not None:
        if not original.exists():
            pki.write_public(original, user_data.read_bytes())
        pki.write_public(user_data, merged.encode())
        notes.append(f"merged edgefl's cloud-init into {user_data} (original: {original})")
    else:
        pki.write_public(user_data, ours.encode())
    if not (boot / "meta-data").exists():
        pki.write_public(boot / "meta-data", files["cloud-init/meta-data"].data)
    return target, notes


def write_tarball(out: Path, files: dict[str, BundleFile]) -> Path:
    """Write ``out`` (.tar.gz) atomically; member modes as in the bundle, owner root."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    tmp = Path(tmp_name)
    os.fchmod(fd, 0o600)
    now = int(time.time())

    def info(name: str, mode: int, size: int = 0, *, directory: bool = False) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.mode = mode
        ti.size = size
        ti.mtime = now
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
        return ti

    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            tar.addfile(info(BUNDLE_NAME, 0o755, directory=True))
            dirs = sorted({str(Path(rel).parent) for rel in files} - {"."})
            for d in dirs:
                tar.addfile(info(f"{BUNDLE_NAME}/{d}", _dir_mode(d), directory=True))
            for rel, item in sorted(files.items()):
                tar.addfile(
                    info(f"{BUNDLE_NAME}/{rel}", item.mode, len(item.data)), io.BytesIO(item.data)
                )
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


# -- the command -----------------------------------------------------------------------------


def flash(
    *,
    cloud_dir: Path,
    profile: str,
    name: str,
    cloud_host: str,
    out: Path | None = None,
    boot: Path | None = None,
    force: bool = False,
    initial_package: Path | None = None,
    reload: Callable[[], bool | None] | None = None,
    register_supernode: Callable[[Path], str] | None = None,
    unregister_supernode: Callable[[str], None] | None = None,
    wheel: Path | None = None,
    wheelhouse: Path | None = None,
    grpc_port: int | None = None,
    supernode_port: int | None = None,
) -> FlashResult:
    """Make device ``name``'s identity and bundle and enrol it with the cloud.

    Exactly one of ``out`` (a ``.tar.gz``) and ``boot`` (a mounted boot partition) is
    the destination. ``reload`` asks a running broker to reread its files (the CLI
    signals the PID in ``<data_dir>/broker/mosquitto.pid``); ``register_supernode``
    registers the device's public key with a running SuperLink and returns its node
    id, ``unregister_supernode`` drops the key of an identity that ``force`` replaces.
    ``initial_package`` defaults to ``<data_dir>/initial.pkg`` when that file exists.
    ``wheel`` is the edgefl-fleet wheel the bundle carries (default: built from the
    running source tree, :func:`devices.software.build_wheel`); ``wheelhouse`` is a
    directory filled with every dependency for the profile's platform, carried in
    ``wheels/`` for an offline install. ``grpc_port`` and ``supernode_port`` override
    the profile's ports. On any failure after enrolment, the enrolment is undone.
    """
    if (out is None) == (boot is None):
        raise FlashError("give exactly one destination: --boot DIR or --out FILE.tar.gz")
    topics.check_name(name, what="device name")
    prof = load_profile(profile)
    for what, port in (("grpc_port", grpc_port), ("supernode_port", supernode_port)):
        if port is not None and not 1 <= port <= 65535:
            raise FlashError(f"{what} {port}: must be in 1..65535")
    prof = dataclasses.replace(
        prof,
        ports=dataclasses.replace(
            prof.ports,
            grpc=grpc_port or prof.ports.grpc,
            supernode=supernode_port or prof.ports.supernode,
        ),
    )
    data_dir = resolve_cloud_data_dir(cloud_dir)
    sf = SecureFleet.load(data_dir)
    if name == sf.cloud_username:
        raise FlashError(f"device name {name!r} is reserved for the cloud's own MQTT user")
    try:
        pki.check_host(cloud_host)
    except pki.PKIError as exc:
        raise FlashError(f"--cloud {cloud_host!r}: {exc}") from exc
    for what, certfile in (("broker", sf.broker_certfile), ("SuperLink", sf.superlink_certfile)):
        cert = pki.load_certificate(certfile)
        if not pki.covers_host(cert, cloud_host):
            raise FlashError(
                f"the {what} certificate does not name {cloud_host!r} (it names "
                f"{', '.join(pki.certificate_hosts(cert))}); add the host with "
                f"`edgefl cloud init --secure --host {cloud_host}` (devices already "
                "flashed keep working: they trust the CA, not the certificate)"
            )
    if boot is not None:
        boot = Path(boot)
        if not boot.is_dir():
            raise FlashError(f"--boot {boot}: not a directory (mount the boot partition first)")
        existing = boot / BUNDLE_NAME
    else:
        out = Path(out)  # type: ignore[arg-type]
        if not out.name.endswith((".tar.gz", ".tgz")):
            raise FlashError(f"--out {out}: the bundle is a .tar.gz file")
        existing = out
    if existing.exists() and not force:
        raise FlashError(
            f"{existing} already holds a device bundle; refusing to overwrite an identity "
            "without --force"
        )
    current = read_registry(sf).get(name)
    if current is not None and current.status == ACTIVE and not force:
        raise FlashError(
            f"device {name!r} is already enrolled in fleet {sf.fleet!r} (since "
            f"{current.enrolled_at}); flashing it again replaces its identity and locks out "
            "the device that holds it. Re-run with --force, or revoke it first with "
            f"`edgefl devices revoke {name}`."
        )
    if initial_package is None and (data_dir / INITIAL_PACKAGE_NAME).is_file():
        initial_package = data_dir / INITIAL_PACKAGE_NAME

    built = software.wheel_info(Path(wheel)) if wheel is not None else software.build_wheel()
    constraints = software.constraints_file()
    deps = (
        software.download_wheelhouse(built, prof, Path(wheelhouse), constraints)
        if wheelhouse is not None
        else None
    )

    device_key = pki.generate_key() if prof.training.enabled else None
    password = generate_password()
    files = build_bundle(
        sf=sf,
        profile=prof,
        name=name,
        cloud_host=cloud_host,
        mqtt_password=password,
        device_key=device_key,
        initial_package=initial_package,
        wheel=built,
        constraints=constraints.read_text(),
        wheelhouse=deps,
    )
    public_key = files["supernode.pub"].data if device_key is not None else None
    enrolment = enroll_device(
        sf,
        name,
        profile=prof.name,
        mqtt_password=password,
        supernode_public_key=public_key,
        force=force,
    )
    replaced = enrolment.replaced
    notes: list[str] = []
    node_id: str | None = None
    reloaded = False
    try:
        if replaced is not None and replaced.node_id:
            if unregister_supernode is not None:
                unregister_supernode(replaced.node_id)
            else:
                notes.append(
                    f"the replaced SuperNode key (node {replaced.node_id}) is still "
                    "registered: no SuperLink was reachable"
                )
        if public_key is not None and register_supernode is not None:
            with tempfile.TemporaryDirectory() as tmp:
                key_path = Path(tmp) / "supernode.pub"
                key_path.write_bytes(public_key)
                node_id = register_supernode(key_path)
            set_node_id(sf, name, node_id)
        elif public_key is not None:
            notes.append(
                "no SuperLink running: the key is registered when `edgefl cloud up` starts"
            )
        if reload is not None:
            reloaded = reload() is not False
        if boot is not None:
            bundle, boot_notes = write_boot(
                boot, files, name=name, boot_media=prof.os.boot_media
            )
            notes += boot_notes
        else:
            bundle = write_tarball(existing, files)
    except BaseException:
        logger.warning("flash of %s failed; undoing its enrolment", name)
        undo_enrolment(sf, enrolment)
        if reload is not None:
            reload()
        raise
    logger.info("flashed %s (%s) into %s", name, prof.name, bundle)
    return FlashResult(
        name=name,
        fleet=sf.fleet,
        profile=prof.name,
        bundle=bundle,
        files=tuple(sorted(files)),
        node_id=node_id,
        broker_reloaded=reloaded,
        replaced=replaced is not None,
        notes=tuple(notes),
    )
