"""The console script: --version and doctor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EDGEFL = str(Path(sys.executable).parent / "edgefl")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGEFL, *args], capture_output=True, text=True, timeout=120, env=env)


def test_version() -> None:
    res = run("--version")
    assert res.returncode == 0
    assert res.stdout.startswith("edgefl ")


def test_doctor_reports_every_component_and_passes_here() -> None:
    res = run("doctor", "--role", "cloud")
    assert res.returncode == 0, res.stdout + res.stderr
    for component in (
        "ai-edge-litert",
        "mosquitto",
        "flwr",
        "tensorflow",
        "disk",
        "grpcio-health-checking",
    ):
        assert component in res.stdout


def test_doctor_fails_and_says_how_to_fix_a_missing_broker(tmp_path: Path) -> None:
    # A PATH without mosquitto and no /usr/sbin fallback is impossible to fake for the
    # absolute path, so hide it by running doctor in a Python that sees a fake `shutil.which`
    # only when /usr/sbin/mosquitto is absent; otherwise check the edge role instead.
    env = dict(os.environ, PATH=str(tmp_path))
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, os, edge.doctor as d; os.path.exists = lambda p: False; "
            "from edge.cli import main; sys.exit(main(['doctor', '--role', 'cloud']))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode == 1, res.stdout
    assert "mosquitto" in res.stdout and "apt-get install mosquitto" in res.stdout
    assert "required part(s) missing" in res.stdout
