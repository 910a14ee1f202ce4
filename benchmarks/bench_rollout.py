"""Staged rollouts (issue 19): time to reach the whole fleet, and what a bad round costs.

What runs, all in this process except Mosquitto (:class:`cloud.broker.Broker` on a free
port): N real :class:`edge.agent.Agent` instances, each with a :class:`BenchNode` (the
package kept in memory, its check done by a real LiteRT interpreter on the device's own
digits partition); the cloud side is the real :class:`cloud.publisher.Publisher`,
:class:`cloud.fleet_monitor.FleetMonitor`, a SQLite :class:`cloud.registry.Registry` and
the real :class:`cloud.rollout.RolloutController` with the default staged policy of
``[rollout]`` (only ``policy = "staged"`` changed).

Measured, per fleet size:

* **to 100 % serving**: from the moment a round's version is handed over (published at
  once under ``immediate``, submitted to the controller under ``staged``) until the
  monitor has seen every device serve it;
* **a bad round** (the trained model with its classes shifted by one: finite weights,
  near-zero accuracy), under both policies: the device-seconds the bad model was served
  (sampled every 50 ms until the bad round is decided, and under ``immediate`` for the
  same time a staged rollout took to decide), and the accuracy on the held-out digits of
  what the fleet serves after it.

Run ``python -m benchmarks.bench_rollout [--quick]``.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Report, Result, benchmark_main, finish_report, mlp_model_dir

logger = logging.getLogger(__name__)

FLEET = "bench"
WAIT_S = 180.0
FULL_SIZES = (5, 50)
QUICK_SIZES = (5,)


class BenchNode:
    """A device for the agent: packages in memory, checks on its own samples with LiteRT."""

    def __init__(self, device_id: str, x: np.ndarray, y: np.ndarray) -> None:
        self.device_id = device_id
        self.x, self.y = x, y
        self.stored: dict[int, bytes] = {}
        self.serving = 0
        self._state: dict[str, Any] = {}
        self._lock = threading.Lock()

    def serving_version(self) -> int:
        return self.serving

    def install_release(self, version: int, data: bytes, sha256: str) -> None:
        from protos import codec

        codec.package_from_bytes(data)
        with self._lock:
            self.stored[version] = data
            self.serving = version

    def stage_release(self, version: int, data: bytes, sha256: str) -> None:
        from protos import codec

        codec.package_from_bytes(data)
        with self._lock:
            self.stored[version] = data

    def has_version(self, version: int, sha256: str) -> bool:
        from protos import codec

        data = self.stored.get(version)
        return data is not None and codec.sha256_hex(data) == sha256

    def activate(self, version: int) -> None:
        with self._lock:
            if version not in self.stored:
                raise RuntimeError(f"version {version} is not stored")
            self.serving = version

    def check_candidate(self, version: int, served_version: int) -> dict[str, float]:
        cand = _accuracy(self.stored[version], self.x, self.y)
        served = _accuracy(
            self.stored.get(served_version, self.stored[self.serving]), self.x, self.y
        )
        return {
            "candidate_accuracy": cand,
            "served_accuracy": served,
            "candidate_loss": 0.0,
            "served_loss": 0.0,
            "examples": float(len(self.y)),
        }

    def status(self) -> Any:
        from protos import codec

        return codec.DeviceStatus(
            device_id=self.device_id,
            fleet=FLEET,
            serving_version=self.serving,
            state="SERVING" if self.serving else "DEGRADED",
            timestamp_ms=int(time.time() * 1000),
        )

    def read_state(self) -> dict[str, Any]:
        return dict(self._state)

    def write_state(self, state: dict[str, Any]) -> None:
        self._state = dict(state)


def _accuracy(package: bytes, x: np.ndarray, y: np.ndarray) -> float:
    from edge.litert_model import LiteRTModel
    from edge.model_card import ModelCard
    from protos import codec

    pkg = codec.package_from_bytes(package)
    model = LiteRTModel(pkg.tflite, ModelCard.from_json(pkg.card_json))
    model.set_weights(pkg.weights)
    return float(model.evaluate(x, y)["accuracy"])


@dataclasses.dataclass
class Cloud:
    broker: Any
    registry: Any
    settings: Any
    key: Any
    monitor: Any
    controller: Any

    def publisher(self) -> Any:
        from cloud.publisher import Publisher

        return Publisher(
            host=self.broker.host, port=self.broker.port, fleet=FLEET, signing_key=self.key
        )

    def release(self, version: int) -> None:
        from cloud.releases import publish_version

        with self.publisher() as pub:
            publish_version(self.registry, pub, version, pinned=False)


def _package(model_dir: Path, weights: dict[str, np.ndarray]) -> tuple[str, bytes]:
    from cloud.releases import package_weights

    return package_weights(model_dir, weights)


def _register(cloud: Cloud, model_dir: Path, weights: dict[str, np.ndarray], rnd: int) -> int:
    arch, data = _package(model_dir, weights)
    latest = cloud.registry.latest_version()
    v = cloud.registry.add_version(
        package=data,
        architecture_id=arch,
        round=rnd,
        run_id=None,
        parent_version=None if latest is None else latest.version,
        metrics={},
    )
    return int(v.version)


def _wait_all(nodes: Sequence[BenchNode], version: int, timeout: float = WAIT_S) -> float:
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    while any(n.serving != version for n in nodes):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the fleet did not reach version {version}")
        time.sleep(0.01)
    return time.perf_counter() - started


def _scenario(
    size: int, staged: bool, model_dir: Path, root: Path, *, soak_s: float | None = None
) -> dict[str, float]:
    from cloud import config as cloud_config
    from cloud.broker import Broker, BrokerConfig
    from cloud.fleet_monitor import FleetMonitor
    from cloud.registry import Registry
    from cloud.rollout import RolloutController
    from devices.datasets import device_partitions, load_digits
    from edge.agent import Agent, AgentSettings
    from edge.litert_model import LiteRTModel
    from edge.process import free_port
    from protos import signing

    data = load_digits(layout="flat", seed=0)
    parts = device_partitions(data, size, scheme="iid", alpha=0.5, seed=0)
    key = signing.generate_private_key()
    pub_path = root / "fleet.pub"
    signing.write_public_key(key.public_key(), pub_path)
    broker = Broker(BrokerConfig(port=free_port(), data_dir=root / "broker")).start()
    registry = Registry(f"sqlite:///{root / 'registry.db'}")
    settings = cloud_config.CloudSettings()
    settings.cloud.fleet = FLEET
    if staged:
        settings.rollout = dataclasses.replace(settings.rollout, policy="staged")
        if soak_s is not None:
            settings.rollout.soak_s = soak_s
    agents: list[Agent] = []
    monitor = controller = None
    try:
        cloud = Cloud(broker, registry, settings, key, None, None)

        def promote(version: int) -> int:
            cloud.release(version)
            return 0

        controller = RolloutController(
            settings, registry, publisher=cloud.publisher, promote=promote
        ).start()
        cloud.controller = controller

        def on_events(events: list[Any]) -> None:
            controller.on_events(events)  # type: ignore[union-attr]

        monitor = FleetMonitor(
            host=broker.host,
            port=broker.port,
            fleet=FLEET,
            on_status_batch=registry.upsert_device_statuses,
            on_event_batch=on_events,
        ).start()
        nodes = [BenchNode(f"d{i:03d}", p.x, p.y) for i, p in enumerate(parts)]
        for node in nodes:
            agent = Agent(
                AgentSettings(
                    device_id=node.device_id,
                    fleet=FLEET,
                    host=broker.host,
                    port=broker.port,
                    signing_public_key=pub_path,
                    status_interval_s=1.0,
                ),
                node,
            ).start()
            agents.append(agent)
        for agent in agents:
            agent.wait_connected(WAIT_S)
        base = LiteRTModel.load(model_dir)
        initial = base.get_weights()
        v1 = _register(cloud, model_dir, initial, 0)
        cloud.release(v1)
        _wait_all(nodes, v1)
        base.fit(data.train.x, data.train.y, epochs=20, lr=0.2, seed=0)
        good = base.get_weights()
        deadline = time.monotonic() + WAIT_S
        while len([d for d in registry.list_devices() if d.online]) < size:
            if time.monotonic() > deadline:
                raise RuntimeError("devices did not report")
            time.sleep(0.1)

        v2 = _register(cloud, model_dir, good, 1)
        started = time.perf_counter()
        if staged:
            controller.submit(v2)
        else:
            cloud.release(v2)
        _wait_all(nodes, v2)
        to_fleet = time.perf_counter() - started

        bad = {
            k: (np.roll(w, 1, axis=-1) if w.shape and w.shape[-1] == 10 else w)
            for k, w in good.items()
        }
        v3 = _register(cloud, model_dir, bad, 2)
        bad_seconds = 0.0
        tick = 0.05
        started = time.perf_counter()
        if staged:
            controller.submit(v3)
            while controller.status()["active"]["status"] == "running":  # type: ignore[index]
                bad_seconds += tick * sum(n.serving == v3 for n in nodes)
                time.sleep(tick)
                if time.perf_counter() - started > WAIT_S:
                    raise RuntimeError("the bad candidate was never decided")
        else:
            cloud.release(v3)
            hold = 10.0
            while time.perf_counter() - started < hold:
                bad_seconds += tick * sum(n.serving == v3 for n in nodes)
                time.sleep(tick)
        decided = time.perf_counter() - started
        served = {n.serving for n in nodes}
        served_version = max(served)
        served_accuracy = _accuracy(
            registry.version_bytes(served_version), data.test.x, data.test.y
        )
        return {
            "to_fleet_s": to_fleet,
            "bad_device_seconds": bad_seconds,
            "bad_decided_s": decided,
            "served_accuracy_after_bad": served_accuracy,
            "served_versions_after_bad": float(len(served)),
        }
    finally:
        for agent in agents:
            agent.stop(timeout=2.0)
        if monitor is not None:
            monitor.stop()
        if controller is not None:
            controller.stop()
        registry.close()
        broker.stop()


def settings_soak() -> float:
    from cloud.config import RolloutSection

    return RolloutSection().soak_s


def run(quick: bool, out_dir: Path | None = None) -> Report:
    sizes = QUICK_SIZES if quick else FULL_SIZES
    model_dir = mlp_model_dir()
    began = time.perf_counter()
    figures: dict[str, dict[str, float]] = {}
    for size in sizes:
        for staged in (False, True):
            name = f"{'staged' if staged else 'immediate'}-{size}"
            with tempfile.TemporaryDirectory(prefix="edgefl-bench-rollout-") as tmp:
                # --quick only checks the harness: a 1 s soak keeps it short.
                figures[name] = _scenario(
                    size, staged, model_dir, Path(tmp), soak_s=1.0 if quick else None
                )
    results: list[Result] = []
    soak = 1.0 if quick else settings_soak()
    for size in sizes:
        imm, stg = figures[f"immediate-{size}"], figures[f"staged-{size}"]
        results.append(
            Result(
                f"round end to 100 % serving, {size} devices",
                stg["to_fleet_s"],
                imm["to_fleet_s"],
                "s",
                "immediate",
                note=f"staged: default phases 0.1/0.5/1.0, soak {soak:g} s each",
            )
        )
        results.append(
            Result(
                f"device-seconds serving the bad model, {size} devices",
                stg["bad_device_seconds"],
                imm["bad_device_seconds"] or None,
                "device-s",
                "immediate (first 10 s)",
                target="0 outside the first phase",
                met=stg["bad_device_seconds"] == 0.0,
                note=f"staged decided the bad round in {stg['bad_decided_s']:.1f} s",
            )
        )
        results.append(
            Result(
                f"held-out accuracy of the served model after the bad round, {size} devices",
                stg["served_accuracy_after_bad"],
                imm["served_accuracy_after_bad"] or None,
                "fraction",
                "immediate",
            )
        )
    report = Report(
        name="rollout",
        title="Staged rollouts (issue 19): time to the whole fleet and the cost of a bad round",
        quick=quick,
        params={"sizes": list(sizes), "soak_s": soak},
        results=results,
        details=figures,
        notes=[
            "Devices are real MQTT agents in one process whose check evaluates real LiteRT "
            "interpreters on their own digits partition; the controller, publisher, monitor "
            "and registry are the cloud's own.",
            "The bad model is the trained one with its output classes shifted by one.",
            "Under staged, the gate runs before any device of a phase serves a candidate, "
            "so a failing phase 1 means no device served it at all.",
        ],
    )
    return finish_report(report, began, out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    return benchmark_main(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
