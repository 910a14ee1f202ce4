"""The committed generated code matches what scripts/gen_protos.py produces now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    generated = sorted(
        p.relative_to(tmp_path) for p in (tmp_path / "protos").rglob("*") if p.is_file()
    )
    assert generated, "the generator produced nothing"
    stale = [
        str(rel) for rel in generated if (ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()
    ]
    assert not stale, f"stale generated files (run scripts/gen_protos.py): {stale}"
    committed = sorted(
        p.relative_to(ROOT)
        for p in (ROOT / "protos").rglob("*")
        if p.is_file() and p.name.endswith(("_pb2.py", "_pb2_grpc.py", ".pyi"))
    )
    assert committed == generated, "generated files without a .proto source (or missing ones)"
