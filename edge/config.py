"""Typed settings of a device, read from a TOML file with ``EDGEFL_<SECTION>_<KEY>`` overrides.

Example ``edge.toml``::

    [device]
    id = "pi-kitchen-01"
    fleet = "default"
    data_dir = "/var/lib/edgefl"

    [grpc]
    port = 50051

    [mqtt]                       # optional: without it, no MQTT agent runs
    host = "broker.example"
    password_file = "mqtt.password"

    [trust]
    signing_public_key = "release-signing.pub"

    [model]
    initial_package = "digits-v1.pkg"

Relative paths in the file are resolved against the file's directory (paths from
environment variables against the working directory). Environment variables override
the file: ``EDGEFL_GRPC_PORT=0``, ``EDGEFL_DEVICE_DATA_DIR=/tmp/x`` (section name, then
the key, upper-case). Setting any ``EDGEFL_MQTT_*`` variable creates the ``[mqtt]``
section. Unknown sections or keys (in the file or among ``EDGEFL_<SECTION>_*`` variables
of a known section) and values of the wrong type are errors; every problem is reported
at once in one :class:`~edge.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from edge.errors import ConfigError

__all__ = [
    "ConfigError",
    "DataSettings",
    "DeviceSettings",
    "GrpcSettings",
    "ModelSettings",
    "MqttSettings",
    "Settings",
    "TrainingSettings",
    "TrustSettings",
    "load_settings",
]

ENV_PREFIX = "EDGEFL_"
"""Prefix of environment variables that override settings."""

DEFAULT_FLEET = "default"
"""Fleet a device belongs to when the file does not say."""
DEFAULT_DATA_DIR = Path("edgefl-data")
"""Where the model store, samples and state live (relative to the config file)."""
DEFAULT_GRPC_HOST = "127.0.0.1"
"""Loopback by default: a device's services are for local clients unless opened on purpose."""
DEFAULT_GRPC_PORT = 0
"""0 picks a free port; the bound port is printed and written to ``data_dir/grpc.port``."""
DEFAULT_MAX_BATCH = 256
"""Largest batch one ModelInfer request may carry."""
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Largest gRPC message received or sent (larger ones get RESOURCE_EXHAUSTED)."""
DEFAULT_SERVING_THREADS = 2
"""Interpreters in the serving pool (concurrent inferences)."""
DEFAULT_LITERT_THREADS = 1
"""CPU threads per LiteRT interpreter; one keeps several interpreters from competing."""
LITERT_DELEGATES = ("xnnpack", "none")
"""What runs the model's operators: ``xnnpack`` (LiteRT's default CPU delegate, which
the pip wheel ships) or ``none`` (LiteRT's built-in reference kernels only: slower, for
a board where XNNPACK misbehaves)."""
DEFAULT_LITERT_DELEGATE = "xnnpack"
DEFAULT_GRACE_S = 5.0
"""Seconds in-flight calls get to finish at shutdown."""
DEFAULT_DRAIN_DELAY_S = 0.5
"""Seconds between announcing NOT_SERVING and refusing new calls at shutdown."""
DEFAULT_EPOCHS = 1
"""Local epochs per Fit when the request does not say."""
DEFAULT_PROXIMAL_MU = 0.0
"""FedProx proximal term when the request does not say (0 = FedAvg)."""
DEFAULT_SEED = 0
"""Shuffle seed of local training when the request does not say."""
DEFAULT_CAPACITY = 5000
"""Most samples the local store keeps (oldest are evicted first)."""
DEFAULT_MQTT_PORT = 1883
"""MQTT broker port (8883 is usual with TLS)."""
DEFAULT_KEEPALIVE = 30
"""MQTT keepalive in seconds."""
DEFAULT_STATUS_INTERVAL_S = 15.0
"""Seconds between two status reports of the agent."""
DEFAULT_MODEL_NAME = "digits"
"""Name the inference service serves the model under."""
DEFAULT_KEEP_VERSIONS = 3
"""Model versions kept on disk besides the current one."""


@dataclass(frozen=True)
class DeviceSettings:
    """``[device]``: who this device is and where it keeps its state."""

    id: str = ""
    """Device id, unique in the fleet; defaults to the host name."""
    fleet: str = DEFAULT_FLEET
    """Fleet name (MQTT topics and releases are per fleet)."""
    profile: str = ""
    """Name of the device profile it was flashed from (informational)."""
    data_dir: Path = DEFAULT_DATA_DIR
    """Directory for the model store, local samples, node state and ``grpc.port``."""


@dataclass(frozen=True)
class GrpcSettings:
    """``[grpc]``: the device's gRPC server."""

    host: str = DEFAULT_GRPC_HOST
    """Address to bind; keep loopback unless remote clients must reach the device."""
    port: int = DEFAULT_GRPC_PORT
    """Port to bind; 0 picks a free one."""
    max_batch: int = DEFAULT_MAX_BATCH
    """Largest ModelInfer batch."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest message received or sent."""
    serving_threads: int = DEFAULT_SERVING_THREADS
    """Interpreters in the serving pool."""
    grace_s: float = DEFAULT_GRACE_S
    """Shutdown grace period for in-flight calls."""
    drain_delay_s: float = DEFAULT_DRAIN_DELAY_S
    """Pause after going NOT_SERVING before refusing calls, so health watchers notice."""


@dataclass(frozen=True)
class LiteRTSettings:
    """``[litert]``: how the LiteRT runtime runs on this board."""

    threads: int = DEFAULT_LITERT_THREADS
    """CPU threads each interpreter may use (serving pool and training alike)."""
    delegate: str = DEFAULT_LITERT_DELEGATE
    """One of :data:`LITERT_DELEGATES` (serving pool and training alike)."""


@dataclass(frozen=True)
class TrainingSettings:
    """``[training]``: defaults of local training; a Fit request's config overrides them."""

    epochs: int = DEFAULT_EPOCHS
    """Local epochs per Fit."""
    learning_rate: float | None = None
    """SGD learning rate; ``None`` uses the model card's."""
    batch: int | None = None
    """Training batch; must equal the card's train batch; ``None`` uses the card's."""
    proximal_mu: float = DEFAULT_PROXIMAL_MU
    """FedProx proximal coefficient."""
    seed: int = DEFAULT_SEED
    """Shuffle seed."""


@dataclass(frozen=True)
class DataSettings:
    """``[data]``: the local sample store."""

    capacity: int = DEFAULT_CAPACITY
    """Most samples kept; the oldest are evicted first."""
    max_mb: int = 0
    """Disk budget in MiB for the data directory's model files and samples together;
    samples give way (oldest first) to models. 0: no budget, only ``capacity``."""


@dataclass(frozen=True)
class MqttSettings:
    """``[mqtt]``: the broker the agent connects to (the agent itself lives in edge.agent)."""

    host: str = ""
    """Broker host name or address (required)."""
    port: int = DEFAULT_MQTT_PORT
    """Broker port."""
    username: str | None = None
    """User name; ``None`` connects anonymously."""
    password_file: Path | None = None
    """File holding the password (never the password itself in the config)."""
    ca_file: Path | None = None
    """CA bundle; when set, the connection uses TLS."""
    keepalive: int = DEFAULT_KEEPALIVE
    """Keepalive in seconds."""
    status_interval_s: float = DEFAULT_STATUS_INTERVAL_S
    """Seconds between status reports."""


@dataclass(frozen=True)
class TrustSettings:
    """``[trust]``: what the device trusts."""

    signing_public_key: Path | None = None
    """Ed25519 public key that release manifests must be signed with."""
    min_sequence: int = 0
    """Release sequence below which no manifest is accepted, even after the data directory
    was lost (``edgefl devices flash`` writes the fleet's sequence at flashing time)."""


@dataclass(frozen=True)
class ModelSettings:
    """``[model]``: the served model."""

    name: str = DEFAULT_MODEL_NAME
    """Model name in the inference API."""
    initial_package: Path | None = None
    """ModelPackage file installed as version 1 at first start when the store is empty."""
    keep_versions: int = DEFAULT_KEEP_VERSIONS
    """Versions kept on disk besides the current one."""


@dataclass(frozen=True)
class FlowerSettings:
    """``[flower]``: the Flower SuperNode that `edgefl edge up` runs next to the services."""

    superlink: str = ""
    """SuperLink Fleet API address ``host:port``; empty means the device does not train."""
    root_certificates: Path | None = None
    """CA certificate that signed the SuperLink's TLS certificate; unset means no TLS."""
    auth_private_key: Path | None = None
    """The device's SuperNode key (OpenSSH ECDSA), for SuperLinks that authenticate nodes."""
    port: int = 0
    """The SuperNode's own runtime port on loopback; 0 picks a free one."""
    task_timeout_s: float = 600.0
    """Seconds one round's task may run on the device before it is cancelled and refused."""


@dataclass(frozen=True)
class MetricsSettings:
    """``[metrics]``: the Prometheus endpoint (``http://host:port/metrics``) of the edge process."""

    enabled: bool = True
    """Serve ``/metrics`` (edge.metrics names every metric)."""
    host: str = DEFAULT_GRPC_HOST
    """Address to bind; keep loopback unless a Prometheus on another host scrapes it."""
    port: int = 0
    """Port to bind; 0 picks a free one. The bound port is written to ``metrics.port``."""


@dataclass(frozen=True)
class Settings:
    """Everything a device reads at start."""

    device: DeviceSettings = field(default_factory=DeviceSettings)
    grpc: GrpcSettings = field(default_factory=GrpcSettings)
    litert: LiteRTSettings = field(default_factory=LiteRTSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    data: DataSettings = field(default_factory=DataSettings)
    mqtt: MqttSettings | None = None
    trust: TrustSettings = field(default_factory=TrustSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    flower: FlowerSettings | None = None
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    @property
    def port_file(self) -> Path:
        """File the bound gRPC port is written to."""
        return self.device.data_dir / "grpc.port"

    @property
    def local_socket(self) -> Path:
        """Unix socket of the state-changing services (Trainer, LocalData): owner only."""
        return self.device.data_dir / "run" / "local.sock"

    @property
    def metrics_port_file(self) -> Path:
        """File the bound port of the ``/metrics`` endpoint is written to."""
        return self.device.data_dir / "metrics.port"


_SECTIONS: dict[str, type] = {
    "device": DeviceSettings,
    "grpc": GrpcSettings,
    "litert": LiteRTSettings,
    "training": TrainingSettings,
    "data": DataSettings,
    "mqtt": MqttSettings,
    "trust": TrustSettings,
    "model": ModelSettings,
    "flower": FlowerSettings,
    "metrics": MetricsSettings,
}

# Checks beyond types: (section, key) → (predicate, description).
_RULES: dict[tuple[str, str], tuple[typing.Callable[[Any], bool], str]] = {
    ("grpc", "port"): (lambda v: 0 <= v <= 65535, "must be in 0..65535"),
    ("grpc", "max_batch"): (lambda v: v >= 1, "must be >= 1"),
    ("grpc", "max_message_bytes"): (lambda v: v >= 1024, "must be >= 1024"),
    ("grpc", "serving_threads"): (lambda v: 1 <= v <= 64, "must be in 1..64"),
    ("grpc", "grace_s"): (lambda v: v >= 0, "must be >= 0"),
    ("grpc", "drain_delay_s"): (lambda v: v >= 0, "must be >= 0"),
    ("litert", "threads"): (lambda v: 1 <= v <= 64, "must be in 1..64"),
    ("litert", "delegate"): (
        lambda v: v in LITERT_DELEGATES,
        f"must be one of {', '.join(map(repr, LITERT_DELEGATES))}",
    ),
    ("training", "epochs"): (lambda v: v >= 0, "must be >= 0"),
    ("training", "learning_rate"): (lambda v: v is None or v > 0, "must be > 0"),
    ("training", "batch"): (lambda v: v is None or v >= 1, "must be >= 1"),
    ("training", "proximal_mu"): (lambda v: v >= 0, "must be >= 0"),
    ("training", "seed"): (lambda v: v >= 0, "must be >= 0"),
    ("data", "capacity"): (lambda v: v >= 1, "must be >= 1"),
    ("data", "max_mb"): (lambda v: v >= 0, "must be >= 0 (0: no budget)"),
    ("mqtt", "host"): (lambda v: bool(v), "is required"),
    ("mqtt", "port"): (lambda v: 1 <= v <= 65535, "must be in 1..65535"),
    ("mqtt", "keepalive"): (lambda v: v >= 1, "must be >= 1"),
    ("mqtt", "status_interval_s"): (lambda v: v > 0, "must be > 0"),
    ("trust", "min_sequence"): (lambda v: v >= 0, "must be >= 0"),
    ("model", "name"): (lambda v: bool(v), "must not be empty"),
    ("model", "keep_versions"): (lambda v: v >= 1, "must be >= 1"),
    ("flower", "port"): (lambda v: 0 <= v <= 65535, "must be in 0..65535"),
    ("metrics", "port"): (lambda v: 0 <= v <= 65535, "must be in 0..65535"),
    ("flower", "task_timeout_s"): (lambda v: v > 0, "must be > 0"),
}


def _base_type(hint: Any) -> tuple[type, bool]:
    """(the concrete type, whether None is allowed) of a field's annotation."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _expand(text: str, where: str) -> tuple[Path | None, str | None]:
    """``~`` and ``~user`` expanded, or a problem naming the setting."""
    if "\0" in text:
        return None, f"{where}: a path cannot contain a NUL character"
    try:
        return Path(text).expanduser(), None
    except RuntimeError:
        return None, f"{where}: cannot expand ~ in {text!r} (no such user or no home directory)"


def _convert(
    value: Any, hint: Any, where: str, base_dir: Path | None, from_env: bool
) -> tuple[Any, str | None]:
    """Convert a TOML or environment value to the field type; (value, problem)."""
    kind, optional = _base_type(hint)
    if from_env:
        text = str(value)
        if optional and text == "":
            return None, None
        try:
            if kind is bool:
                if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(text)
                return text.lower() in ("1", "true", "yes"), None
            if kind is int:
                return int(text), None
            if kind is float:
                return float(text), None
        except ValueError:
            return None, f"{where}: {text!r} is not a valid {kind.__name__}"
        if kind is Path:
            return _expand(text, where)
        return text, None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is Path:
        if not isinstance(value, str):
            return None, f"{where}: must be a path string, got {type(value).__name__}"
        path, problem = _expand(value, where)
        if path is None:
            return None, problem
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        return path, None
    if kind is int and isinstance(value, bool):
        return None, f"{where}: must be an integer, got a boolean"
    if not isinstance(value, kind):
        return None, f"{where}: must be {kind.__name__}, got {type(value).__name__}"
    return value, None


def _env_overrides(env: Mapping[str, str], problems: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section not in _SECTIONS:
            continue  # EDGEFL_* variables of other tools (tests, the cloud side)
        if not key:
            problems.append(f"environment {name}: names no key")
            continue
        out.setdefault(section, {})[key] = value
    return out


def load_settings(
    path: Path | str | None = None, *, env: Mapping[str, str] | None = None
) -> Settings:
    """Read ``path`` (TOML; optional) and apply ``EDGEFL_*`` overrides from ``env``.

    ``env`` defaults to ``os.environ``. Raises :class:`ConfigError` listing every problem.
    """
    problems: list[str] = []
    raw: dict[str, Any] = {}
    base_dir: Path | None = None
    if path is not None:
        path = Path(path)
        base_dir = path.resolve().parent
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"cannot read {path}: {exc.strerror or exc}"]) from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{path} is not valid TOML: {exc}"]) from exc
    overrides = _env_overrides(os.environ if env is None else env, problems)

    for name in sorted(set(raw) - set(_SECTIONS)):
        problems.append(f"unknown section [{name}]")
    built: dict[str, Any] = {}
    for section, klass in _SECTIONS.items():
        table = raw.get(section)
        if table is not None and not isinstance(table, dict):
            problems.append(f"[{section}] must be a table")
            table = None
        present = table is not None or section in overrides
        if section in ("mqtt", "flower") and not present:
            built[section] = None
            continue
        hints = typing.get_type_hints(klass)
        fields = {f.name for f in dataclasses.fields(klass)}
        values: dict[str, Any] = {}
        for key, value in (table or {}).items():
            where = f"[{section}] {key}"
            if key not in fields:
                problems.append(f"{where}: unknown key")
                continue
            converted, problem = _convert(value, hints[key], where, base_dir, from_env=False)
            if problem:
                problems.append(problem)
            else:
                values[key] = converted
        for key, value in overrides.get(section, {}).items():
            where = f"environment {ENV_PREFIX}{section.upper()}_{key.upper()}"
            if key not in fields:
                problems.append(f"{where}: unknown key {key!r} in [{section}]")
                continue
            converted, problem = _convert(value, hints[key], where, None, from_env=True)
            if problem:
                problems.append(problem)
            else:
                values[key] = converted
        if section == "device":
            if not values.get("id"):
                values["id"] = socket.gethostname()
            if "data_dir" not in values and base_dir is not None:
                values["data_dir"] = base_dir / DEFAULT_DATA_DIR
        for key in fields:
            rule = _RULES.get((section, key))
            if rule is None:
                continue
            value = values.get(key, _default(klass, key))
            if not rule[0](value):
                problems.append(f"[{section}] {key}: {rule[1]} (got {value!r})")
        built[section] = values
    if built["mqtt"] is not None and built["trust"].get("signing_public_key") is None:
        problems.append("[trust] signing_public_key is required when [mqtt] is configured")
    if problems:
        raise ConfigError(problems)
    return Settings(
        device=DeviceSettings(**built["device"]),
        grpc=GrpcSettings(**built["grpc"]),
        litert=LiteRTSettings(**built["litert"]),
        training=TrainingSettings(**built["training"]),
        data=DataSettings(**built["data"]),
        mqtt=None if built["mqtt"] is None else MqttSettings(**built["mqtt"]),
        trust=TrustSettings(**built["trust"]),
        model=ModelSettings(**built["model"]),
        flower=None if built["flower"] is None else FlowerSettings(**built["flower"]),
        metrics=MetricsSettings(**built["metrics"]),
    )


def _default(klass: type, key: str) -> Any:
    for f in dataclasses.fields(klass):
        if f.name == key:
            return f.default
    raise KeyError(key)  # pragma: no cover
