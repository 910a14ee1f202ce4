"""The arm64 claim, tested: a Raspberry Pi bundle's software runs on an arm64 Debian rootfs.

A Debian trixie arm64 root filesystem (the base of Raspberry Pi OS Trixie, Python 3.13
like the rpi profiles) is built with ``debootstrap --arch arm64 --foreign`` and its
second stage under qemu-user-static (binfmt_misc), cached like the amd64 one. An rpi4
bundle flashed with ``--wheelhouse`` carries every dependency as aarch64 / CPython 3.13
wheels (``pip download --platform ...``); inside the rootfs, under emulation, a venv
installs them exactly as ``provision.sh`` does (the bundle's wheel by path, the
constraints, ``--no-index``), then our digits MLP is loaded with LiteRT, infers and
takes a train step. The timings are printed and attached to the test report.

``/sys`` is not mounted in the chroot: creating a LiteRT interpreter with it mounted
segfaulted under qemu (DESIGN.md).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from devices.flash import VENV_DIR, flash
from devices.profiles import load_profile
from devices.secure_fleet import init_secure
from devices.software import build_wheel
from tests.e2e import rootfs

#: Debootstrap's second stage and pip under qemu take minutes; more on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ARM_PACKAGES = ("ca-certificates", "python3", "python3-venv")
PROBE = """
import json, platform, sys, time
import numpy as np
t0 = time.monotonic()
from edge.litert_model import LiteRTModel
import edge.cli
m = LiteRTModel.load("/tmp/model")
t1 = time.monotonic()
rng = np.random.default_rng(0)
x = rng.random((m.train_batch, 64), dtype=np.float32)
y = rng.integers(0, 10, size=m.train_batch).astype(np.int32)
probs = m.infer(x[:1])
before = {k: v.copy() for k, v in m.get_weights().items()}
loss, correct = m.train_step(x, y, lr=0.05)
changed = any(not np.array_equal(before[k], v) for k, v in m.get_weights().items())
t2 = time.monotonic()
print(json.dumps({
    "machine": platform.machine(),
    "python": platform.python_version(),
    "edge_cli": edge.cli.__file__,
    "probs_shape": list(probs.shape),
    "probs_sum": float(probs.sum()),
    "loss": loss,
    "weights_changed": changed,
    "load_s": t1 - t0,
    "infer_train_s": t2 - t1,
}))
"""


def chroot(root: Path, *cmd: str, timeout: float = 1800) -> str:
    res = subprocess.run(
        ["chroot", str(root), *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"},
    )
    assert res.returncode == 0, f"{cmd} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_rpi_bundle_software_installs_and_runs_litert_on_arm64(
    tmp_path: Path, mlp_model_dir: Path, record_property
) -> None:
    missing = rootfs.missing_tools(("qemu-aarch64-static", "chroot"))
    assert not missing, f"missing {missing}: scripts/bootstrap.sh with EDGEFL_WITH_DEVICES=1"
    rootfs.ensure_binfmt("aarch64")
    started = time.monotonic()
    tarball = rootfs.debian_rootfs("trixie", "arm64", packages=ARM_PACKAGES, flavour="py-v1")
    rootfs_s = time.monotonic() - started
    root = rootfs.unpack(tarball, tmp_path / "rootfs")
    profile = load_profile("rpi4")
    assert profile.hardware.arch == "aarch64" and profile.os.python == "3.13"

    sf = init_secure(tmp_path / "cloud", fleet="arm", hosts=[])
    wheelhouse = rootfs.CACHE_DIR / "wheelhouse-aarch64-cp313"  # pip download reuses it
    started = time.monotonic()
    result = flash(
        cloud_dir=sf.data_dir,
        profile="rpi4",
        name="pi-arm",
        cloud_host="127.0.0.1",
        boot=root / "boot/firmware",
        wheelhouse=wheelhouse,
    )
    download_s = time.monotonic() - started
    bundle = result.bundle
    wheels = sorted(p.name for p in (bundle / "wheels").glob("*.whl"))
    assert any(w.startswith("ai_edge_litert-") and "aarch64" in w for w in wheels), wheels
    assert not [w for w in wheels if "x86_64" in w], wheels
    script = (bundle / "provision.sh").read_text()
    assert "--no-index --find-links /etc/edgefl/wheels" in script

    # What provision.sh run does to install, inside the arm64 system (bundle at the
    # place it copies it to); the rest of provisioning is covered by the boot test.
    shutil.copytree(bundle, root / "etc/edgefl")
    wheel = build_wheel()
    started = time.monotonic()
    chroot(root, "python3.13", "-m", "venv", VENV_DIR)
    chroot(
        root,
        f"{VENV_DIR}/bin/python",
        "-m",
        "pip",
        "install",
        "--no-input",
        "--no-index",
        "--find-links",
        "/etc/edgefl/wheels",
        "-c",
        "/etc/edgefl/software/constraints.txt",
        f"/etc/edgefl/software/{wheel.path.name}[edge]",
    )
    install_s = time.monotonic() - started
    assert chroot(root, f"{VENV_DIR}/bin/edgefl", "--version").strip() == f"edgefl {wheel.version}"

    shutil.copytree(mlp_model_dir, root / "tmp/model")
    proc = root / "proc"
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
    try:
        started = time.monotonic()
        out = chroot(root, f"{VENV_DIR}/bin/python", "-c", PROBE, timeout=900)
        run_s = time.monotonic() - started
    finally:
        subprocess.run(["umount", "-l", str(proc)], check=False)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["machine"] == "aarch64"
    assert report["python"].startswith("3.13.")
    assert report["edge_cli"].startswith(f"{VENV_DIR}/lib/python3.13/site-packages/")
    assert report["probs_shape"] == [1, 10]
    assert abs(report["probs_sum"] - 1.0) < 1e-3
    assert report["loss"] > 0 and report["weights_changed"]

    timings = {
        "rootfs_s": round(rootfs_s, 1),
        "wheelhouse_and_flash_s": round(download_s, 1),
        "pip_install_under_qemu_s": round(install_s, 1),
        "litert_probe_under_qemu_s": round(run_s, 1),
        "wheels": len(wheels),
        **{k: round(v, 2) for k, v in report.items() if k.endswith("_s")},
    }
    for key, value in timings.items():
        record_property(key, value)
    print("arm64 under qemu-user:", json.dumps(timings))
