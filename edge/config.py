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

Relative paths in the file, and the default ``data_dir``, are resolved against the
file's directory (paths from environment variables against the working directory).
Environment variables override the file: ``EDGEFL_GRPC_PORT=0``,
``EDGEFL_DEVICE_DATA_DIR=/tmp/x`` (section name, then the key, upper-case). Setting any
``EDGEFL_MQTT_*`` variable creates the ``[mqtt]`` section. Unknown sections or keys (in
the file or among ``EDGEFL_<SECTION>_*`` variables of a device section) and values of
the wrong type are errors; every problem is reported at once in one
:class:`~edge.errors.ConfigError`. The mechanism (types, rules, environment, the writer
:func:`write_settings`) is :mod:`edge.settings`, shared with :mod:`cloud.config`.
"""

from __future__ import annotations

import dataclasses
import socket
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import ConfigError
from edge.settings import Rule, Schema, to_toml

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
    "render_settings",
    "write_settings",
]

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
DEFAULT_HOLDOUT_FRACTION = 0.2
"""Share of a device's samples held out from training (``[data] holdout_fraction``)."""
DEFAULT_MIN_HOLDOUT = 10
"""Fewest held-out samples (``[data] min_holdout``)."""
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
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION
    """Share of the samples held out from training for the shadow check and Evaluate,
    chosen by a hash of each sample's content (rule: :mod:`edge.local_data_split`)."""
    min_holdout: int = DEFAULT_MIN_HOLDOUT
    """Fewest held-out samples; a device with fewer than twice as many has no split
    (it trains on all and refuses checks)."""


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


def _rule(check: typing.Callable[[Any], bool], message: str) -> Rule:
    return Rule(check, message)


# Checks beyond types: (section, key) → rule.
RULES: dict[tuple[str, str], Rule] = {
    ("grpc", "port"): _rule(lambda v: 0 <= v <= 65535, "must be in 0..65535"),
    ("grpc", "max_batch"): _rule(lambda v: v >= 1, "must be >= 1"),
    ("grpc", "max_message_bytes"): _rule(lambda v: v >= 1024, "must be >= 1024"),
    ("grpc", "serving_threads"): _rule(lambda v: 1 <= v <= 64, "must be in 1..64"),
    ("grpc", "grace_s"): _rule(lambda v: v >= 0, "must be >= 0"),
    ("grpc", "drain_delay_s"): _rule(lambda v: v >= 0, "must be >= 0"),
    ("litert", "threads"): _rule(lambda v: 1 <= v <= 64, "must be in 1..64"),
    ("litert", "delegate"): _rule(
        lambda v: v in LITERT_DELEGATES,
        f"must be one of {', '.join(map(repr, LITERT_DELEGATES))}",
    ),
    ("training", "epochs"): _rule(lambda v: v >= 0, "must be >= 0"),
    ("training", "learning_rate"): _rule(lambda v: v is None or v > 0, "must be > 0"),
    ("training", "batch"): _rule(lambda v: v is None or v >= 1, "must be >= 1"),
    ("training", "proximal_mu"): _rule(lambda v: v >= 0, "must be >= 0"),
    ("training", "seed"): _rule(lambda v: v >= 0, "must be >= 0"),
    ("data", "capacity"): _rule(lambda v: v >= 1, "must be >= 1"),
    ("data", "max_mb"): _rule(lambda v: v >= 0, "must be >= 0 (0: no budget)"),
    ("data", "holdout_fraction"): _rule(lambda v: 0 < v <= 0.5, "must be in (0, 0.5]"),
    ("data", "min_holdout"): _rule(lambda v: v >= 1, "must be >= 1"),
    ("mqtt", "host"): _rule(lambda v: bool(v), "is required"),
    ("mqtt", "port"): _rule(lambda v: 1 <= v <= 65535, "must be in 1..65535"),
    ("mqtt", "keepalive"): _rule(lambda v: v >= 1, "must be >= 1"),
    ("mqtt", "status_interval_s"): _rule(lambda v: v > 0, "must be > 0"),
    ("trust", "min_sequence"): _rule(lambda v: v >= 0, "must be >= 0"),
    ("model", "name"): _rule(lambda v: bool(v), "must not be empty"),
    ("model", "keep_versions"): _rule(lambda v: v >= 1, "must be >= 1"),
    ("flower", "port"): _rule(lambda v: 0 <= v <= 65535, "must be in 0..65535"),
    ("flower", "task_timeout_s"): _rule(lambda v: v > 0, "must be > 0"),
    ("metrics", "port"): _rule(lambda v: 0 <= v <= 65535, "must be in 0..65535"),
}


def _mqtt_needs_a_signing_key(settings: Settings) -> list[str]:
    if settings.mqtt is not None and settings.trust.signing_public_key is None:
        return ["[trust] signing_public_key is required when [mqtt] is configured"]
    return []


def _finish(
    settings: Settings, base_dir: Path | None, given: frozenset[tuple[str, str]]
) -> Settings:
    """The device id defaults to the host name; the default data_dir sits next to the file."""
    device = settings.device
    if not device.id:
        device = dataclasses.replace(device, id=socket.gethostname())
    if ("device", "data_dir") not in given and base_dir is not None:
        device = dataclasses.replace(device, data_dir=base_dir / DEFAULT_DATA_DIR)
    return dataclasses.replace(settings, device=device)


SCHEMA = Schema(
    Settings,
    error=ConfigError,
    rules=RULES,
    checks=[_mqtt_needs_a_signing_key],
    relative_to_file=True,
    finish=_finish,
)
"""How ``edge.toml`` is read and checked."""


def load_settings(
    path: Path | str | None = None, *, env: Mapping[str, str] | None = None
) -> Settings:
    """Read ``path`` (TOML; optional) and apply ``EDGEFL_*`` overrides from ``env``.

    ``env`` defaults to ``os.environ``. Raises :class:`ConfigError` listing every problem.
    """
    return SCHEMA.load(path, env=env)


def render_settings(settings: Settings, *, header: str = "") -> str:
    """``settings`` as a complete ``edge.toml`` (``header``: ``#`` comment lines first)."""
    return to_toml(settings, header=header)


def write_settings(settings: Settings, path: Path, *, header: str = "") -> Path:
    """Write ``settings`` to ``path`` as a complete ``edge.toml``; returns ``path``."""
    path.write_text(render_settings(settings, header=header), encoding="utf-8")
    return path
