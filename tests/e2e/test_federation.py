"""End to end: rounds on Flower, every new global model pushed to the whole fleet.

Real Mosquitto, SuperLink, SuperNodes, edge services and MQTT agents, all on loopback.
"""

from __future__ import annotations

import dataclasses

import pytest

from cloud.releases import pin_version
from tests.e2e.conftest import fleet_spec, served_version, wait_for_round, wait_served

pytestmark = pytest.mark.slow


def test_every_device_serves_the_final_model_including_unsampled_and_offline_ones(
    cloud_settings, stack_factory, fleet_factory
) -> None:
    # 4 devices, half of them sampled per round: some devices never train in a round.
    s = cloud_settings
    s.run = dataclasses.replace(s.run, fraction_train=0.5, min_nodes=2)
    stack = stack_factory(s)
    fleet = fleet_factory(fleet_spec(s, stack, scheme="iid"), 4)
    addresses = {d.name: d.address for d in fleet.devices}
    stack.submit_run()

    # Take one device offline after round 2 was released: it misses the last publish.
    wait_for_round(stack, 2)
    offline = fleet.devices[-1]
    offline.stop()
    status = stack.wait_for_run(timeout=300)
    assert status == "finished:completed"

    run = stack.registry.latest_run()
    rounds = {r.round: r for r in stack.registry.list_rounds(run.id)}
    assert sorted(r for r in rounds if r > 0) == [1, 2, 3]
    final = stack.registry.latest_version()
    assert final.round == 3
    versions = stack.registry.list_versions()
    assert [v.round for v in versions] == [0, 1, 2, 3], "one version per round, no duplicates"

    # Somebody was never sampled in some round, yet everyone online serves the final model.
    sampled = [set(r.sampled) for k, r in rounds.items() if k > 0]
    assert any(len(s_) < 4 for s_ in sampled)
    online = {n: a for n, a in addresses.items() if n != offline.name}
    wait_served(online, final.version, timeout=60)

    # The offline device comes back and converges within seconds of reconnecting.
    assert served_version(addresses[offline.name]) == 0  # it is down
    offline.start()
    wait_served({offline.name: offline.address}, final.version, timeout=60)

    # Learning happened: the floor only catches breakage (3 rounds, IID).
    accuracy = rounds[3].aggregated_metrics.get("eval-accuracy", 0.0)
    assert accuracy >= 0.75, rounds[3].aggregated_metrics

    # Pin (roll back) to version 2: it reaches every device.
    pin_version(stack.runtime_settings, stack.registry, 2)
    addresses[offline.name] = offline.address
    wait_served(addresses, 2, timeout=60)
    assert stack.registry.current().pinned


def test_a_killed_device_does_not_stall_the_run(
    cloud_settings, stack_factory, fleet_factory
) -> None:
    s = cloud_settings
    s.run = dataclasses.replace(s.run, num_rounds=2, min_nodes=3, round_timeout_s=25.0)
    stack = stack_factory(s)
    fleet = fleet_factory(fleet_spec(s, stack, scheme="iid"), 3)
    stack.submit_run()
    wait_for_round(stack, 1)
    victim = fleet.devices[0]
    victim.kill()  # SIGKILL, no goodbye: its SuperNode vanishes mid-run
    status = stack.wait_for_run(timeout=300)
    assert status == "finished:completed"
    run = stack.registry.latest_run()
    last = next(r for r in stack.registry.list_rounds(run.id) if r.round == 2)
    assert last.version is not None, "the round completed without the dead device"
    assert victim.name not in last.replied
    survivors = {d.name: d.address for d in fleet.devices[1:]}
    wait_served(survivors, last.version, timeout=60)
