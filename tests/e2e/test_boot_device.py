"""A flashed bundle boots a real Debian root filesystem and joins the fleet by itself.

The x86-64-gateway profile's image family is a Debian 12 cloud image: the test builds
a Debian bookworm rootfs with debootstrap (cached, see :mod:`tests.e2e.rootfs`),
flashes a bundle straight into its ``/boot/efi`` (where the profile's boot partition
mounts), seeds cloud-init's NoCloud source with the flashed ``user-data`` and
``meta-data`` (what the bundle's ``cidata`` seed image holds, put in
``/var/lib/cloud/seed/nocloud/``), and boots it with
``systemd-nspawn --boot``. Nothing on the device is done by the test: cloud-init runs
``provision.sh start``, ``edgefl-provision.service`` installs the bundle's wheel,
``edgefl-edge.service`` starts. The cloud (TLS Mosquitto with passwords and ACL,
SuperLink with SuperNode authentication) runs on the host's loopback, which the
container shares.

pip inside the rootfs uses the host's pip configuration and CA bundle (verification
stays on). An attacker's index on loopback, holding an ``edgefl`` 0.1.0 (the old name,
an unrelated project on PyPI) and an ``edgefl-fleet`` of our version, is configured
too: provisioning must install the bundle's wheel, not either of those.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloud import config as cloud_config
from cloud.supervisor import init_cloud
from devices.flash import PROVISION_SERVICE, SERVICE_NAME, VENV_DIR, FlashResult, flash
from devices.secure_fleet import SecureFleet, reload_broker_from_pid_file, running_superlink
from devices.software import build_wheel
from edge.process import free_port
from tests.devices.test_secure_broker import connect
from tests.e2e import rootfs
from tests.edge.helpers import run_triton
from tests.edge.test_doctor_shadowing import build_wheel as build_decoy

#: Debootstrap from nothing, a boot, cloud-init and a pip install on a loaded 2-core box.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

EDGEFL = str(Path(sys.executable).parent / "edgefl")
PROFILE = "x86-64-gateway"
BOOT_MOUNT = "boot/efi"  # the profile's os.boot_mount, inside the rootfs
#: cloud-init and the first pip install on a loaded 2-core machine.
PROVISION_TIMEOUT_S = 900
DECOY_MARKER = "DECOY-NOT-EDGEFL"


@pytest.fixture(scope="session")
def bookworm() -> Path:
    missing = rootfs.missing_tools()
    if missing:
        pytest.fail(
            f"boot tests need {', '.join(missing)}: scripts/bootstrap.sh installs them "
            "with EDGEFL_WITH_DEVICES=1 (scripts/test.sh sets it)"
        )
    return rootfs.debian_rootfs("bookworm", "amd64")


@pytest.fixture
def decoy_index(tmp_path: Path) -> Iterator[str]:
    """A simple index on loopback serving decoys of our old name and of our own name."""
    version = build_wheel().version
    files = tmp_path / "decoy-index" / "files"
    files.mkdir(parents=True)
    marker = f"{DECOY_MARKER} = True\n"
    wheels = {
        "edgefl": build_decoy(
            files, "edgefl", version, {"edge/__init__.py": marker}, top_level=True
        ),
        "edgefl-fleet": build_decoy(
            files, "edgefl-fleet", version, {"edge/__init__.py": marker}, top_level=True
        ),
    }
    for project, wheel in wheels.items():
        page = tmp_path / "decoy-index" / "simple" / project
        page.mkdir(parents=True)
        (page / "index.html").write_text(
            f'<html><body><a href="../../files/{wheel.name}">{wheel.name}</a></body></html>\n'
        )
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "decoy-index")
    )
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def secure_cloud(tmp_path: Path, model_dir: Path) -> cloud_config.CloudSettings:
    conf = init_cloud(
        tmp_path / "cloud",
        fleet="boot",
        model_dir=model_dir,
        secure=True,
        broker_port=free_port(),
        superlink_port=free_port(),
    )
    s = cloud_config.load(conf)
    s.run.num_rounds = 1
    s.run.min_nodes = 1
    s.run.local_epochs = 1
    return s


def flash_into(
    s: cloud_config.CloudSettings, root: Path, name: str, *, grpc_port: int
) -> FlashResult:
    """Flash ``name`` into the rootfs's boot partition against the running cloud.

    As ``edgefl devices flash`` does with a cloud up: the broker reloads its password
    file and the SuperLink registers the device's key at once.
    """
    sf = SecureFleet.load(s.data_dir)
    link = running_superlink(sf)
    assert link is not None
    return flash(
        cloud_dir=s.data_dir,
        profile=PROFILE,
        name=name,
        cloud_host="127.0.0.1",
        boot=root / BOOT_MOUNT,
        grpc_port=grpc_port,
        supernode_port=free_port(),
        reload=lambda: reload_broker_from_pid_file(s.data_dir),
        register_supernode=link.register_supernode,
    )


def prepare_rootfs(tarball: Path, root: Path) -> Path:
    """Unpack the image; cloud-init reads NoCloud only (as a cloud image's config says)."""
    rootfs.unpack(tarball, root)
    (root / "etc/cloud/cloud.cfg.d/90-edgefl-test.cfg").write_text(
        "datasource_list: [NoCloud, None]\n"
        # The container shares the host's network: cloud-init must not reconfigure it.
        "network: {config: disabled}\n"
        # A cloud image has the locales package and an SSH server; minbase has neither.
        "locale: false\n"
        "ssh_genkeytypes: []\n"
    )
    (root / BOOT_MOUNT).mkdir(parents=True, exist_ok=True)
    return root


def seed_nocloud(root: Path) -> None:
    """NoCloud's seed directory, fed with what the bundle's ``cidata`` seed image holds.

    The profile's image reads a ``cidata`` image (``cloud-init/seed.img``, checked in
    tests/devices/test_boot_media.py); a container has no block devices to attach it
    as, so the same two files go to the seed directory NoCloud also reads.
    """
    seed = root / "var/lib/cloud/seed/nocloud"
    seed.mkdir(parents=True, exist_ok=True)
    for name in ("user-data", "meta-data"):
        shutil.copyfile(root / BOOT_MOUNT / "edgefl" / "cloud-init" / name, seed / name)


def boot(
    root: Path, tmp_path: Path, *, name: str, network: bool, attacker_index: str = ""
) -> rootfs.Container:
    binds = rootfs.install_host_pip_config(root)
    conf = root / "etc/pip.conf"
    if attacker_index:  # listed first, next to the host's real indexes
        text = conf.read_text()
        if "extra-index-url = " in text:
            text = text.replace("extra-index-url = ", f"extra-index-url = {attacker_index} ", 1)
        else:
            text += f"extra-index-url = {attacker_index}\n"
        conf.write_text(text + "trusted-host = 127.0.0.1\n")
    if not network:
        binds = []  # no network means no host mirror either
    cache = rootfs.CACHE_DIR / "pip-cache"
    cache.mkdir(parents=True, exist_ok=True)
    log = tmp_path / f"{name}-console.log"
    return rootfs.Container(
        root,
        name=name,
        network=network,
        binds_ro=binds,
        # No cache either without network: pip could answer from cached index pages.
        binds=[(cache, "/root/.cache/pip")] if network else [],
        log=log,
    ).start()


def provision_status(device: rootfs.Container) -> str:
    return device.run(["cat", "/var/lib/edgefl-provision/status"], check=False).stdout.strip()


def wait_provisioned(device: rootfs.Container) -> None:
    deadline = time.monotonic() + PROVISION_TIMEOUT_S
    status = ""
    while time.monotonic() < deadline:
        status = provision_status(device)
        if " done:" in status:
            return
        time.sleep(3)
    journal = device.run(
        ["journalctl", "-u", PROVISION_SERVICE, "--no-pager", "-n", "80"], check=False
    ).stdout
    raise AssertionError(f"provisioning did not finish: {status!r}\n{journal}")


def edge_restarts(device: rootfs.Container) -> tuple[str, int]:
    out = device.run(
        ["systemctl", "show", "-p", "ActiveState", "-p", "NRestarts", SERVICE_NAME]
    ).stdout
    props = dict(line.split("=", 1) for line in out.split())
    return props["ActiveState"], int(props["NRestarts"])


def check_installed_software(device: rootfs.Container) -> None:
    """The venv holds the bundle's wheel: our version, our code, no decoy of any name."""
    wheel = build_wheel()
    version = device.run([f"{VENV_DIR}/bin/edgefl", "--version"]).stdout.strip()
    assert version == f"edgefl {wheel.version}"
    probe = (
        f"import edge.cli, edge; print(edge.cli.__file__); print(hasattr(edge, {DECOY_MARKER!r}))"
    )
    origin = device.run([f"{VENV_DIR}/bin/python", "-c", probe]).stdout.split()
    assert origin[0].startswith(f"{VENV_DIR}/lib/"), origin
    assert origin[1] == "False", "the decoy's edge package was installed"
    shown = device.run([f"{VENV_DIR}/bin/python", "-m", "pip", "show", "edgefl"], check=False)
    assert shown.returncode != 0, f"the old name was installed: {shown.stdout}"
    dists = device.run([f"{VENV_DIR}/bin/python", "-m", "pip", "freeze"]).stdout
    assert "litert" in dists and "flwr==1.42.0" in dists
    # The SuperNode runs with PYTHONOPTIMIZE=2: its bytecode was compiled at provisioning.
    cached = (
        "import importlib.util, flwr.supernode.start_client_internal as m, os;"
        "print(os.path.exists(importlib.util.cache_from_source(m.__file__, optimization=2)))"
    )
    assert device.run([f"{VENV_DIR}/bin/python", "-c", cached]).stdout.strip() == "True"


def test_flashed_gateway_boots_provisions_joins_serves_and_is_refused_after_revoke(
    tmp_path: Path, bookworm: Path, mlp_model_dir: Path, stack_factory, decoy_index: str
) -> None:
    s = secure_cloud(tmp_path, mlp_model_dir)
    stack = stack_factory(s)
    root = prepare_rootfs(bookworm, tmp_path / "rootfs")
    grpc_port = free_port()
    result = flash_into(s, root, "gw-boot", grpc_port=grpc_port)
    assert result.bundle == root / BOOT_MOUNT / "edgefl"
    password = (result.bundle / "secrets" / "mqtt.password").read_text().strip()
    seed_nocloud(root)

    # The attacker's index is in pip's configuration with the host's real ones.
    device = boot(root, tmp_path, name="gw-boot", network=True, attacker_index=decoy_index)
    try:
        out = device.run(["cloud-init", "status", "--wait"], check=False, timeout=900).stdout
        assert "status: done" in out, out + device.tail()
        wait_provisioned(device)
        check_installed_software(device)
        # Secrets left the boot partition only after the install verified.
        assert not list((result.bundle / "secrets").iterdir())
        assert (root / "etc/edgefl/secrets/mqtt.password").read_text().strip() == password

        device.wait_for(
            ["systemctl", "is-active", SERVICE_NAME], timeout=60, what="edge unit", expect="active"
        )
        time.sleep(30)
        assert edge_restarts(device) == ("active", 0), device.run(
            ["journalctl", "-u", SERVICE_NAME, "--no-pager", "-n", "60"], check=False
        ).stdout

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            known = {d.device_id: d for d in stack.registry.list_devices()}
            if "gw-boot" in known and known["gw-boot"].online:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"gw-boot never came online: {known}")

        # One federated round: the device trains through its SuperNode (TLS, its key),
        # the cloud pushes the new global model, the device serves it.
        stack.submit_run()
        assert stack.wait_for_run(timeout=300) == "finished:completed"
        final = stack.registry.latest_version()
        assert final is not None and final.version >= 1
        x = tmp_path / "x.npy"
        np.save(x, np.zeros((1, 64), dtype=np.float32))
        address = f"127.0.0.1:{grpc_port}"
        deadline = time.monotonic() + 60
        while True:
            (meta,) = run_triton(address, [{"op": "model_metadata", "name": "digits"}], tmp_path)
            if str(final.version) in meta["value"]["versions"] or time.monotonic() > deadline:
                break
            time.sleep(1)
        (outcome,) = run_triton(address, [{"op": "infer", "x": str(x)}], tmp_path)
        assert outcome["ok"] and outcome["model_version"] == str(final.version), outcome
        assert len(outcome["probs"][0]) == 10

        # Revoked: the broker refuses the device's own credentials from now on.
        assert stack.broker is not None
        ok, why = connect(stack.broker, "gw-boot", password, s.data_dir / "pki" / "ca.pem")
        assert ok is not None, why
        ok.close()
        res = subprocess.run(
            [EDGEFL, "devices", "revoke", "gw-boot", "--cloud-dir", str(s.data_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        deadline = time.monotonic() + 30
        while True:
            refused, why = connect(stack.broker, "gw-boot", password, s.data_dir / "pki" / "ca.pem")
            if refused is None or time.monotonic() > deadline:
                break
            refused.close()
            time.sleep(0.5)
        assert refused is None and why.startswith("refused"), why
    finally:
        device.stop()


def test_a_first_boot_without_network_recovers_at_the_next_boot(
    tmp_path: Path, bookworm: Path, mlp_model_dir: Path, stack_factory
) -> None:
    s = secure_cloud(tmp_path, mlp_model_dir)
    stack = stack_factory(s)
    root = prepare_rootfs(bookworm, tmp_path / "rootfs")
    result = flash_into(s, root, "gw-offline", grpc_port=free_port())
    seed_nocloud(root)

    device = boot(root, tmp_path, name="gw-offline-1", network=False)
    try:
        device.run(["cloud-init", "status", "--wait"], check=False, timeout=900)
        deadline = time.monotonic() + PROVISION_TIMEOUT_S
        while "failed:" not in provision_status(device):
            assert time.monotonic() < deadline, provision_status(device)
            time.sleep(3)
        assert "pip install" in provision_status(device)
        # Nothing half-done: the secrets stay, the edge unit is not enabled, the retry is.
        assert (result.bundle / "secrets" / "mqtt.password").is_file()
        assert device.run(["systemctl", "is-enabled", SERVICE_NAME], check=False).returncode != 0
        enabled = device.run(["systemctl", "is-enabled", PROVISION_SERVICE], check=False).stdout
        assert enabled.strip() == "enabled"
    finally:
        device.stop()

    device = boot(root, tmp_path, name="gw-offline-2", network=True)
    try:
        wait_provisioned(device)
        check_installed_software(device)
        assert not list((result.bundle / "secrets").iterdir())
        device.wait_for(
            ["systemctl", "is-active", SERVICE_NAME], timeout=60, what="edge unit", expect="active"
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            known = {d.device_id: d for d in stack.registry.list_devices()}
            if "gw-offline" in known and known["gw-offline"].online:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"gw-offline never came online: {known}")
        assert edge_restarts(device) == ("active", 0)
    finally:
        device.stop()
