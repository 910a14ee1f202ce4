"""Flashing: the bundle is complete and correct, secrets stay private, identities are kept."""

from __future__ import annotations

import configparser
import shutil
import stat
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

from devices.flash import PROVISION_SERVICE, SERVICE_NAME, VENV_DIR, FlashError, flash
from devices.secure_fleet import SecureFleet, init_secure, read_registry
from devices.software import SoftwareError, build_wheel
from edge.config import load_settings

FLEET = "farm"


@pytest.fixture
def fleet(tmp_path: Path) -> SecureFleet:
    sf = init_secure(tmp_path / "cloud", fleet=FLEET, hosts=["cloud.lan"])
    (sf.data_dir / "initial.pkg").write_bytes(b"model package bytes")
    return sf


def _lines_of(path: Path, user: str) -> list[str]:
    """The password line of ``user`` or the ACL block of ``user``."""
    text = path.read_text()
    if path.name == "passwd":
        return [line for line in text.splitlines() if line.startswith(f"{user}:")]
    blocks = [b for b in text.split("\n\n") if b.startswith(f"user {user}\n")]
    return blocks[0].splitlines() if blocks else []


def test_tarball_is_complete_and_secrets_are_0600(fleet: SecureFleet, tmp_path: Path) -> None:
    out = tmp_path / "pi-01.tar.gz"
    result = flash(
        cloud_dir=fleet.data_dir, profile="rpi4", name="pi-01", cloud_host="cloud.lan", out=out
    )
    assert result.bundle == out
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        read = {n: tar.extractfile(m).read() for n, m in members.items() if m.isfile()}  # type: ignore[union-attr]
    expected = {
        "README.md",
        "edge.toml",
        "identity.json",
        "provision.sh",
        "supernode.pub",
        "secrets/mqtt.password",
        "secrets/supernode.key",
        "trust/ca.pem",
        "trust/signing.pub",
        "model/initial.pkg",
        f"systemd/{SERVICE_NAME}",
        f"systemd/{PROVISION_SERVICE}",
        "cloud-init/user-data",
        "cloud-init/meta-data",
        f"software/{build_wheel().path.name}",
        "software/constraints.txt",
    }
    assert {n.removeprefix("edgefl/") for n in read} == expected
    assert set(result.files) == expected
    for secret in ("edgefl/secrets/mqtt.password", "edgefl/secrets/supernode.key"):
        assert members[secret].mode == 0o600
    assert members["edgefl/secrets"].mode == 0o700
    assert members["edgefl/provision.sh"].mode == 0o755
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    assert read["edgefl/trust/ca.pem"] == fleet.ca_cert.read_bytes()
    assert read["edgefl/trust/signing.pub"] == fleet.signing_public_key.read_bytes()
    assert read["edgefl/model/initial.pkg"] == b"model package bytes"

    config = tomllib.loads(read["edgefl/edge.toml"].decode())
    assert config["device"] == {
        "id": "pi-01",
        "fleet": FLEET,
        "profile": "rpi4",
        "data_dir": "/var/lib/edgefl",
    }
    assert config["litert"] == {"threads": 2, "delegate": "xnnpack"}  # the rpi4 profile's
    assert config["data"] == {
        "capacity": 5000,
        "max_mb": 512,
        "holdout_fraction": 0.2,
        "min_holdout": 10,
    }
    assert config["grpc"]["serving_threads"] == 1
    assert config["mqtt"]["username"] == "pi-01"
    assert config["mqtt"]["host"] == "cloud.lan"
    assert config["flower"]["superlink"] == f"cloud.lan:{fleet.superlink_port}"
    for section, key in (
        ("mqtt", "password_file"),
        ("mqtt", "ca_file"),
        ("trust", "signing_public_key"),
        ("model", "initial_package"),
        ("flower", "root_certificates"),
        ("flower", "auth_private_key"),
    ):
        assert f"edgefl/{config[section][key]}" in read, (section, key)
    password = read["edgefl/secrets/mqtt.password"].decode().strip()
    assert len(password) >= 32
    assert password not in fleet.broker_password_file.read_text()  # only its hash
    assert password not in read["edgefl/edge.toml"].decode()


def test_cloud_init_and_systemd_unit_are_valid(fleet: SecureFleet, tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    flash(
        cloud_dir=fleet.data_dir,
        profile="jetson-orin-nano",
        name="jet-1",
        cloud_host="127.0.0.1",
        boot=boot,
    )
    bundle = boot / "edgefl"
    text = (bundle / "cloud-init" / "user-data").read_text()
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    assert "python3.11-venv" in doc["packages"]
    assert doc["apt"]["sources"]["edgefl-0"]["source"] == "ppa:deadsnakes/ppa"
    assert {"name": "edgefl"}.items() <= doc["users"][1].items()
    assert doc["runcmd"] == [["sh", "/boot/edgefl/provision.sh", "start"]]
    # Jetson's cloud-init reads a cidata seed (tests/devices/test_boot_media.py), not /boot.
    assert not (boot / "user-data").exists()
    assert (bundle / "cloud-init" / "meta-data").read_text() == "instance-id: edgefl-jet-1\n"

    unit_path = bundle / "systemd" / SERVICE_NAME
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(unit_path.read_text())
    service = unit["Service"]
    assert service["ExecStart"].endswith("edgefl edge up --config /etc/edgefl/edge.toml")
    assert service["User"] == "edgefl"
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == "edgefl"  # the data dir stays writable
    assert unit["Install"]["WantedBy"] == "multi-user.target"

    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        # The unit runs the device's venv, which this host lacks: verify a copy whose
        # ExecStart points at a stand-in executable; every other line is verified as is.
        stand_in = tmp_path / "edgefl-stand-in"
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
        copy = tmp_path / SERVICE_NAME
        copy.write_text(unit_path.read_text().replace(f"{VENV_DIR}/bin/edgefl", str(stand_in)))
        res = subprocess.run(
            [analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, res.stdout + res.stderr
        provision_copy = tmp_path / PROVISION_SERVICE
        provision_copy.write_text((bundle / "systemd" / PROVISION_SERVICE).read_text())
        res = subprocess.run(
            [analyze, "verify", "--man=no", str(provision_copy)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stdout + res.stderr

    provision = configparser.ConfigParser(strict=False, interpolation=None)
    provision.optionxform = str  # type: ignore[assignment,method-assign]
    provision.read_string((bundle / "systemd" / PROVISION_SERVICE).read_text())
    assert provision["Service"]["Type"] == "oneshot"
    assert provision["Service"]["ExecStart"] == "/bin/sh /etc/edgefl/provision.sh run"
    assert provision["Service"]["Restart"] == "on-failure"
    assert provision["Unit"]["StartLimitIntervalSec"] == "0"  # retried forever
    assert provision["Install"]["WantedBy"] == "multi-user.target"  # at every boot

    script = (bundle / "provision.sh").read_text()
    wheel = build_wheel()
    assert "python3.11 -m venv" in script
    assert f"WHEEL_SHA256={wheel.sha256}" in script
    assert f"VERSION={wheel.version}" in script
    assert (bundle / "software" / wheel.path.name).read_bytes() == wheel.path.read_bytes()
    assert "--find-links" not in script and "--no-index" not in script
    res = subprocess.run(
        ["sh", "-n", str(bundle / "provision.sh")], capture_output=True, timeout=30
    )
    assert res.returncode == 0, res.stderr


def test_bundle_pins_dependencies_and_refuses_a_foreign_wheel(
    fleet: SecureFleet, tmp_path: Path
) -> None:
    from tests.edge.test_doctor_shadowing import build_wheel as build_decoy

    out = tmp_path / "gw.tar.gz"
    flash(
        cloud_dir=fleet.data_dir,
        profile="x86-64-gateway",
        name="gw-1",
        cloud_host="cloud.lan",
        out=out,
        grpc_port=50999,
    )
    with tarfile.open(out) as tar:
        pins = tar.extractfile("edgefl/software/constraints.txt").read().decode()  # type: ignore[union-attr]
        identity = tar.extractfile("edgefl/identity.json").read().decode()  # type: ignore[union-attr]
        config = tomllib.loads(tar.extractfile("edgefl/edge.toml").read().decode())  # type: ignore[union-attr]
    assert "ai-edge-litert==2.3.0" in pins.splitlines()
    assert "flwr==1.42.0" in pins.splitlines()
    assert build_wheel().sha256 in identity
    assert config["grpc"]["port"] == 50999

    decoys = tmp_path / "decoys"
    decoys.mkdir()
    decoy = build_decoy(decoys, "edgefl", "0.1.0", {"edge/__init__.py": ""}, top_level=True)
    with pytest.raises(SoftwareError, match=r"a wheel of .edgefl., not of .edgefl-fleet."):
        flash(
            cloud_dir=fleet.data_dir,
            profile="rpi4",
            name="pi-x",
            cloud_host="cloud.lan",
            out=tmp_path / "x.tar.gz",
            wheel=decoy,
        )
    assert "pi-x" not in read_registry(fleet)


def test_boot_bundle_modes_and_foreign_user_data_kept(
    fleet: SecureFleet, tmp_path: Path
) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "user-data").write_text("#cloud-config\nhostname: mine\n")
    result = flash(
        cloud_dir=fleet.data_dir, profile="rpi5", name="pi5-a", cloud_host="cloud.lan", boot=boot
    )
    bundle = boot / "edgefl"
    assert result.bundle == bundle
    assert stat.S_IMODE((bundle / "secrets").stat().st_mode) == 0o700
    for secret in ("mqtt.password", "supernode.key"):
        assert stat.S_IMODE((bundle / "secrets" / secret).stat().st_mode) == 0o600
    merged = yaml.safe_load((boot / "user-data").read_text())  # merged, not left alone
    assert merged["hostname"] == "mine"
    assert (boot / "user-data.edgefl-orig").read_text() == "#cloud-config\nhostname: mine\n"
    assert any("merged" in note for note in result.notes)
    assert not [p for p in boot.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_inference_only_board_has_no_supernode_and_its_config_loads(
    fleet: SecureFleet, tmp_path: Path
) -> None:
    # An operator's own profile (a file, by path): the Zero 2 W made serve-only.
    shipped = Path(__file__).resolve().parents[2] / "devices" / "profiles" / "rpi-zero-2w.toml"
    own = tmp_path / "zero-serve.toml"
    own.write_text(
        shipped.read_text()
        .replace('name = "rpi-zero-2w"', 'name = "zero-serve"')
        .replace("[training]\nenabled = true", "[training]\nenabled = false")
    )
    boot = tmp_path / "boot"
    boot.mkdir()
    result = flash(
        cloud_dir=fleet.data_dir,
        profile=str(own),
        name="zero-1",
        cloud_host="cloud.lan",
        boot=boot,
    )
    assert "secrets/supernode.key" not in result.files
    settings = load_settings(boot / "edgefl" / "edge.toml", env={})
    assert settings.device.id == "zero-1" and settings.device.fleet == FLEET
    assert settings.mqtt is not None and settings.mqtt.username == "zero-1"
    assert settings.mqtt.password_file is not None and settings.mqtt.password_file.is_file()
    assert settings.mqtt.ca_file == boot / "edgefl" / "trust" / "ca.pem"
    assert settings.data.capacity == 1000
    assert settings.litert.threads == 2 and settings.grpc.serving_threads == 1
    assert read_registry(fleet)["zero-1"].supernode_public_key is None


def test_second_flash_needs_force_and_leaves_other_devices_alone(
    fleet: SecureFleet, tmp_path: Path
) -> None:
    reloads: list[int] = []
    common = {"cloud_dir": fleet.data_dir, "profile": "rpi4", "cloud_host": "cloud.lan"}
    flash(**common, name="dev-a", out=tmp_path / "a.tar.gz", reload=lambda: reloads.append(1))
    flash(**common, name="dev-b", out=tmp_path / "b.tar.gz", reload=lambda: reloads.append(1))
    assert len(reloads) == 2
    b_password = _lines_of(fleet.broker_password_file, "dev-b")
    b_acl = _lines_of(fleet.acl_file, "dev-b")
    a_password = _lines_of(fleet.broker_password_file, "dev-a")
    assert b_acl == [
        "user dev-b",
        f"topic write edgefl/{FLEET}/device/dev-b/status",
        f"topic write edgefl/{FLEET}/device/dev-b/event",
        f"topic read edgefl/{FLEET}/release/#",
    ]
    a_key = read_registry(fleet)["dev-a"].fingerprint

    # Same name into a fresh destination: the cloud still knows the identity.
    with pytest.raises(FlashError, match=r"already enrolled.*--force"):
        flash(**common, name="dev-a", out=tmp_path / "a2.tar.gz")
    # Same destination: refused before anything changes.
    with pytest.raises(FlashError, match=r"already holds a device bundle.*--force"):
        flash(**common, name="dev-a", out=tmp_path / "a.tar.gz")
    assert not (tmp_path / "a2.tar.gz").exists()
    assert _lines_of(fleet.broker_password_file, "dev-a") == a_password
    assert read_registry(fleet)["dev-a"].fingerprint == a_key

    result = flash(**common, name="dev-a", out=tmp_path / "a.tar.gz", force=True)
    assert result.replaced
    assert _lines_of(fleet.broker_password_file, "dev-a") != a_password
    assert read_registry(fleet)["dev-a"].fingerprint != a_key
    assert _lines_of(fleet.broker_password_file, "dev-b") == b_password
    assert _lines_of(fleet.acl_file, "dev-b") == b_acl
    assert _lines_of(fleet.broker_password_file, "cloud")  # the cloud's user survives


def test_refusals(fleet: SecureFleet, tmp_path: Path) -> None:
    common = {"cloud_dir": fleet.data_dir, "profile": "rpi4", "out": tmp_path / "x.tar.gz"}
    with pytest.raises(FlashError, match=r"does not name 'elsewhere.example'"):
        flash(**common, name="d1", cloud_host="elsewhere.example")
    with pytest.raises(FlashError, match="reserved"):
        flash(**common, name="cloud", cloud_host="cloud.lan")
    with pytest.raises(ValueError, match="device name"):
        flash(**common, name="a/b", cloud_host="cloud.lan")
    with pytest.raises(FlashError, match=r"not a secure fleet|neither cloud.toml"):
        flash(**{**common, "cloud_dir": tmp_path}, name="d1", cloud_host="cloud.lan")
    assert read_registry(fleet) == {}
    assert not (tmp_path / "x.tar.gz").exists()


def test_cli_flash_twice(fleet: SecureFleet, tmp_path: Path) -> None:
    edgefl = Path(sys.executable).parent / "edgefl"
    argv = [str(edgefl), "devices", "flash", "--profile", "x86-64-gateway", "--name", "gw-1",
            "--cloud", "cloud.lan", "--out", str(tmp_path / "gw.tar.gz"),
            "--cloud-dir", str(fleet.data_dir)]  # fmt: skip
    first = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "flashed gw-1" in first.stdout
    second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert "refusing to overwrite an identity without --force" in second.stderr
    third = subprocess.run([*argv, "--force"], capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr

    revoke = [str(edgefl), "devices", "revoke", "gw-1", "--cloud-dir", str(fleet.data_dir)]
    first = subprocess.run(revoke, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "revoked gw-1" in first.stdout
    assert read_registry(fleet)["gw-1"].status == "revoked"
    assert "gw-1" not in fleet.acl_file.read_text()
    second = subprocess.run(revoke, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and "already revoked" in second.stderr


@pytest.mark.slow
def test_wheelhouse_carries_every_dependency_for_the_boards_platform(
    fleet: SecureFleet, tmp_path: Path
) -> None:
    """``--wheelhouse``: aarch64 / CPython 3.13 wheels for an rpi4, installed offline."""
    out = tmp_path / "pi.tar.gz"
    flash(
        cloud_dir=fleet.data_dir,
        profile="rpi4",
        name="pi-offline",
        cloud_host="cloud.lan",
        out=out,
        wheelhouse=tmp_path / "wheelhouse",
    )
    with tarfile.open(out) as tar:
        names = [m.name.removeprefix("edgefl/wheels/") for m in tar.getmembers()
                 if m.name.startswith("edgefl/wheels/")]  # fmt: skip
        script = tar.extractfile("edgefl/provision.sh").read().decode()  # type: ignore[union-attr]
    assert "ai_edge_litert-2.3.0-cp313-cp313-manylinux_2_27_aarch64.whl" in names
    assert any(n.startswith("numpy-") and "cp313" in n and "aarch64" in n for n in names)
    assert any(n.startswith("flwr-1.42.0-") for n in names)
    assert not [n for n in names if "x86_64" in n or "cp311-cp311" in n], names  # abi3 is fine
    assert not [n for n in names if n.startswith("edgefl_fleet-")]  # ours is in software/
    assert "--no-index --find-links /etc/edgefl/wheels" in script
