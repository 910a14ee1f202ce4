"""``edgefl doctor`` names any other installed distribution that provides our packages.

Decoy wheels are built here (a wheel is a zip with a ``.dist-info``), installed by pip
into a throwaway ``--target`` directory, and that directory is put on the path of a
subprocess running doctor, behind our own tree so that doctor itself still imports.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.edge.helpers import REPO_ROOT


def build_wheel(
    out_dir: Path, name: str, version: str, files: dict[str, str], *, top_level: bool
) -> Path:
    """A minimal valid pure-Python wheel of ``name`` holding ``files``."""
    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    members = dict(files)
    members[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: decoy\n"
    )
    members[f"{dist_info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: edgefl-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    if top_level:
        tops = sorted({path.split("/")[0] for path in files})
        members[f"{dist_info}/top_level.txt"] = "\n".join(tops) + "\n"
    record = []
    for path, text in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    members[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheel = out_dir / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in members.items():
            zf.writestr(path, text)
    return wheel


def install_target(wheels: list[Path], target: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            *map(str, wheels),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def doctor(extra_path: Path | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    path = [str(REPO_ROOT), *([str(extra_path)] if extra_path else [])]
    env["PYTHONPATH"] = os.pathsep.join(path)
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", "doctor", "--role", "edge"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_doctor_passes_the_shadowing_check_in_a_clean_environment() -> None:
    res = doctor(None)
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("import packages"))
    assert " ok " in line, res.stdout


@pytest.mark.parametrize("top_level", [True, False], ids=["top_level.txt", "RECORD-only"])
def test_doctor_fails_and_names_decoy_distributions(tmp_path: Path, top_level: bool) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    decoys = [
        # PyPI really has an unrelated "edge"; and the unrelated "edgefl" of our old name.
        build_wheel(wheels, "edge", "9.9", {"edge/__init__.py": "X = 1\n"}, top_level=top_level),
        build_wheel(
            wheels,
            "edgefl",
            "0.1.0",
            {"cloud/__init__.py": "", "protos/__init__.py": "", "edgefl_toolkit.py": ""},
            top_level=top_level,
        ),
    ]
    target = tmp_path / "site"
    install_target(decoys, target)

    res = doctor(target)
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout
    assert "import packages" in out.split("required part(s) missing:")[1].splitlines()[0]
    assert f"edge 9.9 ({target}) provides edge" in out
    assert f"edgefl 0.1.0 ({target}) provides cloud, protos" in out
    assert "pip uninstall edge edgefl" in out


def test_an_unrelated_distribution_with_other_packages_is_not_flagged(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = build_wheel(
        wheels, "edgy", "1.0", {"edgy/__init__.py": "", "edge_tools.py": ""}, top_level=False
    )
    target = tmp_path / "site"
    install_target([wheel], target)
    res = doctor(target)
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("import packages"))
    assert " ok " in line, res.stdout
