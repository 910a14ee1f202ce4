"""``edgefl model ...`` commands: ``build`` (needs TensorFlow) and ``inspect`` (does not).

:func:`register` is called by ``edge.cli`` with its subparsers object. TensorFlow is
imported only when ``model build`` actually runs, so ``edgefl --help`` and
``edgefl model inspect`` stay light enough for a device.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``model`` command group (``build``, ``inspect``) to ``subparsers``."""
    model = subparsers.add_parser("model", help="build and inspect LiteRT models")
    model_sub = model.add_subparsers(dest="model_command", metavar="COMMAND", required=True)

    build = model_sub.add_parser(
        "build",
        help="build a trainable LiteRT model + card.json (needs TensorFlow)",
        description="Build a TF model, convert it to LiteRT with builtin ops only, write "
        "model.tflite and card.json, and check the operators.",
    )
    # Imported here, not at module top: build.py itself only imports TensorFlow lazily,
    # but keeping the import local keeps `edgefl --help` minimal.
    from cloud.authoring.build import add_build_arguments

    add_build_arguments(build)
    build.set_defaults(func=_run_build)

    inspect = model_sub.add_parser(
        "inspect",
        help="list signatures and operators of a .tflite file (no TensorFlow needed)",
    )
    inspect.add_argument("file", help="path to a .tflite file")
    inspect.set_defaults(func=_run_inspect)


def _run_build(args: argparse.Namespace) -> int:
    from cloud.authoring.build import run_build

    return run_build(args)


def _run_inspect(args: argparse.Namespace) -> int:
    from cloud.authoring.opcheck import OpCheckError, check_file

    try:
        report = check_file(args.file)
    except (OSError, OpCheckError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.file}")
    print("signatures:")
    for key in sorted(report.signatures):
        sig = report.signatures[key]
        print(f"  {key}({', '.join(sig['inputs'])}) -> {', '.join(sig['outputs'])}")
    print(f"builtin ops: {', '.join(report.builtin_ops)}")
    print(f"op check: {report.summary()}")
    return 0 if report.ok else 1
