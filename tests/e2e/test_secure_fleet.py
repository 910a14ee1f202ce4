"""A secure fleet end to end: flash bundles, boot emulated devices only from them, train.

Real Mosquitto with TLS + passwords + ACL, a real SuperLink with TLS and SuperNode
authentication; the devices know only what their flashed bundle says.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cloud import config as cloud_config
from cloud.supervisor import init_cloud
from devices.emulate import EmulatedFleet
from devices.flash import flash
from edge.process import free_port
from tests.e2e.conftest import fleet_spec, wait_served

pytestmark = pytest.mark.slow

EDGEFL = str(Path(sys.executable).parent / "edgefl")


def test_flashed_devices_register_train_and_serve_the_pushed_model(
    tmp_path: Path, mlp_model_dir: Path, stack_factory
) -> None:
    conf = init_cloud(
        tmp_path / "cloud",
        fleet="secure",
        model_dir=mlp_model_dir,
        secure=True,
        broker_port=free_port(),
        superlink_port=free_port(),
    )
    s = cloud_config.load(conf)
    assert s.superlink.supernode_auth and s.broker.certfile is not None
    s.run.num_rounds = 1
    s.run.min_nodes = 3
    s.run.local_epochs = 2

    bundles = []
    for name in ("pi-a", "pi-b", "pi-c"):
        out = tmp_path / f"{name}.tar.gz"
        flash(cloud_dir=s.data_dir, profile="rpi4", name=name, cloud_host="127.0.0.1", out=out)
        bundles.append(out)
    # Flashing the same name again without --force is refused, clearly.
    res = subprocess.run(
        [
            EDGEFL,
            "devices",
            "flash",
            "--profile",
            "rpi4",
            "--name",
            "pi-a",
            "--cloud",
            "127.0.0.1",
            "--out",
            str(tmp_path / "again.tar.gz"),
            "--cloud-dir",
            str(s.data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "--force" in (res.stdout + res.stderr)

    stack = stack_factory(s)  # registers the flashed SuperNode keys at start
    fleet = EmulatedFleet(fleet_spec(s, stack, scheme="iid"), tmp_path / "emulated", 0)
    try:
        fleet.from_bundles(bundles)
        fleet.start()
        stack.submit_run()
        assert stack.wait_for_run(timeout=300) == "finished:completed"
        run = stack.registry.latest_run()
        (round1,) = [r for r in stack.registry.list_rounds(run.id) if r.round == 1]
        assert sorted(round1.replied) == ["pi-a", "pi-b", "pi-c"], "every flashed device trained"
        final = stack.registry.latest_version()
        wait_served({d.name: d.address for d in fleet.devices}, final.version, timeout=60)
        # The cloud saw their telemetry over the TLS + ACL broker.
        assert {d.device_id for d in stack.registry.list_devices()} >= {"pi-a", "pi-b", "pi-c"}
    finally:
        fleet.stop()
