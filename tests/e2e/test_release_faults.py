"""Faults at the worst moment of a release: between registering a version and publishing it.

Real Mosquitto, SuperLink, fleet proxy, release signer and two emulated devices. The
signer's ``before_publish`` hook and a wrapper around the publisher's batch send only
choose *when* a real process is killed:

* the broker SIGKILLed just before round 2's version is published, and again half-way
  through the chunks of round 3's version: the rounds wait, the watchdog restarts the
  broker, both versions go out, the run completes;
* the whole cloud killed after round 2's version was registered and before it was
  published: the next ``cloud up`` resumes the same registry run, releases that
  version first, and finishes the remaining round.

After each: versions contiguous, one per round, each one released (an event per
version), the registry's current version is the newest, and every device serves it.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from cloud.publisher import Publisher
from cloud.registry import Registry
from cloud.signer import RELEASED_EVENT_KIND
from tests.e2e.conftest import fleet_spec, wait_served

pytestmark = pytest.mark.slow

NUM_ROUNDS = 3


def _check_history(registry: Registry, addresses: dict[str, str]) -> None:
    runs = registry.list_runs()
    assert len(runs) == 1 and runs[0].status == "completed", runs
    versions = registry.list_versions()
    assert [v.version for v in versions] == list(range(1, NUM_ROUNDS + 2))
    assert [v.round for v in versions] == list(range(NUM_ROUNDS + 1))
    assert all(v.run_id == runs[0].id for v in versions)
    released = {e.version for e in registry.list_events(500) if e.kind == RELEASED_EVENT_KIND}
    assert released == {v.version for v in versions}, "every version was released"
    newest = versions[-1].version
    assert registry.current().version == newest  # type: ignore[union-attr]
    wait_served(addresses, newest, timeout=120)


def test_broker_killed_before_and_during_a_publish(
    cloud_settings, stack_factory, fleet_factory, monkeypatch
) -> None:
    s = cloud_settings
    s.run = dataclasses.replace(s.run, num_rounds=NUM_ROUNDS, min_nodes=2, chunk_size=1024)
    stack = stack_factory(s)
    fleet = fleet_factory(fleet_spec(s, stack, scheme="iid"), 2)
    kills: list[str] = []

    def before_publish(version: int) -> None:
        if version == 3 and "before" not in kills:  # round 2's version
            kills.append("before")
            stack.broker.process.kill()

    stack.signer.signer.before_publish = before_publish
    send = Publisher._publish_all

    def half_then_kill(self: Publisher, messages: list[tuple[str, bytes]], what: str) -> None:
        if what == "release 4 chunks" and "mid" not in kills and len(messages) > 2:
            kills.append("mid")
            send(self, messages[: len(messages) // 2], what)
            stack.broker.process.kill()
            messages = messages[len(messages) // 2 :]
        send(self, messages, what)

    monkeypatch.setattr(Publisher, "_publish_all", half_then_kill)
    stack.submit_run()
    assert stack.wait_for_run(timeout=900) == "finished:completed"
    assert kills == ["before", "mid"]
    _check_history(stack.registry, {d.name: d.address for d in fleet.devices})


def test_cloud_killed_between_register_and_publish_resumes_the_same_run(
    cloud_settings, stack_factory, fleet_factory
) -> None:
    s = cloud_settings
    s.run = dataclasses.replace(s.run, num_rounds=NUM_ROUNDS, min_nodes=2)
    stack = stack_factory(s)
    fleet = fleet_factory(fleet_spec(s, stack, scheme="iid"), 2)
    registered = threading.Event()
    gone = threading.Event()

    def before_publish(version: int) -> None:
        if version == 3:  # round 2's version is registered; the cloud dies now
            registered.set()
            gone.wait(300)
            raise RuntimeError("the cloud is gone")

    stack.signer.signer.before_publish = before_publish
    stack.submit_run()
    assert registered.wait(600), "round 2 never reached its release"
    run_id = stack.registry.latest_run().id
    # Every cloud process at once, no goodbyes (as a SIGKILL of the `cloud up` tree).
    stack.watchdog.stop()
    stack.superlink.process.kill_tree()
    stack.broker.process.kill()
    stack.proxy.process.kill()
    stack.stop()
    gone.set()
    with Registry(s.registry_url) as registry:
        assert registry.latest_version().version == 3
        assert registry.current().version == 2  # type: ignore[union-attr]
        assert registry.latest_run().status in ("running", "interrupted")

    time.sleep(1.0)
    again = stack_factory(s)
    again.submit_run()
    assert again.wait_for_run(timeout=900) == "finished:completed"
    assert again.registry.latest_run().id == run_id
    _check_history(again.registry, {d.name: d.address for d in fleet.devices})
