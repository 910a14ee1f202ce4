"""End to end: a SuperNode killed mid-task, then a whole device process SIGKILLed mid-task.

Real Mosquitto, SuperLink, registry and two devices, each a real ``edgefl edge up``.
Training is made long enough (many local epochs) to kill things while a device trains
(its status says TRAINING):

* round 1: dev-1's ``flower-supernode`` is SIGKILLed: ``edge up`` restarts it, the round
  goes on without dev-1;
* round 2: dev-2's ``edgefl edge up`` process is SIGKILLed: the kernel stops its
  SuperNode too (no orphan), the round goes on without dev-2, and dev-2 is started again
  on the same data dir (what systemd does);
* round 3: both devices train.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import psutil
import pytest

from cloud.registry import NotFoundError
from tests.e2e.conftest import fleet_spec, wait_for_round

pytestmark = pytest.mark.slow


def supernode_of(up_pid: int) -> psutil.Process:
    for child in psutil.Process(up_pid).children(recursive=True):
        if "flower-supernode" in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"no flower-supernode under {up_pid}")


def wait_training(stack, device: str, timeout: float = 180.0) -> None:
    """Until the device's status (MQTT, every 2 s) says it trains."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stack.registry.get_device(device).state == "TRAINING":
                return
        except NotFoundError:  # no status received yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"{device} never reported TRAINING in {timeout:.0f}s")


@pytest.mark.xfail(
    strict=False,
    reason=(
        "known, open in #16/#20: on an idle machine this failed twice in a row. The kill can "
        "land after a ~5 s training already replied, and after its SuperNode was restarted a "
        "device missed the next round (sampled but no reply until the round timeout: likely "
        "its stale node id, #20 item 5). Passed under heavy load when written."
    ),
)
def test_killed_supernode_and_killed_device_miss_one_round_and_train_the_next(
    cloud_settings, stack_factory, fleet_factory
) -> None:
    s = cloud_settings
    s.run = dataclasses.replace(
        s.run, num_rounds=3, min_nodes=2, round_timeout_s=45.0, local_epochs=800
    )
    stack = stack_factory(s)
    fleet = fleet_factory(fleet_spec(s, stack, scheme="iid"), 2)
    one, two = fleet.devices
    stack.submit_run()

    # Round 1: the SuperNode dies under a training device; edge up starts a new one.
    wait_training(stack, one.name)
    first_node = supernode_of(one.process.pid)  # type: ignore[union-attr]
    first_node.send_signal(signal.SIGKILL)
    first_node.wait(timeout=10)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            restarted = supernode_of(one.process.pid)  # type: ignore[union-attr]
            if restarted.pid != first_node.pid:
                break
        except AssertionError:
            pass
        time.sleep(0.5)
    else:
        raise AssertionError("edge up did not restart its SuperNode")
    wait_for_round(stack, 1, timeout=240)

    # Round 2: the whole device process is SIGKILLed while it trains.
    wait_training(stack, two.name)
    node_two = supernode_of(two.process.pid)  # type: ignore[union-attr]
    os.kill(two.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
    two.process.proc.wait(timeout=10)  # type: ignore[union-attr]
    node_two.wait(timeout=30)  # the kernel's parent-death signal: no orphaned SuperNode
    two.start()  # systemd's Restart=on-failure

    assert stack.wait_for_run(timeout=400) == "finished:completed"
    run = stack.registry.latest_run()
    rounds = {r.round: r for r in stack.registry.list_rounds(run.id)}
    assert one.name not in rounds[1].replied and two.name in rounds[1].replied, rounds[1]
    assert rounds[1].version is not None, "round 1 went on without the device"
    assert two.name not in rounds[2].replied and one.name in rounds[2].replied, rounds[2]
    assert rounds[2].version is not None, "round 2 went on without the device"
    assert sorted(rounds[3].replied) == sorted([one.name, two.name]), rounds[3]
