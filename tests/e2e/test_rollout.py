"""End to end: staged rollouts with health gates on a real fleet.

Real Mosquitto, SuperLink, release signer (with its rollout controller), registry and
four emulated devices (edge services, LiteRT, MQTT agents), all on loopback. Versions
are registered in the registry as a round would, and released through the signer's
Unix socket as the ServerApp does; the candidates' weights are built here:

* a trained model: both phases pass, every device serves it, including one that was
  offline for the whole rollout (it gets the promoted release when it comes back);
* the same model with its classes shifted (finite weights, accuracy near 0): phase 1's
  devices check it and report the drop, the gate fails, the candidate is rolled back
  and no device ever serves it; the decisions and their figures are registry events;
* a good model again, with one device frozen (SIGSTOP) in the phase: the phase is
  decided at ``phase_timeout_s`` without it, the version is promoted, and the frozen
  device converges once it runs again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cloud.config import RolloutSection
from cloud.registry import Registry
from cloud.releases import package_weights
from cloud.signer import SignerClient
from devices.datasets import load_digits
from edge.litert_model import LiteRTModel
from protos import codec, cohort
from tests.e2e.conftest import fleet_spec, served_version, wait_served

pytestmark = pytest.mark.slow

PHASE_TIMEOUT_S = 25.0
EDGEFL = str(Path(sys.executable).parent / "edgefl")


def _trained_weights(model_dir: Path) -> dict[str, np.ndarray]:
    model = LiteRTModel.load(model_dir)
    data = load_digits(layout="flat", seed=0)
    model.fit(data.train.x, data.train.y, epochs=20, lr=0.2, seed=0)
    return model.get_weights()


def _classes_shifted(weights: dict[str, np.ndarray], classes: int) -> dict[str, np.ndarray]:
    """The output layer's classes rolled by one: finite, valid, and wrong almost always."""
    out = dict(weights)
    for name, w in weights.items():
        if w.shape and w.shape[-1] == classes:
            out[name] = np.roll(w, 1, axis=-1)
    return out


def _register(registry: Registry, run_id: int, model_dir: Path, weights, rnd: int) -> int:
    arch, data = package_weights(model_dir, weights)
    latest = registry.latest_version()
    v = registry.add_version(
        package=data,
        architecture_id=arch,
        round=rnd,
        run_id=run_id,
        parent_version=None if latest is None else latest.version,
        metrics={},
    )
    return v.version


def _events(registry: Registry, version: int) -> list[tuple[str, dict]]:
    out = []
    for e in reversed(registry.list_events(500)):
        if e.device_id == "cloud" and e.kind.startswith("rollout") and e.version == version:
            out.append((e.kind, json.loads(e.detail)))
    return out


def _wait_event(registry: Registry, version: int, kind: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for k, detail in _events(registry, version):
            if k == kind:
                return detail
        time.sleep(0.3)
    raise AssertionError(f"no {kind!r} for version {version}: {_events(registry, version)}")


class ServedWatch:
    """Samples what every device serves, in the background, for the whole test."""

    def __init__(self, addresses: dict[str, str]) -> None:
        self.addresses = addresses
        self.seen: dict[str, set[int]] = {n: set() for n in addresses}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, addr in list(self.addresses.items()):
                v = served_version(addr)
                if v:
                    self.seen[name].add(v)
            time.sleep(0.2)

    def __enter__(self) -> ServedWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_staged_rollout_good_bad_and_silent_devices(
    cloud_settings, stack_factory, fleet_factory, mlp_model_dir
) -> None:
    s = cloud_settings
    s.rollout = RolloutSection(
        policy="staged",
        phases="0.25, 1.0",
        min_devices="1, 0",
        max_accuracy_drop=0.05,
        soak_s=1.0,
        phase_timeout_s=PHASE_TIMEOUT_S,
        silent_devices="ignore",
        on_failure="rollback",
    )
    stack = stack_factory(s)
    fleet = fleet_factory(fleet_spec(s, stack, scheme="iid"), 4)
    addresses = {d.name: d.address for d in fleet.devices}
    registry: Registry = stack.registry
    signer = SignerClient(s.data_dir)
    card_classes = 10

    # Version 1: the initial package every device already serves, released at once
    # (nothing is served fleet-wide yet, so there is nothing to gate against).
    run_id = registry.start_run(num_rounds=4, strategy="fedavg", config={})
    # The default fleet believes telemetry of devices that answered in a round.
    registry.round_started(run_id, 1, sampled=sorted(addresses))
    for name in addresses:
        registry.round_reply(run_id, 1, name, ok=True, num_examples=1)
    initial = codec.package_from_bytes((s.data_dir / "initial.pkg").read_bytes())
    v1 = _register(registry, run_id, s.model.dir, dict(initial.weights), 0)
    signer.release(v1)
    assert registry.current().version == v1  # type: ignore[union-attr]
    wait_served(addresses, v1)
    _wait_online(registry, set(addresses), timeout=30)

    ordered = sorted(addresses, key=lambda n: cohort.position(s.cloud.fleet, n))
    first = ordered[0]  # phase 1's cohort (25 % of 4 devices, at least 1)

    # 1. A trained model, with the last device in cohort order offline all along.
    offline = next(d for d in fleet.devices if d.name == ordered[-1])
    offline.stop()
    _wait_offline(registry, offline.name, timeout=30)
    online = {n: a for n, a in addresses.items() if n != offline.name}
    good = _trained_weights(mlp_model_dir)
    v2 = _register(registry, run_id, s.model.dir, good, 1)
    started = time.monotonic()
    signer.release(v2)  # returns once phase 1's candidate is out; training would go on
    assert registry.current().version == v1, "the release did not move yet"  # type: ignore[union-attr]
    promoted = _wait_event(registry, v2, "rollout promoted", timeout=120)
    took = time.monotonic() - started
    kinds = [k for k, _ in _events(registry, v2)]
    assert kinds == [
        "rollout started",
        "rollout phase passed",
        "rollout phase passed",
        "rollout promoted",
    ], kinds
    phase1 = _events(registry, v2)[1][1]
    assert phase1["cohort"] == sorted(ordered[:1]) and phase1["checked"] == 1.0
    assert phase1["candidate_accuracy"] > phase1["served_accuracy"] + 0.3, phase1
    assert registry.current().version == v2  # type: ignore[union-attr]
    wait_served(online, v2)
    offline.start()
    addresses[offline.name] = offline.address
    wait_served({offline.name: offline.address}, v2, timeout=60)
    print(f"good candidate: promoted {took:.1f} s after its release ({promoted})")

    # 2. A broken candidate: classes shifted by one.
    bad = _classes_shifted(good, card_classes)
    v3 = _register(registry, run_id, s.model.dir, bad, 2)
    with ServedWatch(addresses) as watch:
        signer.release(v3)
        failed = _wait_event(registry, v3, "rollout phase failed", timeout=60)
        _wait_event(registry, v3, "rollout rolled back", timeout=10)
        time.sleep(3)  # a late serve would show up in the watch
    assert failed["phase"] == 1 and failed["cohort"] == [first], failed
    assert failed["accuracy_drop"] > 0.5, failed
    assert "drops by" in failed["reason"]
    assert all(v3 not in seen for seen in watch.seen.values()), watch.seen
    assert registry.current().version == v2  # type: ignore[union-attr]
    assert {n: served_version(a) for n, a in addresses.items()} == dict.fromkeys(addresses, v2)
    # The device of phase 1 checked it: its event carries both figures.
    checks = [
        e
        for e in registry.list_events(500)
        if e.kind == "candidate_checked" and e.version == v3 and e.device_id == first
    ]
    assert checks, "phase 1's device reported its check"
    # The UI's JSON API shows the rollback with its gate figures.
    web = (s.data_dir / "web.url").read_text().strip()
    with urllib.request.urlopen(web + "/api/rollouts", timeout=10) as resp:
        shown = json.loads(resp.read())
    last = shown["history"][-1]
    assert (last["version"], last["status"]) == (v3, "rolled back")
    assert last["phases"][0]["passed"] is False
    assert last["phases"][0]["figures"]["accuracy_drop"] > 0.5

    # 3. The next good version, with one device of the fleet frozen during the rollout.
    frozen = next(d for d in fleet.devices if d.name == ordered[1])
    v4 = _register(
        registry, run_id, s.model.dir, {k: v * np.float32(1.001) for k, v in good.items()}, 3
    )
    pid = frozen.process.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)
    try:
        signer.release(v4)
        promoted4 = _wait_event(registry, v4, "rollout promoted", timeout=PHASE_TIMEOUT_S + 90)
    finally:
        os.kill(pid, signal.SIGCONT)
    passed = [d for k, d in _events(registry, v4) if k == "rollout phase passed"]
    assert len(passed) == 2, _events(registry, v4)
    last = passed[-1]
    assert frozen.name in last["cohort"] and last["timed_out"] is True, last
    assert last["silent"] == 1.0 and last["checked"] == 3.0, last
    wait_served(addresses, v4, timeout=90)
    print(f"silent device: phase 2 decided at the timeout ({promoted4})")

    # 4. The operator's commands, while phase 1 waits for its frozen device.
    conf = str(s.source)
    holder = next(d for d in fleet.devices if d.name == first)
    hpid = holder.process.pid  # type: ignore[union-attr]
    v5 = _register(
        registry, run_id, s.model.dir, {k: v * np.float32(1.002) for k, v in good.items()}, 4
    )
    os.kill(hpid, signal.SIGSTOP)
    try:
        signer.release(v5)
        shown = _cli("cloud", "rollout", "status", "--config", conf)
        assert shown.returncode == 0, shown.stderr
        assert f"version {v5} (round 4, served version {v4}): running, phase 1/2" in shown.stdout
        halted = _cli("cloud", "rollout", "halt", str(v5), "--config", conf)
        assert halted.returncode == 0 and "halted" in halted.stdout, halted.stderr
        _wait_event(registry, v5, "rollout halted", timeout=10)
        again = _cli("cloud", "rollout", "promote", str(v5), "--config", conf)
        assert again.returncode == 1
        assert f"version {v5} has no rollout in progress" in again.stderr
        v6 = _register(
            registry, run_id, s.model.dir, {k: v * np.float32(1.003) for k, v in good.items()}, 5
        )
        signer.release(v6)
        promoted6 = _cli("cloud", "rollout", "promote", str(v6), "--config", conf)
        assert promoted6.returncode == 0, promoted6.stderr
        assert f"version {v6} promoted to the whole fleet" in promoted6.stdout
    finally:
        os.kill(hpid, signal.SIGCONT)
    assert registry.current().version == v6  # type: ignore[union-attr]
    detail = _wait_event(registry, v6, "rollout promoted", timeout=10)
    assert detail["reason"] == "promoted by the operator"
    wait_served(addresses, v6, timeout=90)
    as_json = json.loads(_cli("cloud", "rollout", "status", "--json", "--config", conf).stdout)
    assert [r["status"] for r in as_json["history"][-2:]] == ["halted", "promoted"]


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGEFL, *argv], capture_output=True, text=True, timeout=120, check=False)


def _wait_online(registry: Registry, names: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        online = {d.device_id for d in registry.list_devices() if d.online}
        if names <= online:
            return
        time.sleep(0.3)
    raise AssertionError(f"devices not online in the registry: {names}")


def _wait_offline(registry: Registry, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not registry.get_device(name).online:
            return
        time.sleep(0.3)
    raise AssertionError(f"{name} still online in the registry")


def test_a_federated_run_under_a_staged_policy_reaches_every_device(
    cloud_settings, stack_factory, fleet_factory
) -> None:
    # Rounds go on while rollouts run; the run's last version is promoted to everyone.
    s = cloud_settings
    s.run = dataclasses.replace(s.run, num_rounds=2, min_nodes=3)
    s.rollout = RolloutSection(
        policy="staged", phases="0.34, 1.0", min_devices="1, 0", soak_s=1.0, phase_timeout_s=30.0
    )
    stack = stack_factory(s)
    fleet = fleet_factory(fleet_spec(s, stack, scheme="iid"), 3)
    addresses = {d.name: d.address for d in fleet.devices}
    stack.submit_run()
    assert stack.wait_for_run(timeout=300) == "finished:completed"
    registry: Registry = stack.registry
    final = registry.latest_version()
    assert final is not None and final.round == 2
    _wait_event(registry, final.version, "rollout promoted", timeout=120)
    assert registry.current().version == final.version  # type: ignore[union-attr]
    wait_served(addresses, final.version, timeout=60)
    started = [e for e in registry.list_events(500) if e.kind == "rollout started"]
    assert {e.version for e in started} >= {final.version}, "round versions became candidates"
    assert all(e.version != 1 for e in started), "the fleet's first version is released at once"
