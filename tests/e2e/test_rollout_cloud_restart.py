"""A staged rollout survives a cloud restart (#19).

Real cloud (Mosquitto, SuperLink, signer with its rollout controller, registry, UI) and
two emulated devices. v2 starts a staged rollout; phase 1's device checks it, then is
frozen (SIGSTOP), so whatever the cloud knows of its check afterwards comes from what
the cloud stored. The cloud is stopped and started again on the same data and ports.
The restarted cloud must show the rollout (``edgefl cloud rollout status``: same version,
running, phase 1's device checked), continue it once the device runs again, and promote
v2 to both devices. Before the fix the controller kept its rollouts in memory: the
restarted cloud had none, and v2 stayed unreleased.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cloud.config import RolloutSection
from cloud.registry import Registry
from cloud.releases import package_weights
from cloud.signer import SignerClient
from protos import codec, cohort
from tests.e2e.conftest import fleet_spec, wait_served

pytestmark = pytest.mark.slow

EDGEFL = str(Path(sys.executable).parent / "edgefl")


def _add_version(registry: Registry, s, rnd: int, run_id: int) -> int:  # type: ignore[no-untyped-def]
    pkg = codec.package_from_bytes((s.data_dir / "initial.pkg").read_bytes())
    weights = {k: np.asarray(v) * np.float32(1.0 + rnd / 100) for k, v in pkg.weights.items()}
    arch, data = package_weights(s.model.dir, weights)
    latest = registry.latest_version()
    return registry.add_version(
        package=data,
        architecture_id=arch,
        round=rnd,
        run_id=run_id,
        parent_version=None if latest is None else latest.version,
        metrics={},
    ).version


def _rollout_events(registry: Registry, version: int) -> list[tuple[str, dict]]:
    return [
        (e.kind, json.loads(e.detail))
        for e in reversed(registry.list_events(500))
        if e.device_id == "cloud" and e.kind.startswith("rollout") and e.version == version
    ]


def _wait_for(check, what: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def test_a_restarted_cloud_continues_the_running_rollout(
    cloud_settings, stack_factory, fleet_factory
) -> None:
    s = cloud_settings
    s.rollout = RolloutSection(
        policy="staged",
        phases="0.5, 1.0",
        min_devices="1, 0",
        soak_s=3.0,
        phase_timeout_s=60.0,
        silent_devices="ignore",
        on_failure="halt",
    )
    stack = stack_factory(s)
    registry: Registry = stack.registry
    fleet = fleet_factory(fleet_spec(s, stack, scheme="iid"), 2)
    addresses = {d.name: d.address for d in fleet.devices}
    run_id = registry.start_run(num_rounds=2, strategy="fedavg", config={})
    registry.round_started(run_id, 1, sampled=sorted(addresses))
    for name in addresses:  # the default fleet believes telemetry of devices that answered
        registry.round_reply(run_id, 1, name, ok=True, num_examples=1)
    v1 = _add_version(registry, s, 0, run_id)
    SignerClient(s.data_dir).release(v1)  # the fleet's first version: released at once
    wait_served(addresses, v1, timeout=60)
    _wait_for(
        lambda: {d.device_id for d in registry.list_devices() if d.online} >= set(addresses),
        "devices not online in the registry",
        60,
    )

    first = min(addresses, key=lambda n: cohort.position(s.cloud.fleet, n))
    v2 = _add_version(registry, s, 1, run_id)
    SignerClient(s.data_dir).release(v2)
    _wait_for(
        lambda: any(
            e.kind == "candidate_checked" and e.version == v2 and e.device_id == first
            for e in registry.list_events(200)
        ),
        "phase 1's device did not check the candidate",
        60,
    )
    frozen = next(d for d in fleet.devices if d.name == first)
    pid = frozen.process.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)
    try:
        stack.stop()
        stack2 = stack_factory(s)  # same data, same ports
        registry = stack2.registry
        shown = subprocess.run(
            [EDGEFL, "cloud", "rollout", "status", "--config", str(s.source)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert shown.returncode == 0, shown.stderr
        assert f"version {v2} (round 1, served version {v1}): running, phase" in shown.stdout, (
            shown.stdout
        )
        # Open or (at the restarted cloud's first tick) passed: on the stored check.
        assert "phase 1 (50%, 1 devices, 1 checked, 0 failed" in shown.stdout, shown.stdout
        kinds = [k for k, _ in _rollout_events(registry, v2)]
        assert kinds[:2] == ["rollout started", "rollout resumed"], kinds
    finally:
        os.kill(pid, signal.SIGCONT)

    _wait_for(
        lambda: "rollout promoted" in [k for k, _ in _rollout_events(registry, v2)],
        f"v2 not promoted after the restart: {_rollout_events(registry, v2)}",
        120,
    )
    events = _rollout_events(registry, v2)
    kinds = [k for k, _ in events]
    assert "rollout halted" not in kinds and kinds.count("rollout started") == 1, kinds
    at, phase1 = next(
        (i, d) for i, (k, d) in enumerate(events) if k == "rollout phase passed" and d["phase"] == 1
    )
    assert at > kinds.index("rollout resumed"), "phase 1 was decided by the restarted cloud"
    assert phase1["cohort"] == [first] and phase1["checked"] == 1.0, phase1
    assert phase1["timed_out"] is False, phase1
    assert registry.current().version == v2  # type: ignore[union-attr]
    wait_served(addresses, v2, timeout=90)
