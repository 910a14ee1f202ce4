"""Typed settings for the cloud side, loaded from ``cloud.toml``.

``edgefl cloud init`` writes a complete file; every key has a default here, so a file
only needs what differs. Environment variables ``EDGEFL_<SECTION>_<KEY>`` override the
file (``EDGEFL_RUN_NUM_ROUNDS=5``). Unknown sections or keys are errors, and every
problem in a file is reported at once.

Relative paths are resolved against the directory that holds the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

DEFAULT_FLEET = "demo"
#: Rounds in one run.
DEFAULT_NUM_ROUNDS = 10
#: Seconds the aggregator waits for the replies of one round; slower devices drop out.
DEFAULT_ROUND_TIMEOUT_S = 120.0
#: Largest MQTT message a release is split into (bytes); fits EMQX (1 MB) and AWS IoT (128 KB).
DEFAULT_CHUNK_SIZE = 128 * 1024
#: Seconds a round waits for its release while the broker is away.
DEFAULT_RELEASE_WAIT_S = 1800.0


class ConfigError(ValueError):
    """A configuration file or override with one or more problems (all listed)."""


@dataclass
class CloudSection:
    #: Where the cloud keeps its state (registry, keys, broker data, logs).
    data_dir: Path = Path("data")
    #: The fleet name: it is part of every MQTT topic and every release manifest.
    fleet: str = DEFAULT_FLEET


@dataclass
class SuperLinkSection:
    host: str = "127.0.0.1"
    #: 0 picks a free port at start (printed, and written to data_dir/superlink.port).
    port: int = 0
    #: TLS certificate/key for the SuperLink and the CA devices use to verify it.
    certfile: Path | None = None
    keyfile: Path | None = None
    ca_certfile: Path | None = None
    #: Accept only SuperNodes whose public key was registered (needs TLS).
    supernode_auth: bool = False


@dataclass
class ProxySection:
    #: Put nginx in front of the SuperLink: superlink.host:superlink.port (the fleet port)
    #: then serves only the Fleet API, and the SuperLink with its Control API listens on
    #: loopback only. Turning it off keeps the SuperLink on loopback (cloud up refuses a
    #: non-loopback superlink.host without the proxy).
    enabled: bool = True
    #: The SuperLink's own loopback port behind the proxy (0 picks a free port at start,
    #: written to data_dir/superlink.port).
    superlink_port: int = 0
    #: Largest request body the proxy forwards, in MiB (Fleet messages carry weights).
    max_body_mb: int = 256


@dataclass
class BrokerSection:
    #: Start and supervise a Mosquitto broker; false means use an existing one.
    managed: bool = True
    host: str = "127.0.0.1"
    port: int = 0
    #: Credentials the cloud uses to publish releases (secure fleets).
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    #: TLS and access control files for a managed broker (written by `cloud init --secure`).
    certfile: Path | None = None
    keyfile: Path | None = None
    broker_password_file: Path | None = None
    acl_file: Path | None = None


@dataclass
class RegistrySection:
    #: Any SQLAlchemy URL; empty means SQLite at data_dir/registry.db.
    url: str = ""


@dataclass
class WebSection:
    host: str = "127.0.0.1"
    port: int = 0
    #: File holding the operator token that write actions need (mode 0600).
    operator_token_file: Path | None = None


@dataclass
class ModelSection:
    #: Directory with model.tflite + card.json written by `edgefl model build`.
    dir: Path = Path("model")


@dataclass
class SigningSection:
    private_key: Path = Path("keys/signing.pem")
    public_key: Path = Path("keys/signing.pub")


@dataclass
class RunSection:
    num_rounds: int = DEFAULT_NUM_ROUNDS
    #: fedavg, fedprox, fedadam or fedmedian.
    strategy: str = "fedavg"
    #: Fraction of connected devices sampled into each round.
    fraction_train: float = 1.0
    #: Fewest devices a round starts with; a round waits at most `wait_for_nodes_s` for them.
    min_nodes: int = 1
    wait_for_nodes_s: float = 60.0
    round_timeout_s: float = DEFAULT_ROUND_TIMEOUT_S
    local_epochs: int = 5
    learning_rate: float = 0.2
    proximal_mu: float = 0.01
    #: Server-side learning rate for fedadam.
    server_learning_rate: float = 0.05
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: Seconds a round waits for its release while the broker (or the release signer)
    #: is away; after that the run is interrupted and the next `cloud up` resumes it.
    release_wait_s: float = DEFAULT_RELEASE_WAIT_S
    #: Held-out data the cloud evaluates each global model on: "digits" or "none".
    evaluation: str = "digits"
    seed: int = 0


@dataclass
class CloudSettings:
    cloud: CloudSection = field(default_factory=CloudSection)
    superlink: SuperLinkSection = field(default_factory=SuperLinkSection)
    proxy: ProxySection = field(default_factory=ProxySection)
    broker: BrokerSection = field(default_factory=BrokerSection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    web: WebSection = field(default_factory=WebSection)
    model: ModelSection = field(default_factory=ModelSection)
    signing: SigningSection = field(default_factory=SigningSection)
    run: RunSection = field(default_factory=RunSection)
    #: The file these settings came from (None when built in code).
    source: Path | None = None

    @property
    def data_dir(self) -> Path:
        return self.cloud.data_dir

    @property
    def registry_url(self) -> str:
        return self.registry.url or f"sqlite:///{self.data_dir / 'registry.db'}"

    def validate(self) -> None:
        problems: list[str] = []
        if self.run.strategy not in STRATEGIES:
            problems.append(
                f"run.strategy {self.run.strategy!r} is not one of {', '.join(STRATEGIES)}"
            )
        if self.run.num_rounds < 1:
            problems.append("run.num_rounds must be at least 1")
        if not 0 < self.run.fraction_train <= 1:
            problems.append("run.fraction_train must be in (0, 1]")
        if self.run.min_nodes < 1:
            problems.append("run.min_nodes must be at least 1")
        if self.run.release_wait_s <= 0:
            problems.append("run.release_wait_s must be positive")
        if self.run.round_timeout_s <= 0:
            problems.append("run.round_timeout_s must be positive")
        if not 1024 <= self.run.chunk_size <= 64 * 1024 * 1024:
            problems.append("run.chunk_size must be between 1 KiB and 64 MiB")
        if self.run.evaluation not in ("digits", "none"):
            problems.append("run.evaluation must be 'digits' or 'none'")
        if not self.proxy.enabled and self.superlink.host not in LOOPBACK_HOSTS:
            problems.append(
                f"superlink.host {self.superlink.host!r} without [proxy] would open the "
                "SuperLink's Control API (runs, SuperNode registration) to the network: "
                "set proxy.enabled = true, or keep superlink.host on loopback"
            )
        if self.proxy.max_body_mb < 1:
            problems.append("proxy.max_body_mb must be at least 1")
        if self.superlink.supernode_auth and self.superlink.certfile is None:
            problems.append("superlink.supernode_auth needs TLS (superlink.certfile/keyfile)")
        from protos.topics import TopicError, check_name

        try:
            check_name(self.cloud.fleet, what="cloud.fleet")
        except TopicError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("invalid cloud settings:\n  - " + "\n  - ".join(problems))


STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian")
#: Hosts that only this machine reaches.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

_SECTIONS = {f.name: f.type for f in dataclasses.fields(CloudSettings) if f.name != "source"}


def _coerce(value: Any, annotation: Any, where: str, problems: list[str]) -> Any:
    text = str(annotation)
    if value is None:
        return None
    try:
        if "Path" in text:
            if "\0" in str(value):
                raise ValueError(value)
            return Path(str(value))
        if annotation is bool or text == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if annotation is int or text == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if annotation is float or text == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        problems.append(f"{where}: {value!r} is not a valid {text.replace('pathlib.', '')}")
        return None


def from_dict(
    doc: dict[str, Any], *, base_dir: Path | None = None, env: dict[str, str] | None = None
) -> CloudSettings:
    """Build settings from a parsed TOML document plus ``EDGEFL_*`` overrides."""
    env = dict(os.environ) if env is None else env
    problems: list[str] = []
    settings = CloudSettings()
    for section in doc:
        if section not in _SECTIONS:
            problems.append(f"unknown section [{section}] (known: {', '.join(_SECTIONS)})")
    for section_name in _SECTIONS:
        section = getattr(settings, section_name)
        hints = get_type_hints(type(section))
        values = doc.get(section_name, {})
        if not isinstance(values, dict):
            problems.append(f"[{section_name}] must be a table")
            continue
        for key in values:
            if key not in hints:
                problems.append(f"unknown key {section_name}.{key} (known: {', '.join(hints)})")
        for key, annotation in hints.items():
            env_key = f"EDGEFL_{section_name}_{key}".upper()
            if env_key in env:
                raw: Any = env[env_key]
            elif key in values:
                raw = values[key]
            else:
                continue
            setattr(section, key, _coerce(raw, annotation, f"{section_name}.{key}", problems))
    if problems:
        raise ConfigError("invalid cloud settings:\n  - " + "\n  - ".join(problems))
    if base_dir is not None:
        _resolve_paths(settings, base_dir)
    settings.validate()
    return settings


def _resolve_paths(settings: CloudSettings, base: Path) -> None:
    settings.cloud.data_dir = (base / settings.cloud.data_dir).resolve()
    data = settings.cloud.data_dir
    for section_name in _SECTIONS:
        section = getattr(settings, section_name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, Path) and not value.is_absolute() and f.name != "data_dir":
                # Files the cloud owns live under data_dir; the rest next to the file.
                setattr(section, f.name, (data / value).resolve())


def load(path: Path, *, env: dict[str, str] | None = None) -> CloudSettings:
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file (create one with `edgefl cloud init`)") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    settings = from_dict(doc, base_dir=path.resolve().parent, env=env)
    settings.source = path.resolve()
    return settings


def to_toml(settings: CloudSettings) -> str:
    """Render settings as TOML (paths absolute), the inverse of :func:`load`."""
    lines: list[str] = []
    for section_name in _SECTIONS:
        section = getattr(settings, section_name)
        lines.append(f"[{section_name}]")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if value is None:
                continue
            if isinstance(value, bool):
                lines.append(f"{f.name} = {'true' if value else 'false'}")
            elif isinstance(value, int | float):
                lines.append(f"{f.name} = {value}")
            else:
                lines.append(f"{f.name} = {toml_string(str(value))}")
        lines.append("")
    return "\n".join(lines)


def toml_string(value: object) -> str:
    """A TOML basic string for ``str(value)`` (JSON string escapes are valid TOML)."""
    return json.dumps(str(value))
