"""End to end: a device whose training outlasts the round timeout is dropped, the run goes on.

Real Mosquitto, SuperLink, registry, web UI, SuperNodes, edge services and MQTT agents,
all on loopback. The slow device is made slow for real: its ``edgefl edge up``
process (the executor and the Trainer it calls; its SuperNode child stays up) is frozen
with SIGSTOP from the end of round 1 to the end of round 2, so its round-2 Fit cannot
answer within the round timeout; SIGCONT then lets it finish and catch up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
import urllib.request

import psutil
import pytest

from tests.e2e.conftest import fleet_spec, wait_for_round, wait_served

pytestmark = pytest.mark.slow

ROUND_TIMEOUT_S = 20.0


def trainer_process(up_pid: int) -> psutil.Process:
    """The process that trains: ``edgefl edge up`` itself (executor + Trainer in one)."""
    process = psutil.Process(up_pid)
    assert "edge up" in " ".join(process.cmdline()), process.cmdline()
    return process


def wait_round_finished(stack, round_: int, timeout: float) -> None:
    """Like ``wait_for_round`` but polling every 0.1 s, to act right after it ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = stack.registry.latest_run()
        if run is not None and any(
            r.round == round_ and r.finished for r in stack.registry.list_rounds(run.id)
        ):
            return
        time.sleep(0.1)
    raise AssertionError(f"round {round_} did not finish in {timeout:.0f}s")


def test_a_device_slower_than_the_round_timeout_is_dropped_and_the_run_goes_on(
    cloud_settings, stack_factory, fleet_factory
) -> None:
    s = cloud_settings
    s.run = dataclasses.replace(
        s.run, num_rounds=3, min_nodes=3, round_timeout_s=ROUND_TIMEOUT_S, local_epochs=1
    )
    stack = stack_factory(s)
    fleet = fleet_factory(fleet_spec(s, stack, scheme="iid"), 3)
    addresses = {d.name: d.address for d in fleet.devices}
    victim = fleet.devices[0]
    assert victim.process is not None
    serve = trainer_process(victim.process.pid)
    stack.submit_run()

    # Freeze the victim's Trainer as round 1 ends: its round-2 Fit hangs past the timeout.
    wait_round_finished(stack, 1, timeout=120)
    os.kill(serve.pid, signal.SIGSTOP)
    try:
        wait_for_round(stack, 2, timeout=ROUND_TIMEOUT_S + 60)
    finally:
        os.kill(serve.pid, signal.SIGCONT)

    status = stack.wait_for_run(timeout=120)
    assert status == "finished:completed"

    # The registry: round 2 completed without the frozen device, which was dropped.
    run = stack.registry.latest_run()
    rounds = {r.round: r for r in stack.registry.list_rounds(run.id)}
    assert sorted(r for r in rounds if r > 0) == [1, 2, 3]
    second = rounds[2]
    assert second.version is not None, "round 2 completed without the slow device"
    assert victim.name in second.sampled
    assert victim.name not in second.replied
    assert victim.name in second.dropped + second.failed, (second.dropped, second.failed)
    assert len(second.replied) == 2, second.replied
    assert rounds[3].version is not None
    assert victim.name in rounds[1].replied  # it was healthy before being frozen

    # The JSON API says the same about round 2.
    with urllib.request.urlopen(f"{stack.web.url}/api/rounds", timeout=10) as reply:
        body = json.load(reply)
    assert body["run"]["id"] == run.id
    api_round = next(r for r in body["rounds"] if r["round"] == 2)
    assert victim.name in api_round["dropped"] + api_round["failed"], api_round
    assert victim.name not in api_round["replied"]
    assert api_round["version"] == second.version

    # Every device, the thawed one included, ends up serving the final version.
    final = stack.registry.latest_version()
    assert final.round == 3
    wait_served(addresses, final.version, timeout=60)
