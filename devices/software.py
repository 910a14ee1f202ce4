"""The software a device bundle carries: our wheel, its pinned dependencies, a wheelhouse.

A flashed device installs exactly what flashed it: the bundle holds the
``edgefl-fleet`` wheel, built from the source tree the running ``edgefl`` was
imported from (or a wheel given with ``--wheel``), and ``requirements/constraints.txt``
that pins every dependency. ``provision.sh`` installs the wheel **by path** (a name
lookup could resolve to an unrelated project of the same name on an index) and checks
its sha256 first.

Built wheels are cached under ``~/.cache/edgefl/wheels/<source digest>/``: flashing
many devices from one tree builds once.

``--wheelhouse DIR`` fills DIR with every dependency for the profile's Python and
architecture (``pip download --only-binary=:all: --platform ... --python-version ...``)
and the bundle carries them in ``wheels/``, so provisioning needs no network at all.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from devices.profiles import Profile
from devices.secure_fleet import FleetError

logger = logging.getLogger(__name__)

#: The import packages (folders of the source tree) the wheel holds.
PACKAGES = ("edge", "cloud", "protos", "devices")
#: Files of the source tree besides the packages that the build reads.
TREE_FILES = ("pyproject.toml", "README.md", "LICENSE")
#: Oldest glibc policy the profiles' images satisfy (ai-edge-litert ships manylinux_2_27).
MANYLINUX_MIN = 17
#: Newest glibc policy to accept (Debian trixie has glibc 2.41).
MANYLINUX_MAX = 41


class SoftwareError(FleetError):
    """The bundle's software cannot be made: no source tree, a foreign wheel, pip failed."""


@dataclass(frozen=True)
class Wheel:
    """A built or given ``edgefl-fleet`` wheel."""

    path: Path
    version: str
    sha256: str


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefl" / "wheels"


def source_tree() -> Path | None:
    """The source tree the running ``edge`` package comes from, if it is one."""
    import edge
    from edge import DIST_NAME

    root = Path(edge.__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return None
    try:
        name = tomllib.loads(pyproject.read_text())["project"]["name"]
    except (tomllib.TOMLDecodeError, KeyError):
        return None
    return root if name == DIST_NAME else None


def _tree_files(root: Path) -> list[Path]:
    files = [root / f for f in TREE_FILES if (root / f).is_file()]
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.append(path)
    return files


def _digest_tree(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def wheel_info(path: Path) -> Wheel:
    """Name check, version and sha256 of a wheel file; :class:`SoftwareError` if not ours."""
    from edge import DIST_NAME

    try:
        with zipfile.ZipFile(path) as zf:
            metas = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            if len(metas) != 1:
                raise SoftwareError(f"{path}: not a wheel (no single .dist-info/METADATA)")
            meta = Parser().parsestr(zf.read(metas[0]).decode())
    except (OSError, zipfile.BadZipFile) as exc:
        raise SoftwareError(f"{path}: not a readable wheel: {exc}") from exc
    name = meta.get("Name", "")
    if re.sub(r"[-_.]+", "-", name).lower() != DIST_NAME:
        raise SoftwareError(f"{path}: a wheel of {name!r}, not of {DIST_NAME!r}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Wheel(path=path, version=meta.get("Version", ""), sha256=digest)


def build_wheel(root: Path | None = None) -> Wheel:
    """Our wheel built from ``root`` (default: :func:`source_tree`), cached by content."""
    root = root or source_tree()
    if root is None:
        raise SoftwareError(
            "this edgefl is not running from a source tree, so flash cannot build the "
            "device's wheel: pass --wheel FILE (the edgefl-fleet wheel the cloud runs)"
        )
    files = _tree_files(root)
    cache = _cache_root() / _digest_tree(root, files)[:24]
    built = sorted(cache.glob("*.whl")) if cache.is_dir() else []
    if built:
        return wheel_info(built[0])
    with tempfile.TemporaryDirectory(prefix="edgefl-wheel-") as tmp:
        src = Path(tmp) / "src"
        for path in files:  # a clean copy: the build writes build/ and *.egg-info
            dest = src / path.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out)]
        try:
            import setuptools  # noqa: F401

            cmd.append("--no-build-isolation")  # the running env can build: no downloads
        except ImportError:
            pass
        res = subprocess.run([*cmd, str(src)], capture_output=True, text=True, timeout=600)
        wheels = sorted(out.glob("*.whl"))
        if res.returncode != 0 or len(wheels) != 1:
            raise SoftwareError(
                f"building the edgefl-fleet wheel failed:\n{res.stdout}{res.stderr}"
            )
        cache.mkdir(parents=True, exist_ok=True)
        final = cache / wheels[0].name
        tmp_final = cache / f".{wheels[0].name}.{os.getpid()}"
        shutil.copyfile(wheels[0], tmp_final)
        os.replace(tmp_final, final)
    logger.info("built %s", final)
    return wheel_info(final)


def constraints_file() -> Path:
    """``requirements/constraints.txt`` of the source tree (or shipped with the package)."""
    root = source_tree()
    candidates = [root / "requirements" / "constraints.txt"] if root else []
    candidates.append(Path(__file__).with_name("constraints.txt"))
    for path in candidates:
        if path.is_file():
            return path
    raise SoftwareError(
        "no requirements/constraints.txt found next to this edgefl: the bundle must pin "
        "its dependencies"
    )


def device_constraints(text: str) -> str:
    """The constraints a device installs with: every pin except our own distribution."""
    from edge import DIST_NAME

    kept = []
    for line in text.splitlines():
        name = re.split(r"[=<>!~\[; ]", line.strip(), maxsplit=1)[0]
        if name and re.sub(r"[-_.]+", "-", name).lower() == DIST_NAME:
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


def platform_tags(profile: Profile) -> list[str]:
    """``pip download --platform`` values for the profile's architecture."""
    arch = profile.hardware.arch
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(MANYLINUX_MAX, MANYLINUX_MIN - 1, -1)]
    return [*tags, f"manylinux2014_{arch}", f"linux_{arch}"]


def download_wheelhouse(
    wheel: Wheel, profile: Profile, dest: Path, constraints: Path
) -> list[Path]:
    """Fill ``dest`` with every dependency wheel for ``profile``; return the wheels there."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--only-binary=:all:",
        "--python-version",
        profile.os.python,
        "--implementation",
        "cp",
        *[arg for tag in platform_tags(profile) for arg in ("--platform", tag)],
        "-c",
        str(constraints),
        "-d",
        str(dest),
        f"{wheel.path}[edge]",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise SoftwareError(
            f"pip download for {profile.hardware.arch} / Python {profile.os.python} failed:\n"
            f"{res.stdout}{res.stderr}"
        )
    return sorted(p for p in dest.glob("*.whl") if p.name != wheel.path.name)
