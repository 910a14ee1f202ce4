"""End to end: a SuperNode killed mid-task, then a whole device process SIGKILLed mid-task.

Real Mosquitto, SuperLink, registry and two devices, each a real ``edgefl edge up``.
Each kill lands while the device trains, on the device's own signal (its
``edgefl_device_training`` metric turns 1), not on a timer:

* round 1: dev-1's ``flower-supernode`` is SIGKILLed: ``edge up`` cancels the task the
  dead SuperNode can never take a reply for and restarts the SuperNode, which comes
  back under a new Flower node id; the round goes on without dev-1;
* round 2: dev-1's old node id is still listed by the SuperLink (it cannot unregister)
  but is never sampled again: its new node is (#20.5); dev-2's ``edgefl edge up``
  process is SIGKILLed: the kernel stops its SuperNode too (no orphan), the round goes
  on without dev-2, and dev-2 is started again on the same data dir (what systemd does);
* round 3: both devices train, each through its newest node.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest

from tests.e2e.conftest import fleet_spec, wait_for_round
from tests.e2e.faults import supernode_of, up_pid, wait_new_supernode, wait_training

pytestmark = pytest.mark.slow


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
    wait_training(one)
    first_node = supernode_of(one)
    first_node.send_signal(signal.SIGKILL)
    first_node.wait(timeout=10)
    wait_new_supernode(one, first_node.pid)
    wait_for_round(stack, 1, timeout=240)

    # Round 2: the whole device process is SIGKILLed while it trains.
    wait_training(two, timeout=240)
    node_two = supernode_of(two)
    os.kill(up_pid(two), signal.SIGKILL)
    two.process.proc.wait(timeout=10)  # type: ignore[union-attr]
    node_two.wait(timeout=30)  # the kernel's parent-death signal: no orphaned SuperNode
    two.start()  # systemd's Restart=on-failure

    assert stack.wait_for_run(timeout=400) == "finished:completed"
    run = stack.registry.latest_run()
    rounds = {r.round: r for r in stack.registry.list_rounds(run.id)}
    assert one.name in rounds[1].dropped and two.name in rounds[1].replied, rounds[1]
    assert rounds[1].version is not None, "round 1 went on without the device"
    # The device-side half: the dead SuperNode's task was cancelled, not trained to the end.
    log = (one.config.parent / "logs" / "up.log").read_text(errors="replace")
    assert "abandoning the running task: its SuperNode exited" in log, log[-3000:]
    assert sorted(rounds[2].sampled) == sorted([one.name, two.name]), rounds[2]
    assert two.name in rounds[2].dropped and one.name in rounds[2].replied, rounds[2]
    assert rounds[2].version is not None, "round 2 went on without the device"
    assert sorted(rounds[3].replied) == sorted([one.name, two.name]), rounds[3]
    assert rounds[3].dropped == [], rounds[3]
