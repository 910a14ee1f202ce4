"""The ``edgefl`` command line.

Subcommand groups live in the package that implements them and are imported only
when the command line is parsed, each module registering itself with
``register(subparsers)``. Command modules import their heavy dependencies (gRPC,
LiteRT, TensorFlow, Flower) inside the functions that run a command, so
``edgefl --version`` and ``edgefl doctor`` work on a bare install.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence

#: The module that adds each top-level command, in the order of ``--help``. Only the
#: module of the command being run is imported (a device running ``edgefl edge serve``
#: loads none of the cloud's command modules).
COMMAND_MODULES = {
    "doctor": "edge.doctor",
    "edge": "edge.commands",
    "cloud": "cloud.commands",
    "model": "cloud.authoring.commands",
    "devices": "devices.commands",
    "demo": "cloud.demo",
}


def version() -> str:
    """The installed edgefl's version (``edge.version``)."""
    from edge import version as edge_version

    return edge_version()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefl",
        description="Edge-cloud federated learning: LiteRT on devices, Flower in the cloud, "
        "signed model pushes over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edgefl {version()}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = [COMMAND_MODULES[command]] if command in COMMAND_MODULES else COMMAND_MODULES.values()
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A module of ours that is absent from this install (or a missing optional
            # dependency imported at its top) only removes its commands.
            if exc.name and (exc.name == name or name.startswith(exc.name + ".")):
                continue
            raise
        module.register(subparsers)
    return parser


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    from edge.logging_config import configure_logging

    configure_logging(args.verbose)
    # SIGTERM (systemd, kill, CI) unwinds like Ctrl-C so that every `finally` runs and
    # the children we started are stopped by PID.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Ctrl-C works even when started in the background of a script (which ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        code = func(args)
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
