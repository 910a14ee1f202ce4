"""Device profiles: what edgefl assumes about each supported board.

One TOML file per board lives in ``devices/profiles/`` (shipped with the package).
A profile states the CPU architecture, the OS image family and how it is provisioned,
the Python the device runs, its RAM, how LiteRT runs there, the default ports, the
training batch and the cap on local data. ``edgefl devices flash --profile NAME``
turns a profile into a device bundle.

The schema is the dataclasses below: every key has a type, unknown sections or keys
are errors, and :func:`load_profile` reports **every** problem of a file at once in
one :class:`ProfileError`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

from devices.errors import DevicesError
from edge.config import LITERT_DELEGATES
from protos.topics import TopicError, check_name

#: CPU architectures with ``ai-edge-litert`` wheels (no 32-bit ARM: see DESIGN.md).
ARCHITECTURES = ("aarch64", "x86_64")
#: How a fresh image is provisioned at first boot.
PROVISIONING = ("cloud-init",)
#: Where the image's cloud-init finds the bundle's user-data (see ``[os] boot_media``).
BOOT_MEDIA = ("boot-partition", "cidata")
#: LiteRT delegates a profile may name: what a device's ``[litert] delegate`` accepts.
DELEGATES = LITERT_DELEGATES
#: Python versions the edge extra installs on.
PYTHONS = ("3.11", "3.12", "3.13")


class ProfileError(DevicesError, ValueError):
    """A profile that does not exist or does not validate; ``problems`` lists every issue."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"invalid profile {source}:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class Hardware:
    """``[hardware]``: the board."""

    arch: str
    """CPU architecture as ``uname -m`` prints it (aarch64 or x86_64)."""
    cpu: str
    """Human description of the CPU."""
    cores: int
    """CPU cores."""
    ram_mb: int
    """RAM of the smallest variant the profile targets, in MiB."""


@dataclass(frozen=True)
class OperatingSystem:
    """``[os]``: the image the device runs and how it is provisioned."""

    image_family: str
    """OS image family, e.g. ``raspios-bookworm-arm64``."""
    python: str
    """Python version edgefl runs on there (``python3.X`` must be installable)."""
    provisioning: str = "cloud-init"
    """First-boot provisioning mechanism."""
    boot_mount: str = "/boot/firmware"
    """Where the running system mounts the partition the bundle is written to."""
    boot_media: str = "boot-partition"
    """Where the image's cloud-init reads user-data: ``boot-partition`` (NoCloud files at
    the boot partition's root: Raspberry Pi OS Trixie, Ubuntu Server for Pi; an existing
    ``user-data`` there is merged into) or ``cidata`` (a separate seed image labelled
    ``cidata``, made with ``cloud-localds``: generic cloud images, Jetson)."""
    packages: list[str] = field(default_factory=list)
    """Distribution packages installed at first boot (besides the venv's pip packages)."""
    apt_sources: list[str] = field(default_factory=list)
    """Extra APT sources (e.g. ``ppa:deadsnakes/ppa``) needed for ``packages``."""


@dataclass(frozen=True)
class LiteRT:
    """``[litert]``: how the LiteRT runtime runs on the board."""

    threads: int
    """CPU threads one interpreter uses."""
    delegate: str = "xnnpack"
    """Delegate: ``xnnpack`` (CPU, the wheel's default) or ``none``."""
    serving_threads: int = 1
    """Interpreters in the inference pool (concurrent requests)."""


@dataclass(frozen=True)
class Ports:
    """``[ports]``: default ports on the device."""

    grpc: int = 50051
    """The device's gRPC services (inference, trainer, local data)."""
    supernode: int = 9094
    """The Flower SuperNode's runtime port."""


@dataclass(frozen=True)
class Training:
    """``[training]``: federated training on the board."""

    enabled: bool
    """Whether the device joins federated rounds (runs a Flower SuperNode)."""
    batch: int = 32
    """Training batch the models for this board are authored with."""
    epochs: int = 1
    """Local epochs per round."""


@dataclass(frozen=True)
class Data:
    """``[data]``: the local sample store."""

    cap_samples: int
    """Most samples kept for training (oldest evicted first)."""
    cap_mb: int
    """Disk budget of the data directory (models + samples), in MiB."""


@dataclass(frozen=True)
class Profile:
    """One board."""

    name: str
    """Profile name (the file name without ``.toml``)."""
    title: str
    """Human name of the board."""
    hardware: Hardware
    os: OperatingSystem
    litert: LiteRT
    training: Training
    data: Data
    ports: Ports = field(default_factory=Ports)
    limits: str = ""
    """What the board cannot do, stated plainly."""


# Checks beyond types: (section, key) -> (predicate, description).
_RULES: dict[tuple[str, str], tuple[typing.Callable[[Any], bool], str]] = {
    ("hardware", "arch"): (lambda v: v in ARCHITECTURES, f"must be one of {ARCHITECTURES}"),
    ("hardware", "cores"): (lambda v: 1 <= v <= 256, "must be in 1..256"),
    ("hardware", "ram_mb"): (lambda v: v >= 256, "must be >= 256"),
    ("os", "python"): (lambda v: v in PYTHONS, f"must be one of {PYTHONS}"),
    ("os", "provisioning"): (lambda v: v in PROVISIONING, f"must be one of {PROVISIONING}"),
    ("os", "boot_mount"): (lambda v: v.startswith("/"), "must be an absolute path"),
    ("os", "boot_media"): (lambda v: v in BOOT_MEDIA, f"must be one of {BOOT_MEDIA}"),
    ("litert", "threads"): (lambda v: 1 <= v <= 64, "must be in 1..64"),
    ("litert", "delegate"): (lambda v: v in DELEGATES, f"must be one of {DELEGATES}"),
    ("litert", "serving_threads"): (lambda v: 1 <= v <= 64, "must be in 1..64"),
    ("ports", "grpc"): (lambda v: 1 <= v <= 65535, "must be in 1..65535"),
    ("ports", "supernode"): (lambda v: 1 <= v <= 65535, "must be in 1..65535"),
    ("training", "batch"): (lambda v: v >= 1, "must be >= 1"),
    ("training", "epochs"): (lambda v: v >= 1, "must be >= 1"),
    ("data", "cap_samples"): (lambda v: v >= 1, "must be >= 1"),
    ("data", "cap_mb"): (lambda v: v >= 1, "must be >= 1"),
}


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _build(klass: type, table: dict[str, Any], where: str, problems: list[str]) -> Any:
    """Instantiate dataclass ``klass`` from ``table``, appending every problem found."""
    hints = typing.get_type_hints(klass)
    fields = {f.name: f for f in dataclasses.fields(klass)}
    values: dict[str, Any] = {}
    for key in table:
        if key not in fields:
            problems.append(f"{where}{key}: unknown key (known: {', '.join(fields)})")
    ok = True
    for name, f in fields.items():
        hint = hints[name]
        label = f"{where}{name}"
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{label}: missing")
                ok = False
            continue
        value = table[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                problems.append(f"[{name}] must be a table")
                ok = False
                continue
            built = _build(hint, value, f"{name}.", problems)  # type: ignore[arg-type]
            if built is None:
                ok = False
            values[name] = built
            continue
        if not _type_ok(value, hint):
            problems.append(f"{label}: must be {_type_name(hint)}, got {type(value).__name__}")
            ok = False
            continue
        section = where.rstrip(".")
        rule = _RULES.get((section, name))
        if rule is not None and not rule[0](value):
            problems.append(f"{label}: {rule[1]} (got {value!r})")
            ok = False
            continue
        values[name] = value
    if not ok:
        return None
    return klass(**values)


def parse_profile(doc: dict[str, Any], *, source: str, expected_name: str | None = None) -> Profile:
    """Validate a parsed TOML document; raise :class:`ProfileError` listing every problem."""
    problems: list[str] = []
    profile = _build(Profile, doc, "", problems)
    name = doc.get("name")
    if isinstance(name, str):
        try:
            check_name(name, what="profile name")
        except TopicError as exc:
            problems.append(str(exc))
        if expected_name is not None and name != expected_name:
            problems.append(f"name: {name!r} differs from the file name {expected_name!r}")
    if problems or profile is None:
        raise ProfileError(source, problems)
    return typing.cast(Profile, profile)


def load_profile_file(path: Path) -> Profile:
    """Load and validate one profile file (its ``name`` must match the file name)."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(str(path), [f"cannot read: {exc.strerror or exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(str(path), [f"not valid TOML: {exc}"]) from exc
    return parse_profile(doc, source=str(path), expected_name=path.stem)


def profiles_dir() -> Path:
    """The directory of the shipped profiles."""
    return Path(str(resources.files("devices") / "profiles"))


def list_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def load_profile(name: str) -> Profile:
    """Load a shipped profile by name, or an operator's own profile file by its path.

    ``name`` is a path when it ends in ``.toml`` (a board the shipped profiles do not
    cover, or a shipped one changed: copy it and rename both the file and its ``name``).
    Unknown names list the known ones.
    """
    if name.endswith(".toml"):
        return load_profile_file(Path(name).expanduser())
    path = profiles_dir() / f"{name}.toml"
    if not path.is_file():
        raise ProfileError(
            name, [f"no such profile (known: {', '.join(list_profiles()) or 'none'})"]
        )
    return load_profile_file(path)
