"""Regenerate the Python code for every .proto file under protos/.

Run from anywhere: ``python scripts/gen_protos.py``. The output (``*_pb2.py``,
``*_pb2_grpc.py``, ``*.pyi``) is written next to each .proto file and committed; it is
never edited by hand. ``tests/protos/test_generated_stubs.py`` fails when the committed
files differ from what this script produces, so edit the .proto, run this, commit both.

``--out DIR`` writes into another tree (the staleness test uses it).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def proto_files(root: Path = ROOT) -> list[Path]:
    return sorted(p.relative_to(root) for p in (root / "protos").rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) with the mypy-protobuf plugins into ``out``."""
    from grpc_tools import protoc  # dev dependency: imported only when generating

    mypy_plugin = shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent))
    mypy_grpc_plugin = shutil.which("protoc-gen-mypy_grpc", path=str(Path(sys.executable).parent))
    if mypy_plugin is None or mypy_grpc_plugin is None:
        raise SystemExit("protoc-gen-mypy not found next to this Python: pip install mypy-protobuf")
    include = Path(protoc.__file__).parent / "_proto"
    files = [str(p) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={mypy_plugin}",
        f"--plugin=protoc-gen-mypy_grpc={mypy_grpc_plugin}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    return sorted(
        p.relative_to(out)
        for p in (out / "protos").rglob("*")
        if p.is_file() and p.name.endswith(("_pb2.py", "_pb2_grpc.py", ".pyi"))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repo)")
    ns = parser.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    for path in generate(ns.out):
        print(path)


if __name__ == "__main__":
    main()
