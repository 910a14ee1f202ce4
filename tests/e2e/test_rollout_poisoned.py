"""End to end: one device poisons a FedAvg round; the staged rollout stops its model.

Real Mosquitto, SuperLink, ServerApp (FedAvg), release signer with its rollout
controller, registry, web API, and three emulated devices (edge services, LiteRT,
SuperNodes, MQTT agents), all on loopback. Three federated runs of one round each, so
that each round's rollout is decided before the next round's candidate (a newer
candidate supersedes an older one, see :mod:`cloud.rollout`):

1. a good round: its version passes both phases and every device serves it;
2. a poisoned round: one device, outside phase 1's cohort, trains for real on
   poisoned local data (every label shifted by one, and six copies of its partition so
   that FedAvg, which weights updates by example count, gives it three quarters of the
   average). Nothing in the product is changed for this: the attacker owns the
   device's data, through the device's own LocalData service. The aggregate is bad
   (the cloud's own evaluation says so); phase 1's device checks it on its own data,
   the gate fails, the candidate is rolled back (a ``revert`` to the whole fleet), no
   device ever serves it, the fleet keeps serving the good version, and ``/api/rollouts`` shows the decision with its
   figures;
3. the device's honest data is back: the next round starts from the fleet's promoted
   (good) version, not from the rolled-back aggregate (``round base reset``), passes the
   gates, and reaches every device.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from cloud.config import RolloutSection
from cloud.registry import Registry
from devices.datasets import device_partitions, load_digits
from edge.config import load_settings
from edge.local_data_split import split_samples
from protos import codec, cohort
from protos import wire_keys as keys
from protos.edgefl.v1 import local_data_pb2, local_data_pb2_grpc
from tests.cloud.test_signer_rollout import _retained_candidate
from tests.e2e.conftest import fleet_spec, served_version, wait_served
from tests.e2e.test_rollout import ServedWatch, _events, _wait_event

pytestmark = pytest.mark.slow

DEVICES = 3
#: Copies of its partition the poisoning device trains on (its FedAvg weight: 6 / 8).
BOOST = 6
CLASSES = 10


def _load(config: Path, x: np.ndarray, y: np.ndarray) -> int:
    """Replace a running device's samples through its own LocalData socket; the count."""
    sock = load_settings(config).local_socket
    with grpc.insecure_channel(f"unix:{sock.resolve()}") as channel:
        stub = local_data_pb2_grpc.LocalDataStub(channel)
        stub.Clear(local_data_pb2.ClearRequest(), timeout=30)
        total = 0
        for start in range(0, len(y), 500):
            reply = stub.Append(
                local_data_pb2.AppendRequest(
                    x=codec.tensor_to_proto("x", x[start : start + 500]),
                    y=codec.tensor_to_proto("y", y[start : start + 500]),
                ),
                timeout=60,
            )
            total = reply.total
    return total


def _run_one_round(stack, registry: Registry) -> int:  # type: ignore[no-untyped-def]
    """Submit a one-round run, wait for it, and return the version its round produced."""
    stack.submit_run()
    assert stack.wait_for_run(timeout=180) == "finished:completed"
    run = registry.latest_run()
    rounds = [r for r in registry.list_rounds(run.id) if r.round == 1]  # type: ignore[union-attr]
    assert rounds and rounds[0].version is not None, rounds
    return rounds[0].version


def _eval_accuracy(registry: Registry, version: int) -> float:
    return float(registry.get_version(version).metrics[keys.EVAL_ACCURACY])


def test_a_poisoned_fedavg_round_is_stopped_in_phase_one_and_the_next_round_rolls_out(
    cloud_settings, stack_factory, fleet_factory
) -> None:
    s = cloud_settings
    s.run = dataclasses.replace(s.run, num_rounds=1, min_nodes=DEVICES, strategy="fedavg")
    s.rollout = RolloutSection(
        policy="staged",
        phases="0.25, 1.0",
        min_devices="1, 0",
        max_accuracy_drop=0.05,
        soak_s=1.0,
        phase_timeout_s=60.0,
        silent_devices="ignore",
        on_failure="rollback",
    )
    stack = stack_factory(s)
    spec = fleet_spec(s, stack, scheme="iid")
    fleet = fleet_factory(spec, DEVICES)
    addresses = {d.name: d.address for d in fleet.devices}
    registry: Registry = stack.registry
    ordered = sorted(addresses, key=lambda n: cohort.position(s.cloud.fleet, n))
    first, attacker = ordered[0], ordered[-1]  # phase 1 checks on `first` only
    bad_device = next(d for d in fleet.devices if d.name == attacker)
    honest = device_partitions(
        load_digits(layout="flat", seed=spec.seed), DEVICES, scheme="iid", seed=spec.seed
    )[fleet.devices.index(bad_device)]

    # 1. A good round: released through both phases to every device.
    v_good = _run_one_round(stack, registry)
    _wait_event(registry, v_good, "rollout promoted", timeout=90)
    assert registry.current().version == v_good  # type: ignore[union-attr]
    wait_served(addresses, v_good, timeout=60)
    good_accuracy = _eval_accuracy(registry, v_good)

    # 2. The attacker's device trains on shifted labels, six times over.
    poisoned_x = np.concatenate([honest.x] * BOOST)
    poisoned_y = np.concatenate([(honest.y + 1) % CLASSES] * BOOST).astype(honest.y.dtype)
    assert _load(bad_device.config, poisoned_x, poisoned_y) == BOOST * len(honest)
    with ServedWatch(addresses) as watch:
        v_bad = _run_one_round(stack, registry)
        failed = _wait_event(registry, v_bad, "rollout phase failed", timeout=90)
        _wait_event(registry, v_bad, "rollout rolled back", timeout=30)
        wait_served(addresses, v_good, timeout=30)
    run = registry.latest_run()
    poisoned_round = next(r for r in registry.list_rounds(run.id) if r.round == 1)  # type: ignore[union-attr]
    examples = {r.device_id: r.num_examples for r in poisoned_round.replies if r.ok}
    assert sorted(examples) == sorted(addresses), examples  # every device trained, FedAvg
    # It trains on the train part of its samples: copies of a sample share its side.
    trained = len(split_samples(poisoned_x, poisoned_y).train)
    assert examples[attacker] == trained and trained % BOOST == 0, examples
    bad_accuracy = _eval_accuracy(registry, v_bad)
    assert bad_accuracy < good_accuracy - 0.3, (good_accuracy, bad_accuracy)  # really bad

    # Phase 1's device checked it on its own data and the gate said no.
    assert failed["phase"] == 1 and failed["cohort"] == [first], failed
    assert failed["accuracy_drop"] > 0.3 and "drops by" in failed["reason"], failed
    assert failed["checked"] == 1.0 and failed["failures"] == 0.0, failed
    assert [k for k, _ in _events(registry, v_bad)] == [
        "rollout started",
        "rollout phase failed",
        "rollout rolled back",
    ]
    check = next(
        e
        for e in registry.list_events(500)
        if e.kind == "candidate_checked" and e.version == v_bad and e.device_id == first
    )
    assert check.detail.startswith("phase 1: candidate accuracy "), check
    assert f"served version {v_good} " in check.detail, check
    # No device served it at any moment; the phase's device and all others serve the
    # good version; the fleet-wide release did not move.
    assert all(v_bad not in seen for seen in watch.seen.values()), watch.seen
    assert {n: served_version(a) for n, a in addresses.items()} == dict.fromkeys(addresses, v_good)
    assert registry.current().version == v_good  # type: ignore[union-attr]
    # What the candidate topic holds now: the whole fleet told to leave the candidate.
    assert stack.broker is not None
    revert = _retained_candidate(stack.broker, s.cloud.fleet)
    assert revert is not None and (revert.version, revert.action) == (v_bad, "revert")
    assert (revert.cohort_ppm, revert.served_version) == (cohort.SCALE, v_good), revert
    # The UI's API shows the rollback with the gate's figures.
    with urllib.request.urlopen(f"{stack.web.url}/api/rollouts", timeout=10) as reply:
        shown = json.loads(reply.read())
    last = shown["history"][-1]
    assert (last["version"], last["status"], last["served_version"]) == (
        v_bad,
        "rolled back",
        v_good,
    )
    phase1 = last["phases"][0]
    assert phase1["passed"] is False and phase1["checked"] == [first], phase1
    assert phase1["figures"]["accuracy_drop"] > 0.3, phase1
    assert phase1["figures"]["candidate_accuracy"] < phase1["figures"]["served_accuracy"]

    # 3. Honest data again: the next round recovers and rolls out to every device.
    assert _load(bad_device.config, honest.x, honest.y) == len(honest)
    v_next = _run_one_round(stack, registry)
    assert v_next > v_bad
    assert registry.get_version(v_next).parent_version == v_good, "trained from the good one"
    assert any(
        e.kind == "round base reset" and e.version == v_good for e in registry.list_events(500)
    )
    _wait_event(registry, v_next, "rollout promoted", timeout=90)
    kinds = [k for k, _ in _events(registry, v_next)]
    assert kinds == [
        "rollout started",
        "rollout phase passed",
        "rollout phase passed",
        "rollout promoted",
    ], kinds
    assert registry.current().version == v_next  # type: ignore[union-attr]
    wait_served(addresses, v_next, timeout=60)
    print(
        f"cloud accuracy: good v{v_good} {good_accuracy:.3f}, poisoned v{v_bad} "
        f"{bad_accuracy:.3f}, next v{v_next} {_eval_accuracy(registry, v_next):.3f}; "
        f"phase 1 of v{v_bad}: {failed['reason']}"
    )
