"""The arm64 claim, tested: a Raspberry Pi bundle's software installs and trains on arm64.

Issue 13 item 5. The rpi4 profile's image is Raspberry Pi OS Trixie (Debian 13, arm64,
Python 3.13). The test builds a Debian trixie arm64 root filesystem with debootstrap
(cached, see :mod:`tests.e2e.rootfs`; unpacked, not configured: the second stage under
qemu is too slow for CI), flashes an rpi4 bundle with ``--wheelhouse`` (every
dependency as aarch64 / CPython 3.13 wheels), and inside the rootfs, under qemu-user
(at least 8.0: :func:`tests.e2e.rootfs.qemu_aarch64`; bookworm's 7.2 crashes itself
inside LiteRT):

* installs the bundle's wheel from its wheelhouse the way ``provision.sh`` does (a venv,
  ``pip install --no-index --find-links`` with the bundle's constraints); pip comes from
  Debian's own wheel and skips byte-compiling, which saves minutes under emulation;
* checks that ``edgefl --version`` is the flashed version, that ``edge`` imports from the
  venv and that TensorFlow is not installed;
* loads the bundle's own model package, runs LiteRT inference, one train step and two
  epochs of training (``tests/e2e/arm64_check.py``).

The same script runs on the host (x86-64) as the reference: the arm64 probabilities and
trained weights must match it, and training must have learnt. Before
:class:`edge.litert_model._SignatureCall`, the train step died here with SIGSEGV
(LiteRT 2.3.0's aarch64 ``ResizeInputTensor`` on a 0-d input).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloud.releases import package_weights
from devices.datasets import load_digits
from devices.flash import INSTALL_DIR, VENV_DIR, flash
from devices.secure_fleet import init_secure
from edge.litert_model import LiteRTModel
from tests.e2e import rootfs

#: Debootstrap, a wheelhouse download and a pip install of ~60 wheels under qemu.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
CHECK_SCRIPT = Path(__file__).with_name("arm64_check.py")
PROFILE = "rpi4"
PYTHON = "python3.13"  # the rpi4 profile's os.python
#: The image's packages besides minbase: what the profile installs before pip.
PACKAGES = ("python3", "python3-venv", "ca-certificates")
#: pip under emulation on a loaded 2-core machine: ~5 minutes was seen.
INSTALL_TIMEOUT_S = 1500


@pytest.fixture(scope="session")
def trixie_arm64() -> Iterator[Path]:
    missing = rootfs.missing_tools(["qemu-aarch64-static", "dpkg-deb", "apt-get"])
    if missing:
        pytest.fail(
            f"the arm64 test needs {', '.join(missing)}: scripts/bootstrap.sh installs them "
            "with EDGEFL_WITH_DEVICES=1 (scripts/test.sh sets it)"
        )
    qemu = rootfs.qemu_aarch64()  # >= 8: bookworm's 7.2 crashes inside LiteRT
    tarball = rootfs.debian_rootfs(
        "trixie", "arm64", packages=PACKAGES, flavour="py-v1", configure=False
    )
    with rootfs.aarch64_binfmt(qemu):
        yield tarball


def _digits(path: Path) -> None:
    data = load_digits(layout="flat", seed=0)
    np.savez(
        path,
        x_train=data.train.x,
        y_train=data.train.y,
        x_test=data.test.x,
        y_test=data.test.y,
        x_probe=data.test.x[:32],
    )


def test_a_pi_bundle_installs_and_trains_on_arm64(
    trixie_arm64: Path, mlp_model_dir: Path, tmp_path: Path
) -> None:
    # A fleet whose initial model is the digits MLP; an rpi4 bundle with its wheelhouse.
    fleet = init_secure(tmp_path / "cloud", fleet="orchard", hosts=["cloud.lan"])
    weights = LiteRTModel.load(mlp_model_dir).get_weights()
    _, package = package_weights(mlp_model_dir, weights)
    (fleet.data_dir / "initial.pkg").write_bytes(package)
    bundle = tmp_path / "pi.tar.gz"
    flash(
        cloud_dir=fleet.data_dir,
        profile=PROFILE,
        name="pi-arm64",
        cloud_host="cloud.lan",
        out=bundle,
        wheelhouse=tmp_path / "wheelhouse",
    )

    root = rootfs.unpack(trixie_arm64, tmp_path / "root")
    install_dir = root / INSTALL_DIR.lstrip("/")
    with tarfile.open(bundle) as tar:
        tar.extractall(install_dir.parent, filter="tar")
    wheels = sorted((install_dir / "software").glob("edgefl_fleet-*.whl"))
    assert len(wheels) == 1, wheels
    wheel = f"{INSTALL_DIR}/software/{wheels[0].name}"
    version = wheels[0].name.split("-")[1]
    # pip loads a CA bundle when it starts, even with --no-index (ca-certificates is
    # unpacked, not configured, so its bundle was never generated): the host's goes in.
    shutil.copyfile(
        "/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/ca-certificates.crt"
    )

    def inside(*cmd: str, timeout: float = 600) -> str:
        return rootfs.run_in(root, list(cmd), timeout=timeout).stdout

    assert inside("uname", "-m").strip() == "aarch64"
    inside(PYTHON, "-m", "venv", "--without-pip", VENV_DIR)
    venv_python = f"{VENV_DIR}/bin/python"
    inside(
        "sh",
        "-c",
        f'{venv_python} "$(ls /usr/share/python-wheels/pip-*.whl)/pip" install --no-input '
        f"--no-compile --no-index --find-links {INSTALL_DIR}/wheels "
        f'-c {INSTALL_DIR}/software/constraints.txt "{wheel}[edge]"',
        timeout=INSTALL_TIMEOUT_S,
    )

    assert inside(f"{VENV_DIR}/bin/edgefl", "--version").strip() == f"edgefl {version}"
    where = json.loads(
        inside(
            venv_python,
            "-c",
            "import importlib.util, json, platform, edge.cli, ai_edge_litert; print(json.dumps("
            "{'edge': edge.cli.__file__, 'litert': ai_edge_litert.__file__, "
            "'tensorflow': importlib.util.find_spec('tensorflow') is not None, "
            "'machine': platform.machine()}))",
        )
    )
    assert where["machine"] == "aarch64"
    assert where["edge"].startswith(f"{VENV_DIR}/lib/"), where
    assert where["litert"].startswith(f"{VENV_DIR}/lib/"), where
    assert where["tensorflow"] is False, "a device install must never bring TensorFlow"

    # The bundle's model on arm64, next to the same script on the host.
    work = root / "root"
    shutil.copyfile(CHECK_SCRIPT, work / CHECK_SCRIPT.name)
    _digits(work / "digits.npz")
    package_inside = f"{INSTALL_DIR}/model/initial.pkg"
    arm = json.loads(
        inside(
            venv_python,
            f"/root/{CHECK_SCRIPT.name}",
            package_inside,
            "/root/digits.npz",
            "/root/arm64.npz",
        ).splitlines()[-1]
    )
    host_run = subprocess.run(
        [
            sys.executable,
            str(CHECK_SCRIPT),
            str(install_dir / "model/initial.pkg"),
            str(work / "digits.npz"),
            str(tmp_path / "host.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    host = json.loads(host_run.stdout.splitlines()[-1])

    assert (arm["machine"], arm["python"][:4]) == ("aarch64", "3.13"), arm
    assert host["machine"] == "x86_64", host
    assert arm["delegate"] == host["delegate"] == "xnnpack"
    arm_out = np.load(work / "arm64.npz")
    host_out = np.load(tmp_path / "host.npz")
    np.testing.assert_allclose(arm_out["probe"], host_out["probe"], atol=1e-4)
    assert sorted(arm_out.files) == sorted(host_out.files)
    for name in arm_out.files:
        if name.startswith("w:"):
            np.testing.assert_allclose(arm_out[name], host_out[name], atol=2e-3, err_msg=name)
    # It learnt, on both, by the same amount.
    assert arm["after"]["accuracy"] > arm["before"]["accuracy"] + 0.3, arm
    assert abs(arm["after"]["accuracy"] - host["after"]["accuracy"]) <= 0.02, (arm, host)
    assert np.isfinite(arm["step_loss"]) and arm["step_loss"] > 0
