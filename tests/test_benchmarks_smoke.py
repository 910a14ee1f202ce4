"""The benchmark harness: every benchmark runs in ``--quick`` mode and writes complete reports.

This checks the harness (processes start and stop, JSON and Markdown carry every
field), never the figures: timings are not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import Report, Result, fmt, percentile, results_table
from benchmarks.run_all import BENCHMARKS, NOT_MEASURED

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_FIELDS = {"name", "ours", "floor", "unit", "ratio", "target", "met", "note", "floor_name"}
MACHINE_FIELDS = {"cpu_model", "logical_cores", "usable_cores", "ram_gb", "python", "packages"}


def test_percentile_interpolates_linearly() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5  # halfway between 2 and 3
    assert percentile(values, 100) == 4.0
    assert percentile(values, 25) == pytest.approx(1.75)  # position 0.75
    with pytest.raises(ValueError):
        percentile([], 50)


def test_result_ratio_and_table_row() -> None:
    row = Result("p50", 3.0, 2.0, "ms", "echo", "<= 1.5x floor", True, "n")
    assert row.ratio == 1.5
    assert row.to_dict()["ratio"] == 1.5
    assert Result.from_dict(row.to_dict()) == row
    assert Result("rss", 70.0, None, "MB").ratio is None
    table = results_table([row])
    assert "| p50 | 3.00 ms | 2.00 ms (echo) | 1.50x | <= 1.5x floor | yes | n |" in table
    assert (fmt(1234.5), fmt(12.34), fmt(0.01234), fmt(None)) == ("1,234", "12.3", "0.0123", "—")


@pytest.mark.slow
def test_run_all_quick_writes_every_report(tmp_path: Path) -> None:
    results_md = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run_all",
            "--quick",
            "--out",
            str(tmp_path / "out"),
            "--results",
            str(results_md),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    for name in BENCHMARKS:
        data = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert data["name"] == name and data["quick"] is True
        assert set(data["machine"]) >= MACHINE_FIELDS
        assert data["results"], f"{name} produced no rows"
        for row in data["results"]:
            assert set(row) == RESULT_FIELDS, row
            # Counts of failures are legitimately 0; nothing is negative.
            assert isinstance(row["ours"], float) and row["ours"] >= 0, row
            assert row["floor"] is None or row["floor"] > 0, row
            assert row["unit"]
        report = Report.from_dict(data)
        assert (tmp_path / "out" / f"{name}.md").read_text() == report.markdown()

    text = results_md.read_text()
    assert "Quick run" in text and "Machine: " in text
    for name in BENCHMARKS:
        first_row = json.loads((tmp_path / "out" / f"{name}.json").read_text())["results"][0]
        assert f"| {first_row['name']} |" in text
    for title in NOT_MEASURED:
        assert f"## {title}" in text
