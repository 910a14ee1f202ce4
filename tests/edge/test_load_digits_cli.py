"""``edgefl edge data load-digits``, the documented way to give a device training data.

Run as the device guide shows it, against a real ``edge serve`` process (through its
local socket), again with ``--clear`` and a non-IID split, then with ``--direct`` on the
store of the stopped device. A bad partition and a missing device get a clear error and
leave the stored samples as they were.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from edge.local_data import LocalData
from tests.edge.helpers import REPO_ROOT, device_config, make_package, start_edge_server

EDGEFL = str(Path(sys.executable).parent / "edgefl")
STORED = re.compile(r"appended (\d+) samples \((\d+) evicted\), (\d+) stored")


def load_digits(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEFL, "edge", "data", "load-digits", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO_ROOT,
    )


def stored(data_dir: Path) -> int:
    return len(LocalData(data_dir / "samples"))


def test_load_digits_through_the_device_then_direct(tmp_path: Path, mlp_model_dir: Path) -> None:
    pkg = tmp_path / "initial.pkg"
    pkg.write_bytes(make_package(mlp_model_dir))
    config = device_config(tmp_path, initial_package=pkg)
    data_dir = tmp_path / "data"

    proc, _address = start_edge_server(config, tmp_path / "server.log")
    try:
        first = load_digits(config, "--partition", "0/5")
        assert first.returncode == 0, first.stderr
        match = STORED.search(first.stdout)
        assert match, first.stdout
        one_fifth = int(match.group(1))
        assert one_fifth > 0 and int(match.group(3)) == one_fifth

        # A partition that does not exist: a clear error, nothing changed.
        bad = load_digits(config, "--partition", "5/5")
        assert bad.returncode == 2 and "partition" in bad.stderr

        again = load_digits(config, "--partition", "1/5", "--dirichlet", "0.5", "--clear")
        assert again.returncode == 0, again.stderr
        match = STORED.search(again.stdout)
        assert match, again.stdout
        # --clear: only the new partition is stored.
        assert int(match.group(3)) == int(match.group(1)) > 0
        served_total = int(match.group(3))
    finally:
        proc.stop()

    assert stored(data_dir) == served_total
    # The device is stopped: without --direct the command says so and changes nothing.
    missing = load_digits(config, "--partition", "0/5")
    assert missing.returncode == 1 and "--direct" in missing.stderr
    assert stored(data_dir) == served_total

    direct = load_digits(config, "--partition", "0/5", "--direct")
    assert direct.returncode == 0, direct.stderr
    assert stored(data_dir) == served_total + one_fifth
