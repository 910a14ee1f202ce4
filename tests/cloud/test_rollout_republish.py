"""What the rollout controller puts back on the candidate topic after a broker restart.

Real registry, real Mosquitto, no devices. A restarted broker's autosave may hold any
older state of the candidate topic; here it is made to hold a stale one by publishing
it (the SIGKILL and restart themselves are exercised in
``tests/e2e/test_rollout_broker_restart.py``). A rolled-back rollout's ``revert`` goes
out again unchanged (same sequence: devices that acted on it ignore it), a promoted
rollout's candidate topic is cleared, and every republish is a registry event.
"""

from __future__ import annotations

import json
import time

import paho.mqtt.client as mqtt

from cloud.broker import Broker
from cloud.rollout import REPUBLISHED_EVENT_KIND
from cloud.signer import SignerClient
from protos import codec, topics
from tests.cloud.test_signer import _add
from tests.cloud.test_signer_rollout import _retained_candidate, _wait_kind, staged

__all__ = ["staged"]  # the fixture, shared with test_signer_rollout


def _put_retained(broker: Broker, topic: str, payload: bytes) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def _republished(registry, version: int) -> list[dict]:  # type: ignore[no-untyped-def]
    return [
        json.loads(e.detail)
        for e in reversed(registry.list_events(200))
        if e.kind == REPUBLISHED_EVENT_KIND and e.version == version
    ]


def test_finished_rollouts_leave_the_candidate_topic_as_they_left_it(  # type: ignore[no-untyped-def]
    staged, broker: Broker
) -> None:
    s, registry, service = staged
    controller = service.signer.rollout
    client = SignerClient(s.data_dir)
    topic = topics.release_candidate("staged")
    run = registry.start_run(num_rounds=3, strategy="fedavg", config={})
    v1 = _add(registry, s, run, 0)
    client.release(v1)
    assert controller.republish() is None, "no rollout yet: nothing to put back"
    assert _republished(registry, v1) == []

    now = int(time.time() * 1000)
    registry.upsert_device_status(
        codec.DeviceStatus("dev-1", "staged", serving_version=v1, state="SERVING", timestamp_ms=now)
    )
    v2 = _add(registry, s, run, 1)
    client.release(v2)
    checking = _retained_candidate(broker, "staged")
    assert checking is not None and checking.action == "check"
    _wait_kind(registry, v2, "rollout rolled back")  # dev-1 never answers
    revert = _retained_candidate(broker, "staged")
    assert revert is not None and revert.action == "revert"

    # The broker comes back with the phase's older "check" retained.
    _put_retained(broker, topic, codec.manifest_to_bytes(checking))
    assert controller.republish() is None
    again = _retained_candidate(broker, "staged")
    assert again == revert, "the revert went out again, unchanged"
    assert _republished(registry, v2)[-1]["action"] == "revert"
    assert _republished(registry, v2)[-1]["sequence"] == revert.sequence

    # A promoted rollout: a stale candidate on the topic is cleared.
    v3 = _add(registry, s, run, 2)
    client.release(v3)
    client.rollout("rollout-promote", v3)  # before dev-1's silence fails the phase
    assert registry.current().version == v3  # type: ignore[union-attr]
    assert _retained_candidate(broker, "staged") is None
    _put_retained(broker, topic, codec.manifest_to_bytes(checking))
    controller.republish()
    assert _retained_candidate(broker, "staged") is None
    assert _republished(registry, v3)[-1]["action"] == "clear"
