"""`edgefl cloud init` says what it did, not what TensorFlow and absl did (#17.7).

Building the model imports TensorFlow, whose C++ start-up lines (CPU features, SavedModel
loading, MLIR passes, the XNNPACK delegate) used to fill the terminal. Without -v they go
to ``data/logs/model-build.log``; stdout is the two lines of edgefl's own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EDGEFL = str(Path(sys.executable).parent / "edgefl")

pytestmark = pytest.mark.slow


def test_cloud_init_prints_only_its_own_lines(tmp_path: Path) -> None:
    res = subprocess.run(
        [EDGEFL, "cloud", "init", "--dir", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr
    assert res.stdout.splitlines() == [
        f"wrote {tmp_path / 'c' / 'cloud.toml'}",
        f"start the aggregator with: edgefl cloud up --config {tmp_path / 'c' / 'cloud.toml'}",
    ]
    assert (tmp_path / "c" / "data" / "model" / "model.tflite").exists()
