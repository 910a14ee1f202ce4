"""``edgefl doctor``: which parts of edgefl can run on this machine, and how to fix the rest.

Each check imports or runs one component and reports ``ok``, ``missing`` or
``warning`` with the version found and a one-line fix. The exit code is 1 when a part
required for the chosen role is missing (``--role edge`` needs the device parts,
``--role cloud`` adds Flower's SuperLink side, TensorFlow and the web stack).

The shadowing check fails when another installed distribution provides one of our
import packages (``edge``, ``cloud``, ``protos``, ``devices``: public indexes hold
unrelated projects of those names, and one of the old name ``edgefl``). It reads every
distribution's ``top_level.txt``, or its ``RECORD`` when there is none.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

#: The top-level import packages this distribution installs.
IMPORT_PACKAGES = ("edge", "cloud", "protos", "devices")

#: Free disk below which the data directory gets a warning (models, data, logs).
MIN_FREE_DISK_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Check:
    component: str
    status: str  # "ok", "missing", "warning"
    detail: str
    fix: str = ""
    required: bool = True


def _module_check(
    component: str, module: str, fix: str, *, required: bool, import_it: bool = True
) -> Check:
    """Import ``module`` (or, with ``import_it=False``, only locate it: TensorFlow takes
    seconds to import and logs noise) and report its version."""
    version = ""
    try:
        if import_it:
            version = getattr(importlib.import_module(module), "__version__", "")
        elif importlib.util.find_spec(module) is None:
            raise ImportError(f"No module named {module!r}")
    except Exception as exc:  # ImportError, or a broken wheel raising anything
        return Check(component, "missing", f"cannot import {module}: {exc}", fix, required)
    if not version:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        for dist in (component, module.split(".")[0]):
            try:
                version = dist_version(dist)
                break
            except PackageNotFoundError:
                continue
    return Check(component, "ok", version or "installed", "", required)


def check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check(
        "python",
        "ok" if ok else "missing",
        f"{platform.python_version()} on {platform.machine()}",
        "" if ok else "edgefl needs Python 3.11 or newer",
    )


def check_litert() -> Check:
    check = _module_check(
        "ai-edge-litert",
        "ai_edge_litert.interpreter",
        "pip install 'edgefl-fleet[edge]' (64-bit OS needed: no armv7l wheel exists)",
        required=True,
    )
    if check.status != "ok":
        return check
    try:
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    except Exception as exc:
        return Check("ai-edge-litert", "missing", str(exc), "pip install 'edgefl-fleet[edge]'")
    return Check("ai-edge-litert", "ok", f"{check.detail} (numpy {np.__version__})")


def check_mosquitto(role: str) -> Check:
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )
    required = role == "cloud"
    if binary is None:
        return Check(
            "mosquitto",
            "missing",
            "broker binary not found",
            "sudo apt-get install mosquitto",
            required,
        )
    from cloud.broker import BrokerError, mosquitto_version

    try:
        return Check("mosquitto", "ok", f"{mosquitto_version(binary)} ({binary})", "", required)
    except (BrokerError, OSError) as exc:
        return Check("mosquitto", "warning", str(exc), "reinstall mosquitto", required)


def check_proxy(role: str, data_dir: Path) -> Check:
    """nginx, which the cloud puts in front of the SuperLink (cloud/proxy.py)."""
    required = role == "cloud"
    fix = "sudo apt-get install nginx (the cloud's fleet port runs through it)"
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if binary is None:
        if not required:
            return Check("nginx (fleet proxy)", "ok", "not needed on a device", required=False)
        return Check("nginx (fleet proxy)", "missing", "proxy binary not found", fix, required)
    from cloud.proxy import ProxyError, nginx_version, running_proxy

    try:
        detail = f"{nginx_version(binary)} ({binary})"
    except (ProxyError, OSError) as exc:
        return Check("nginx (fleet proxy)", "warning", str(exc), "reinstall nginx", required)
    running = running_proxy(data_dir)
    if running is not None:
        detail += f"; running: {running}"
    return Check("nginx (fleet proxy)", "ok", detail, "", required)


def check_flower_cli() -> Check:
    bindir = Path(sys.executable).parent
    missing = [
        n
        for n in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")
        if not (bindir / n).exists()
    ]
    if missing:
        return Check(
            "flower CLIs",
            "missing",
            f"not in {bindir}: {', '.join(missing)}",
            "pip install 'edgefl-fleet[edge]'",
        )
    return Check("flower CLIs", "ok", str(bindir))


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _top_level_names(dist: metadata.Distribution) -> set[str]:
    """Top-level import names ``dist`` installs: its top_level.txt, else its RECORD."""
    text = dist.read_text("top_level.txt")
    if text is not None:
        return {line.strip() for line in text.splitlines() if line.strip()}
    names = set()
    for file in dist.files or ():
        parts = file.parts
        if not parts or parts[0] in ("..", "__pycache__") or parts[0].endswith(
            (".dist-info", ".egg-info", ".data")
        ):
            continue
        first = parts[0]
        if len(parts) == 1:
            if not first.endswith(".py"):
                continue  # a .pth file, a script, a shared library of no package
            first = first[: -len(".py")]
        names.add(first)
    return names


def shadowing_distributions() -> list[tuple[str, str, str, list[str]]]:
    """Other distributions that provide one of :data:`IMPORT_PACKAGES`.

    Each item is ``(name, version, location, packages)``; our own distribution
    (:data:`edge.DIST_NAME`) is never listed.
    """
    from edge import DIST_NAME

    ours = _normalise(DIST_NAME)
    found = []
    seen: set[tuple[str, str]] = set()
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or ""
        if _normalise(name) == ours:
            continue
        location = str(dist.locate_file(""))
        if (name, location) in seen:
            continue
        seen.add((name, location))
        clash = sorted(_top_level_names(dist) & set(IMPORT_PACKAGES))
        if clash:
            found.append((name, dist.version, location, clash))
    return sorted(found)


def check_shadowing() -> Check:
    """Fail when another installed distribution provides ``edge``, ``cloud``, ... ."""
    others = shadowing_distributions()
    if not others:
        return Check("import packages", "ok", f"only edgefl-fleet provides {', '.join(IMPORT_PACKAGES)}")
    detail = "; ".join(
        f"{name} {version} ({location}) provides {', '.join(pkgs)}"
        for name, version, location, pkgs in others
    )
    names = " ".join(sorted({name for name, *_ in others}))
    return Check(
        "import packages",
        "missing",
        f"shadowed: {detail}",
        f"pip uninstall {names} (unrelated projects of those names), then reinstall "
        "'edgefl-fleet[edge]'",
    )


def check_disk(path: Path) -> Check:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free_mb = usage.free // (1024 * 1024)
    if usage.free < MIN_FREE_DISK_BYTES:
        return Check(
            "disk",
            "warning",
            f"{free_mb} MB free at {probe}",
            f"free space: edgefl wants at least {MIN_FREE_DISK_BYTES // (1024 * 1024)} MB",
            required=False,
        )
    return Check("disk", "ok", f"{free_mb} MB free at {probe}", required=False)


def run_checks(role: str, data_dir: Path) -> list[Check]:
    cloud = role == "cloud"
    checks = [
        check_python(),
        check_shadowing(),
        _module_check("numpy", "numpy", "pip install numpy", required=True),
        _module_check("protobuf", "google.protobuf", "pip install protobuf", required=True),
        _module_check("grpcio", "grpc", "pip install 'edgefl-fleet[edge]'", required=True),
        _module_check(
            "grpcio-health-checking",
            "grpc_health.v1.health",
            "pip install 'edgefl-fleet[edge]'",
            required=True,
        ),
        _module_check(
            "grpcio-reflection",
            "grpc_reflection.v1alpha.reflection",
            "pip install 'edgefl-fleet[edge]'",
            required=True,
        ),
        check_litert(),
        _module_check(
            "paho-mqtt", "paho.mqtt.client", "pip install 'edgefl-fleet[edge]'", required=True
        ),
        _module_check(
            "cryptography", "cryptography", "pip install 'edgefl-fleet[edge]'", required=True
        ),
        _module_check("flwr", "flwr", "pip install 'edgefl-fleet[edge]'", required=True),
        check_flower_cli(),
        check_mosquitto(role),
        check_proxy(role, data_dir),
        _module_check(
            "tensorflow",
            "tensorflow",
            "pip install 'edgefl-fleet[cloud]' (cloud only; never on a device)",
            required=cloud,
            import_it=False,
        )
        if cloud
        else Check(
            "tensorflow",
            "ok",
            "not needed on a device (model authoring runs in the cloud)",
            required=False,
        ),
        _module_check("fastapi", "fastapi", "pip install 'edgefl-fleet[cloud]'", required=cloud),
        _module_check(
            "sqlalchemy", "sqlalchemy", "pip install 'edgefl-fleet[cloud]'", required=cloud
        ),
        check_disk(data_dir),
    ]
    return checks


def render(checks: list[Check]) -> str:
    rows = [("component", "status", "found", "fix")]
    rows += [
        (
            c.component,
            c.status if c.required or c.status == "ok" else f"{c.status} (optional)",
            c.detail,
            c.fix,
        )
        for c in checks
    ]
    widths = [min(max(len(r[i]) for r in rows), 60) for i in range(3)]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[j][:60].ljust(widths[j]) for j in range(3)]
        lines.append("  ".join(cells) + ("  " + row[3] if row[3] else ""))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  ---")
    return "\n".join(lines)


def doctor(args: argparse.Namespace) -> int:
    checks = run_checks(args.role, Path(args.data_dir))
    print(f"edgefl doctor (role: {args.role})")
    print(render(checks))
    failed = [c for c in checks if c.required and c.status == "missing"]
    if failed:
        print(f"\n{len(failed)} required part(s) missing: {', '.join(c.component for c in failed)}")
        for c in failed:  # the table cuts long details; say them whole
            print(f"  {c.component}: {c.detail}")
        return 1
    print("\nall required parts are usable")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("doctor", help="check which parts of edgefl can run here")
    p.add_argument(
        "--role",
        choices=("edge", "cloud"),
        default="cloud",
        help="what this machine will run (default: cloud)",
    )
    p.add_argument(
        "--data-dir", default=".", help="where edgefl will keep its data (for the disk check)"
    )
    p.set_defaults(func=doctor)
