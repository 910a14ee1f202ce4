"""`cloud up` keeps its parts alive during a run (#20.1).

A real cloud and two emulated devices run three rounds. Mosquitto is SIGKILLed after
round 1 and the SuperLink (with its SuperExec and ServerApp) mid-round 2: the watchdog
restarts each on the same port, records it as a registry event the UI lists, resubmits
the run to the new SuperLink, and the run finishes as the same registry run, each round
released once.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from tests.e2e.conftest import fleet_spec, wait_for_round, wait_served

pytestmark = pytest.mark.slow

WAIT_S = 180.0


def _wait(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} within {WAIT_S:.0f}s")


def _events(stack) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.kind for e in stack.registry.list_events() if e.device_id == "cloud"]


def test_killed_broker_and_superlink_are_restarted_and_the_run_finishes(
    cloud_settings, stack_factory, fleet_factory
) -> None:
    s = cloud_settings
    s.run = dataclasses.replace(s.run, num_rounds=3, min_nodes=2)
    stack = stack_factory(s)
    fleet = fleet_factory(fleet_spec(s, stack, scheme="iid"), 2)
    stack.submit_run()
    statuses: list[str] = []
    waiter = threading.Thread(
        target=lambda: statuses.append(stack.wait_for_run(timeout=600)), daemon=True
    )
    waiter.start()

    wait_for_round(stack, 1)
    broker_pid = stack.broker.process.pid
    stack.broker.process.kill()
    _wait(
        lambda: stack.broker.process.pid != broker_pid and stack.broker.process.alive(),
        "the broker restarted",
    )
    _wait(lambda: "broker restarted" in _events(stack), "a broker restart event")

    # Mid-round 2: the round has started (devices sampled) but not finished.
    def round_2_running() -> bool:
        run = stack.registry.latest_run()
        return run is not None and any(
            r.round == 2 and not r.finished for r in stack.registry.list_rounds(run.id)
        )

    _wait(round_2_running, "round 2 started")
    first_flower_run = stack.flower_run_id
    link_pid = stack.superlink.process.pid
    stack.superlink.process.kill()
    _wait(lambda: "SuperLink restarted" in _events(stack), "a SuperLink restart event")
    assert stack.superlink.process.pid != link_pid
    _wait(lambda: stack.flower_run_id != first_flower_run, "the run resubmitted")

    waiter.join(timeout=600)
    assert statuses == ["finished:completed"], statuses
    assert not stack.watchdog.failed.is_set()
    runs = stack.registry.list_runs()
    assert len(runs) == 1 and runs[0].status == "completed", "resumed, not restarted"
    versions = stack.registry.list_versions()
    rounds = [v.round for v in versions]
    assert rounds == [0, 1, 2, 3], rounds
    wait_served({d.name: d.address for d in fleet.devices}, versions[-1].version, timeout=90)
