"""Boot media each image family really reads, every user-data checked by cloud-init itself.

- Raspberry Pi OS Trixie (rpi4, rpi5, rpi-zero-2w): NoCloud ``user-data`` and
  ``meta-data`` at the boot partition's root.
- Ubuntu Server for Pi (same partition, which the image ships with its own
  ``user-data``): ours is merged into it, its original kept beside it.
- Generic x86-64 cloud images and Jetson: a ``cidata``-labelled seed image made with
  ``cloud-localds`` (``cloud-init/seed.img`` in the bundle), read back here with
  ``isoinfo``.

Every generated or merged ``user-data`` passes ``cloud-init schema`` (Debian's
cloud-init, installed by scripts/bootstrap.sh for the tests).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from devices.flash import FlashError, flash
from devices.profiles import list_profiles, load_profile
from devices.secure_fleet import SecureFleet, init_secure, read_registry

#: What Ubuntu Server 24.04 for Raspberry Pi ships as /boot/firmware/user-data (its
#: comments shortened): the default user, password expiry, SSH with passwords.
UBUNTU_PI_USER_DATA = """\
#cloud-config

# This is the user-data configuration file for cloud-init. By default this sets
# up an initial user called "ubuntu" with password "ubuntu", which must be
# changed at first login.

# On first boot, set the (default) ubuntu user's password to "ubuntu" and
# expire user passwords
chpasswd:
  expire: true
  users:
  - name: ubuntu
    password: ubuntu
    type: text

# Enable password authentication with the SSH daemon
ssh_pwauth: true

## Update apt database and upgrade packages on first boot
#package_update: true
#package_upgrade: true

## Install additional packages on first boot
#packages:
#- pwgen
#- pastebinit
#- [libpython2.7, 2.7.3-0ubuntu3.1]

## Run arbitrary commands at rc.local like time
#runcmd:
#- [ ls, -l, / ]
"""


@pytest.fixture
def fleet(tmp_path: Path) -> SecureFleet:
    return init_secure(tmp_path / "cloud", fleet="media", hosts=["cloud.lan"])


def schema_ok(path: Path) -> None:
    tool = shutil.which("cloud-init")
    assert tool is not None, "cloud-init is needed (scripts/bootstrap.sh with EDGEFL_WITH_DEVICES=1)"
    res = subprocess.run(
        [tool, "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "Valid cloud-config" in res.stdout, res.stdout + res.stderr


def iso_file(image: Path, name: str) -> bytes:
    res = subprocess.run(
        ["isoinfo", "-R", "-i", str(image), "-x", f"/{name}"], capture_output=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def iso_label(image: Path) -> str:
    res = subprocess.run(
        ["isoinfo", "-d", "-i", str(image)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("Volume id:")]
    return line.split(":", 1)[1].strip()


@pytest.mark.parametrize("profile", list_profiles())
def test_each_profile_writes_the_media_its_image_reads(
    fleet: SecureFleet, tmp_path: Path, profile: str
) -> None:
    prof = load_profile(profile)
    boot = tmp_path / "boot"
    boot.mkdir()
    flash(cloud_dir=fleet.data_dir, profile=profile, name="d1", cloud_host="cloud.lan", boot=boot)
    bundle = boot / "edgefl"
    user_data = bundle / "cloud-init" / "user-data"
    schema_ok(user_data)
    doc = yaml.safe_load(user_data.read_text())
    assert doc["runcmd"] == [["sh", f"{prof.os.boot_mount}/edgefl/provision.sh", "start"]]
    if prof.os.boot_media == "boot-partition":
        assert prof.os.image_family.startswith("raspios-trixie")
        assert (boot / "user-data").read_bytes() == user_data.read_bytes()
        assert (boot / "meta-data").read_text() == "instance-id: edgefl-d1\n"
        assert not (bundle / "cloud-init" / "seed.img").exists()
    else:
        assert prof.os.boot_media == "cidata"
        seed = bundle / "cloud-init" / "seed.img"
        assert iso_label(seed) == "cidata"
        assert iso_file(seed, "user-data") == user_data.read_bytes()
        assert iso_file(seed, "meta-data") == b"instance-id: edgefl-d1\n"
        assert not (boot / "user-data").exists()  # nothing reads it there


def test_ubuntu_for_pi_user_data_is_merged_and_reflashing_merges_again(
    fleet: SecureFleet, tmp_path: Path
) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "user-data").write_text(UBUNTU_PI_USER_DATA)
    (boot / "meta-data").write_text("instance_id: cloud-image\n")
    result = flash(
        cloud_dir=fleet.data_dir, profile="rpi4", name="u1", cloud_host="cloud.lan", boot=boot
    )
    assert any("merged" in n for n in result.notes)
    schema_ok(boot / "user-data")
    merged = yaml.safe_load((boot / "user-data").read_text())
    assert merged["chpasswd"]["users"] == [{"name": "ubuntu", "password": "ubuntu", "type": "text"}]
    assert merged["ssh_pwauth"] is True
    assert merged["users"][0] == "default"  # the image's ubuntu user stays
    assert [u["name"] for u in merged["users"][1:]] == ["edgefl"]
    assert merged["packages"] == ["ca-certificates", "python3-venv"]
    assert merged["runcmd"] == [["sh", "/boot/firmware/edgefl/provision.sh", "start"]]
    assert (boot / "user-data.edgefl-orig").read_text() == UBUNTU_PI_USER_DATA
    assert (boot / "meta-data").read_text() == "instance_id: cloud-image\n"  # the image's

    # Flashing the card again (new identity) merges into the original once more.
    flash(
        cloud_dir=fleet.data_dir,
        profile="rpi4",
        name="u1",
        cloud_host="cloud.lan",
        boot=boot,
        force=True,
    )
    again = yaml.safe_load((boot / "user-data").read_text())
    assert again == merged
    assert (boot / "user-data.edgefl-orig").read_text() == UBUNTU_PI_USER_DATA


def test_imager_user_data_with_own_users_and_runcmd_keeps_them(
    fleet: SecureFleet, tmp_path: Path
) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "user-data").write_text(
        "#cloud-config\nhostname: pi-barn\nusers:\n  - name: alice\n    groups: sudo\n"
        "    shell: /bin/bash\npackages: [vim]\nruncmd:\n  - [touch, /tmp/imager-was-here]\n"
    )
    flash(cloud_dir=fleet.data_dir, profile="rpi5", name="p5", cloud_host="cloud.lan", boot=boot)
    schema_ok(boot / "user-data")
    merged = yaml.safe_load((boot / "user-data").read_text())
    assert merged["hostname"] == "pi-barn"
    assert [u["name"] for u in merged["users"]] == ["alice", "edgefl"]  # no default added
    assert merged["packages"] == ["vim", "ca-certificates", "python3-venv"]
    assert merged["runcmd"][0] == ["touch", "/tmp/imager-was-here"]
    assert merged["runcmd"][-1] == ["sh", "/boot/firmware/edgefl/provision.sh", "start"]


def test_unmergeable_user_data_is_refused_and_nothing_is_written(
    fleet: SecureFleet, tmp_path: Path
) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    script = "#!/bin/sh\necho a user-data script\n"
    (boot / "user-data").write_text(script)
    with pytest.raises(FlashError, match="not a #cloud-config document"):
        flash(
            cloud_dir=fleet.data_dir, profile="rpi4", name="s1", cloud_host="cloud.lan", boot=boot
        )
    assert (boot / "user-data").read_text() == script
    assert sorted(p.name for p in boot.iterdir()) == ["user-data"]
    assert "s1" not in read_registry(fleet)  # enrolment undone
