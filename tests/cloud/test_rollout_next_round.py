"""After a rollback the next round trains from the fleet's promoted version, not from the
rolled-back one (real registry, real Mosquitto, the signer's rollout controller)."""

from __future__ import annotations

import time

import numpy as np

from cloud.aggregator import Aggregator
from cloud.signer import SignerClient
from protos import codec
from tests.cloud.test_signer import _add
from tests.cloud.test_signer_rollout import _wait_kind, staged

__all__ = ["staged"]  # the fixture, shared with test_signer_rollout


def test_a_round_after_a_rollback_starts_from_the_promoted_version(staged) -> None:  # type: ignore[no-untyped-def]
    s, registry, _ = staged
    client = SignerClient(s.data_dir)
    run = registry.start_run(num_rounds=3, strategy="fedavg", config={})
    v1 = _add(registry, s, run, 0)
    client.release(v1)
    now = int(time.time() * 1000)
    registry.upsert_device_status(  # one online device that never checks: phase 1 fails
        codec.DeviceStatus("dev-1", "staged", serving_version=v1, state="SERVING", timestamp_ms=now)
    )
    v2 = _add(registry, s, run, 1)
    client.release(v2)
    of = lambda v: codec.package_from_bytes(registry.version_bytes(v)).weights  # noqa: E731
    aggregator = Aggregator(s, registry, client)

    # While v2 is in its phases, rounds go on from it.
    weights, parent = aggregator.base_for_round(2, of(v2), v2)
    assert parent == v2

    _wait_kind(registry, v2, "rollout rolled back")
    weights, parent = aggregator.base_for_round(2, of(v2), v2)
    assert parent == v1 and registry.current().version == v1  # type: ignore[union-attr]
    for name, w in of(v1).items():
        np.testing.assert_array_equal(weights[name], w)
    reset = [e for e in registry.list_events(50) if e.kind == "round base reset"]
    assert [(e.version, e.detail) for e in reset] == [
        (v1, f"round 2 trains from version {v1}: version {v2} was rolled back")
    ]
