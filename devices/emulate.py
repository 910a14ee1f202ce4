"""Fleet emulation: N virtual devices on this machine, each a real ``edgefl edge up``.

Every emulated device is a separate process tree (edge services + MQTT agent +
Flower SuperNode) with its own data directory, its own ports and its own partition
of the digits data (IID or Dirichlet non-IID, seeded). A device boots either from a
flashed bundle (``edge.toml`` inside it) or from a configuration generated here for a
plain loopback fleet.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edge.process import ManagedProcess, ProcessError, connect_host

if TYPE_CHECKING:
    from cloud.config import CloudSettings
    from cloud.supervisor import CloudStack

logger = logging.getLogger(__name__)

_UP = re.compile(r"edgefl edge up: device (\S+) serving on (\S+)")
START_TIMEOUT_S = 90.0


@dataclass
class FleetSpec:
    """Where the emulated devices connect and what data they hold."""

    fleet: str
    broker_host: str
    broker_port: int
    superlink: str
    signing_public_key: Path
    initial_package: Path | None
    card_json: str
    scheme: Literal["iid", "dirichlet"] = "dirichlet"
    alpha: float = 0.5
    seed: int = 0
    status_interval_s: float = 2.0
    profile: str = "x86-64-gateway"


def stack_fleet_spec(
    settings: CloudSettings, stack: CloudStack, *, superlink: str | None = None, **options: Any
) -> FleetSpec:
    """The spec of a fleet for a started local ``CloudStack``: its broker, signing key,
    initial package and model card, and its Fleet API (``superlink``: another address)."""
    return FleetSpec(
        fleet=settings.cloud.fleet,
        broker_host=connect_host(settings.broker.host),
        broker_port=stack.runtime_settings.broker.port,
        superlink=superlink or stack.fleet_address,
        signing_public_key=settings.signing.public_key,
        initial_package=settings.data_dir / "initial.pkg",
        card_json=(settings.model.dir / "card.json").read_text(),
        **options,
    )


def write_device_config(spec: FleetSpec, name: str, root: Path) -> Path:
    """A plain (loopback, no TLS) ``edge.toml`` for one emulated device."""
    from edge import config as edge_config

    root.mkdir(parents=True, exist_ok=True)
    settings = edge_config.Settings(
        device=edge_config.DeviceSettings(
            id=name, fleet=spec.fleet, profile=spec.profile, data_dir=root / "data"
        ),
        grpc=edge_config.GrpcSettings(port=0),
        mqtt=edge_config.MqttSettings(
            host=spec.broker_host,
            port=spec.broker_port,
            status_interval_s=spec.status_interval_s,
        ),
        trust=edge_config.TrustSettings(signing_public_key=spec.signing_public_key),
        flower=edge_config.FlowerSettings(superlink=spec.superlink),
        model=edge_config.ModelSettings(initial_package=spec.initial_package),
    )
    return edge_config.write_settings(settings, root / "edge.toml")


def load_partitions(spec: FleetSpec, data_dirs: list[Path]) -> list[int]:
    """Fill each device's local data store with its partition; returns sample counts."""
    from devices.datasets import device_partitions, load_digits
    from edge.local_data import LocalData, SampleSpec
    from edge.model_card import ModelCard

    card = ModelCard.from_json(spec.card_json)
    layout: Literal["flat", "image"] = "flat" if len(card.input_shape) == 1 else "image"
    dataset = load_digits(layout=layout, seed=spec.seed)
    parts = device_partitions(
        dataset, len(data_dirs), scheme=spec.scheme, alpha=spec.alpha, seed=spec.seed
    )
    counts = []
    for part, data_dir in zip(parts, data_dirs, strict=True):
        store = LocalData(data_dir / "samples", spec=SampleSpec(card.input_shape, card.classes))
        store.clear()
        counts.append(store.append(part.x, part.y).total)
    return counts


@dataclass
class EmulatedDevice:
    name: str
    config: Path
    process: ManagedProcess | None = None
    address: str = ""
    #: Environment overrides (``EDGEFL_*``) for a device booted from a flashed bundle.
    env: dict[str, str] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return Path(self.env.get("EDGEFL_DEVICE_DATA_DIR", self.config.parent / "data"))

    def start(self) -> EmulatedDevice:
        log = self.config.parent / "logs" / "up.log"
        offset = log.stat().st_size if log.exists() else 0
        self.process = ManagedProcess(
            f"device {self.name}",
            [sys.executable, "-m", "edge.cli", "edge", "up", "--config", str(self.config)],
            log_path=log,
            env=self.env,
        )
        # Held before it starts: an interrupt right after the fork still finds it to stop.
        self.process.start()

        def ready() -> bool:
            with open(log, "rb") as fh:
                fh.seek(offset)
                match = _UP.search(fh.read().decode(errors="replace"))
            if match:
                self.address = match.group(2)
            return bool(match)

        self.process.wait_until(ready, timeout=START_TIMEOUT_S, what="up")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=20)

    def kill(self) -> None:
        """SIGKILL the device's whole process tree (power loss)."""
        if self.process is not None:
            self.process.kill_tree()


@dataclass
class EmulatedFleet:
    spec: FleetSpec
    root: Path
    count: int
    devices: list[EmulatedDevice] = field(default_factory=list)
    prefix: str = "dev"

    def from_bundles(self, bundles: list[Path]) -> list[int]:
        """Boot each device only from its flashed bundle (a ``.tar.gz`` or a directory).

        A bundle names the paths of a real device (``/var/lib/edgefl``, fixed ports);
        on one machine each emulated device gets its own data directory and free ports
        through ``EDGEFL_*`` overrides, and nothing else changes.
        """
        import tarfile

        self.devices = []
        for bundle in bundles:
            if bundle.is_dir():
                root = bundle
            else:
                target = self.root / bundle.name.removesuffix(".tar.gz")
                target.mkdir(parents=True, exist_ok=True)
                with tarfile.open(bundle) as tar:
                    tar.extractall(target, filter="data")
                root = target / "edgefl"
            config = root / "edge.toml"
            identity = json.loads((root / "identity.json").read_text())
            name = str(identity["device"])
            env = {
                "EDGEFL_DEVICE_DATA_DIR": str(self.root / name / "data"),
                "EDGEFL_GRPC_PORT": "0",
                "EDGEFL_FLOWER_PORT": "0",
            }
            self.devices.append(EmulatedDevice(name, config, env=env))
        self.count = len(self.devices)
        return load_partitions(self.spec, [d.data_dir for d in self.devices])

    def prepare(self) -> list[int]:
        names = [f"{self.prefix}-{i + 1}" for i in range(self.count)]
        self.devices = [
            EmulatedDevice(name, write_device_config(self.spec, name, self.root / name))
            for name in names
        ]
        return load_partitions(self.spec, [self.root / n / "data" for n in names])

    def start(self) -> EmulatedFleet:
        if not self.devices:
            self.prepare()
        try:
            for device in self.devices:
                device.start()
                logger.info("device %s up (services on %s)", device.name, device.address)
        except (ProcessError, OSError):
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for device in reversed(self.devices):
            try:
                device.stop()
            except Exception:
                logger.exception("stopping %s failed", device.name)

    def __enter__(self) -> EmulatedFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
