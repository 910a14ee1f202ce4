"""Typed settings for the cloud side, loaded from ``cloud.toml``.

``edgefl cloud init`` writes a complete file; every key has a default here, so a file
only needs what differs. Environment variables ``EDGEFL_<SECTION>_<KEY>`` override the
file (``EDGEFL_RUN_NUM_ROUNDS=5``). Unknown sections or keys, in the file or among
``EDGEFL_<SECTION>_*`` variables of a cloud section, and values of the wrong type are
errors; every problem is reported at once in one :class:`ConfigError`. The mechanism
(types, rules, environment, writer) is :mod:`edge.settings`, shared with the device
settings.

Relative paths: ``[cloud] data_dir`` resolves against the directory that holds the
file; every other relative path, from the file or the environment, resolves under
``data_dir`` (the files the cloud owns live there: ``model.dir = "model"`` is
``<data_dir>/model``). ``edgefl cloud init`` and :func:`to_toml` write absolute paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.errors import CloudError
from edge.errors import ConfigError as SettingsError
from edge.settings import Rule, Schema, sections_of, to_toml

__all__ = ["CloudSettings", "ConfigError", "from_dict", "load", "to_toml"]

DEFAULT_FLEET = "demo"
"""Fleet of a cloud whose file does not say."""
DEFAULT_NUM_ROUNDS = 10
"""Rounds in one run."""
DEFAULT_ROUND_TIMEOUT_S = 120.0
"""Seconds the aggregator waits for the replies of one round; slower devices drop out."""
DEFAULT_CHUNK_SIZE = 128 * 1024
"""Largest MQTT message a release is split into (bytes); fits EMQX (1 MB) and AWS IoT
(128 KB)."""
DEFAULT_RELEASE_WAIT_S = 1800.0
"""Seconds a round waits for its release while the broker is away."""
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian")
"""Aggregation strategies ``[run] strategy`` names."""
EVALUATIONS = ("digits", "none")
"""Held-out data ``[run] evaluation`` names."""
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Hosts that only this machine reaches."""


class ConfigError(CloudError, SettingsError, ValueError):
    """A ``cloud.toml`` or override with one or more problems (all listed)."""

    subject = "cloud settings"

    @classmethod
    def describe(cls, problems: list[str]) -> str:
        """The message for ``problems``: one per line."""
        return f"invalid {cls.subject}:\n  - " + "\n  - ".join(problems)


@dataclass
class CloudSection:
    """``[cloud]``: where the cloud keeps its state and which fleet it runs."""

    data_dir: Path = Path("data")
    """Where the cloud keeps its state (registry, keys, broker data, logs)."""
    fleet: str = DEFAULT_FLEET
    """The fleet name: it is part of every MQTT topic and every release manifest."""


@dataclass
class SuperLinkSection:
    """``[superlink]``: the Flower SuperLink (its Fleet API is the fleet port)."""

    host: str = "127.0.0.1"
    """Address the fleet port binds."""
    port: int = 0
    """0 picks a free port at start (printed, and written to data_dir/superlink.port)."""
    certfile: Path | None = None
    """TLS certificate of the SuperLink."""
    keyfile: Path | None = None
    """TLS private key of the SuperLink."""
    ca_certfile: Path | None = None
    """The CA devices use to verify the SuperLink."""
    supernode_auth: bool = False
    """Accept only SuperNodes whose public key was registered (needs TLS)."""


@dataclass
class ProxySection:
    """``[proxy]``: nginx in front of the SuperLink."""

    enabled: bool = True
    """superlink.host:superlink.port (the fleet port) then serves only the Fleet API, and
    the SuperLink with its Control API listens on loopback only. Turning it off keeps the
    SuperLink on loopback (a non-loopback superlink.host without the proxy is an error)."""
    superlink_port: int = 0
    """The SuperLink's own loopback port behind the proxy (0 picks a free port at start,
    written to data_dir/superlink.port)."""
    max_body_mb: int = 256
    """Largest request body the proxy forwards, in MiB (Fleet messages carry weights)."""


@dataclass
class BrokerSection:
    """``[broker]``: the MQTT broker releases are published on."""

    managed: bool = True
    """Start and supervise a Mosquitto broker; false means use an existing one."""
    host: str = "127.0.0.1"
    """Broker address."""
    port: int = 0
    """Broker port; 0 picks a free one for a managed broker."""
    username: str | None = None
    """User the cloud publishes releases as (secure fleets)."""
    password_file: Path | None = None
    """File with that user's password."""
    ca_file: Path | None = None
    """CA that signed the broker's certificate; when set, the cloud connects with TLS."""
    certfile: Path | None = None
    """TLS certificate of a managed broker (written by `cloud init --secure`)."""
    keyfile: Path | None = None
    """TLS private key of a managed broker."""
    broker_password_file: Path | None = None
    """Mosquitto password file of a managed broker."""
    acl_file: Path | None = None
    """Mosquitto ACL file of a managed broker."""


@dataclass
class RegistrySection:
    """``[registry]``: the model and device registry database."""

    url: str = ""
    """Any SQLAlchemy URL; empty means SQLite at data_dir/registry.db."""


@dataclass
class WebSection:
    """``[web]``: the operator UI and its JSON API."""

    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = 0
    """Port to bind; 0 picks a free one."""
    operator_token_file: Path | None = None
    """File holding the operator token that write actions need (mode 0600)."""


@dataclass
class ModelSection:
    """``[model]``: the model the fleet trains."""

    dir: Path = Path("model")
    """Directory with model.tflite + card.json written by `edgefl model build`."""


@dataclass
class SigningSection:
    """``[signing]``: the Ed25519 key pair release manifests are signed with."""

    private_key: Path = Path("keys/signing.pem")
    """The private key (mode 0600; only the signer reads it)."""
    public_key: Path = Path("keys/signing.pub")
    """The public key every device is given."""


@dataclass
class RunSection:
    """``[run]``: the federated run ``cloud up`` submits."""

    num_rounds: int = DEFAULT_NUM_ROUNDS
    """Rounds in one run."""
    strategy: str = "fedavg"
    """One of :data:`STRATEGIES`."""
    fraction_train: float = 1.0
    """Fraction of connected devices sampled into each round."""
    min_nodes: int = 1
    """Fewest devices a round starts with; a round waits at most `wait_for_nodes_s` for them."""
    wait_for_nodes_s: float = 60.0
    """Seconds a round waits for `min_nodes` devices."""
    round_timeout_s: float = DEFAULT_ROUND_TIMEOUT_S
    """Seconds a round waits for replies; slower devices drop out of it."""
    local_epochs: int = 5
    """Epochs each device trains per round."""
    learning_rate: float = 0.2
    """Devices' SGD learning rate."""
    proximal_mu: float = 0.01
    """FedProx proximal coefficient (fedprox only)."""
    server_learning_rate: float = 0.05
    """Server-side learning rate for fedadam."""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    """Largest MQTT message a release is split into (bytes)."""
    release_wait_s: float = DEFAULT_RELEASE_WAIT_S
    """Seconds a round waits for its release while the broker (or the release signer)
    is away; after that the run is interrupted and the next `cloud up` resumes it."""
    evaluation: str = "digits"
    """Held-out data the cloud evaluates each global model on: one of :data:`EVALUATIONS`."""
    seed: int = 0
    """Seed of sampling and of the cloud's evaluation split."""


@dataclass
class RolloutSection:
    """``[rollout]``: how a new global version becomes the fleet's served version.

    Parsed and checked by :mod:`cloud.rollout_policy`; run by :mod:`cloud.rollout`.
    """

    policy: str = "immediate"
    """"immediate": every round's version goes to the whole fleet at once (a retained
    release). "staged": it goes phase by phase, each phase gated by the devices' checks."""
    phases: str = "0.1, 0.5, 1.0"
    """Cumulative fractions of the online fleet per phase, comma-separated, ascending,
    the last one 1.0."""
    min_devices: str = "1, 2, 1"
    """Fewest devices in each phase, one count per phase, comma-separated."""
    max_accuracy_drop: float = 0.05
    """Largest drop of local accuracy (served version minus candidate, mean over the
    phase's checks weighted by their samples) a phase may show."""
    max_install_failures: int = 0
    """Most devices of a phase whose install or check of the candidate may fail."""
    max_inference_error_rate: str = "0"
    """Largest inference error rate of the candidate in a phase: its inference calls on
    the devices' held-out samples that raised or gave NaN/infinite outputs, over all its
    calls in the phase's checks. One rate in [0, 1] for every phase, or one per phase,
    comma-separated ("0, 0, 0.01")."""
    soak_s: float = 5.0
    """Seconds a phase stays open at least, even when every device has reported."""
    phase_timeout_s: float = 120.0
    """Seconds after which a phase is decided with the reports it has."""
    silent_devices: str = "ignore"
    """A device of the phase that reported nothing by the timeout: "ignore" (not
    counted) or "failure" (counted as an install failure). A phase needs one check."""
    on_failure: str = "rollback"
    """When a gate fails: "rollback" (devices serving the candidate return to the
    fleet's served version) or "halt" (they keep it; nothing moves further)."""


@dataclass
class CloudSettings:
    """Everything the cloud reads at start."""

    cloud: CloudSection = field(default_factory=CloudSection)
    superlink: SuperLinkSection = field(default_factory=SuperLinkSection)
    proxy: ProxySection = field(default_factory=ProxySection)
    broker: BrokerSection = field(default_factory=BrokerSection)
    registry: RegistrySection = field(default_factory=RegistrySection)
    web: WebSection = field(default_factory=WebSection)
    model: ModelSection = field(default_factory=ModelSection)
    signing: SigningSection = field(default_factory=SigningSection)
    run: RunSection = field(default_factory=RunSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    source: Path | None = None
    """The file these settings came from (None when built in code)."""

    @property
    def data_dir(self) -> Path:
        """Where the cloud keeps its state."""
        return self.cloud.data_dir

    @property
    def registry_url(self) -> str:
        """The registry database: ``[registry] url`` or SQLite under data_dir."""
        return self.registry.url or f"sqlite:///{self.data_dir / 'registry.db'}"

    def validate(self) -> None:
        """Raise :class:`ConfigError` listing every broken rule or check."""
        SCHEMA.validate(self)


def _port(check: str = "0..65535") -> Rule:
    return Rule(lambda v: 0 <= v <= 65535, f"must be in {check}")


RULES: dict[tuple[str, str], Rule] = {
    ("superlink", "port"): _port(),
    ("proxy", "superlink_port"): _port(),
    ("proxy", "max_body_mb"): Rule(lambda v: v >= 1, "must be >= 1"),
    ("broker", "port"): _port(),
    ("web", "port"): _port(),
    ("run", "num_rounds"): Rule(lambda v: v >= 1, "must be >= 1"),
    ("run", "strategy"): Rule(
        lambda v: v in STRATEGIES, f"must be one of {', '.join(map(repr, STRATEGIES))}"
    ),
    ("run", "fraction_train"): Rule(lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("run", "min_nodes"): Rule(lambda v: v >= 1, "must be >= 1"),
    ("run", "round_timeout_s"): Rule(lambda v: v > 0, "must be > 0"),
    ("run", "release_wait_s"): Rule(lambda v: v > 0, "must be > 0"),
    ("run", "chunk_size"): Rule(
        lambda v: 1024 <= v <= 64 * 1024 * 1024, "must be between 1 KiB and 64 MiB"
    ),
    ("run", "evaluation"): Rule(
        lambda v: v in EVALUATIONS, f"must be one of {', '.join(map(repr, EVALUATIONS))}"
    ),
}
"""Checks of single keys beyond their types."""


def _control_api_stays_private(s: CloudSettings) -> list[str]:
    if not s.proxy.enabled and s.superlink.host not in LOOPBACK_HOSTS:
        return [
            f"superlink.host {s.superlink.host!r} without [proxy] would open the "
            "SuperLink's Control API (runs, SuperNode registration) to the network: "
            "set proxy.enabled = true, or keep superlink.host on loopback"
        ]
    return []


def _supernode_auth_needs_tls(s: CloudSettings) -> list[str]:
    if s.superlink.supernode_auth and s.superlink.certfile is None:
        return ["superlink.supernode_auth needs TLS (superlink.certfile/keyfile)"]
    return []


def _fleet_is_a_topic_name(s: CloudSettings) -> list[str]:
    from protos.topics import TopicError, check_name

    try:
        check_name(s.cloud.fleet, what="cloud.fleet")
    except TopicError as exc:
        return [str(exc)]
    return []


def _rollout_policy_is_valid(s: CloudSettings) -> list[str]:
    from cloud.rollout_policy import policy_problems

    return policy_problems(s.rollout)


def _anchor_paths(
    s: CloudSettings, base_dir: Path | None, given: frozenset[tuple[str, str]]
) -> CloudSettings:
    """data_dir against the file's directory, every other relative path under data_dir."""
    if base_dir is None:
        return s
    data = (base_dir / s.cloud.data_dir).resolve()
    s.cloud.data_dir = data
    for name, info in sections_of(CloudSettings).items():
        section = getattr(s, name)
        for key in info.path_keys():
            value = getattr(section, key)
            if (name, key) != ("cloud", "data_dir") and value and not value.is_absolute():
                setattr(section, key, (data / value).resolve())
    return s


SCHEMA = Schema(
    CloudSettings,
    error=ConfigError,
    rules=RULES,
    checks=[
        _control_api_stays_private,
        _supernode_auth_needs_tls,
        _fleet_is_a_topic_name,
        _rollout_policy_is_valid,
    ],
    relative_to_file=False,
    finish=_anchor_paths,
    missing_hint="create one with `edgefl cloud init`",
)
"""How ``cloud.toml`` is read and checked."""


def from_dict(
    doc: Mapping[str, Any],
    *,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> CloudSettings:
    """Build settings from a parsed TOML document plus ``EDGEFL_*`` overrides.

    ``env`` defaults to ``os.environ``; ``base_dir`` is the file's directory (relative
    paths stay relative without it).
    """
    return SCHEMA.from_document(doc, base_dir=base_dir, env=env)


def load(path: Path, *, env: Mapping[str, str] | None = None) -> CloudSettings:
    """Read ``cloud.toml`` at ``path`` with ``EDGEFL_*`` overrides from ``env``."""
    settings = SCHEMA.load(path, env=env)
    settings.source = Path(path).resolve()
    return settings

