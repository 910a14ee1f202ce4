"""Rollout state in the registry: stored at every change, resumed by a restarted signer.

Real registry (SQLite and a real PostgreSQL), real Mosquitto, real release signers (the
"restart" is a second :class:`SignerService` on the same registry and broker, as a
restarted ``cloud up`` builds one; the whole cloud restart is exercised in
``tests/e2e/test_rollout_cloud_restart.py``). No devices: the one device the registry
lists as online never answers, and its check is handed to the controller as the fleet
monitor would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from cloud import config as cloud_config
from cloud.broker import Broker
from cloud.registry import InvalidRecordError, Registry
from cloud.rollout_state import Rollout, RolloutStateError
from cloud.signer import SignerClient, SignerService
from cloud.supervisor import init_cloud
from protos import codec
from tests.cloud.test_signer import _add
from tests.cloud.test_signer_rollout import _retained_candidate

PHASE_TIMEOUT_S = 6.0


@pytest.fixture
def cloud(
    tmp_path: Path, mlp_model_dir: Path, broker: Broker, registry_url: str
) -> Iterator[tuple[cloud_config.CloudSettings, Registry]]:
    conf = init_cloud(tmp_path / "cloud", fleet="staged", model_dir=mlp_model_dir)
    s = cloud_config.load(conf)
    s.broker.port = broker.port
    s.registry.url = registry_url
    s.rollout = dataclasses.replace(
        s.rollout,
        policy="staged",
        phases="0.5, 1.0",
        min_devices="1, 1",
        soak_s=0.0,
        phase_timeout_s=PHASE_TIMEOUT_S,
        silent_devices="ignore",
        on_failure="halt",
    )
    registry = Registry(s.registry_url)
    try:
        yield s, registry
    finally:
        registry.close()


def _online(registry: Registry, device: str, version: int) -> None:
    registry.upsert_device_status(
        codec.DeviceStatus(
            device, "staged", serving_version=version, state="SERVING",
            timestamp_ms=int(time.time() * 1000),
        )
    )  # fmt: skip


def _kinds(registry: Registry, version: int) -> list[str]:
    return [
        e.kind
        for e in reversed(registry.list_events(300))
        if e.device_id == "cloud" and e.kind.startswith("rollout") and e.version == version
    ]


def test_the_registry_stores_one_state_per_rollout(registry_url: str) -> None:
    registry = Registry(registry_url)
    try:
        assert registry.list_rollouts() == []
        registry.save_rollout(3, "running", {"format": 1, "phase": 1})
        registry.save_rollout(4, "running", {"format": 1})
        registry.save_rollout(3, "superseded", {"format": 1, "phase": 2})
        stored = registry.list_rollouts()
        assert [(r.version, r.status) for r in stored] == [(4, "running"), (3, "superseded")]
        assert json.loads(stored[1].state_json) == {"format": 1, "phase": 2}
        assert [r.version for r in registry.list_rollouts(1)] == [4]
        for version, status, state in (
            (0, "running", {}),
            (True, "running", {}),
            (5, "", {}),
            (5, "x" * 17, {}),
            (5, "running", {"drop": float("nan")}),
            (5, "running", {"bytes": b"\x00"}),
        ):
            with pytest.raises(InvalidRecordError):
                registry.save_rollout(version, status, state)  # type: ignore[arg-type]
        assert [r.version for r in registry.list_rollouts()] == [4, 3], "nothing half-stored"
    finally:
        registry.close()


def test_a_restarted_signer_resumes_the_phase_with_its_reports(cloud, broker: Broker) -> None:  # type: ignore[no-untyped-def]
    s, registry = cloud
    run = registry.start_run(num_rounds=3, strategy="fedavg", config={})
    first = SignerService(s, registry).start()
    try:
        client = SignerClient(s.data_dir)
        v1 = _add(registry, s, run, 0)
        client.release(v1)
        _online(registry, "dev-1", v1)
        _online(registry, "dev-2", v1)
        v2 = _add(registry, s, run, 1)
        client.release(v2)
        before = client.rollout("rollout-status")["status"]["active"]
        cohort = before["phases"][0]["cohort"]
        assert len(cohort) == 1, before
        # The cloud dies after the report arrived, before its phase was decided.
        first.signer.rollout.stop()
        report = codec.DeviceEvent(
            cohort[0], int(time.time() * 1000), "candidate_checked", "", v2,
            {"candidate_accuracy": 0.9, "served_accuracy": 0.8, "examples": 50.0, "phase": 1.0},
        )  # fmt: skip
        first.signer.rollout.on_events([report])
    finally:
        first.stop()
    stored = registry.list_rollouts()[0]
    assert (stored.version, stored.status) == (v2, "running")

    second = SignerService(s, registry).start()
    try:
        status = SignerClient(s.data_dir).rollout("rollout-status")["status"]
        active = status["active"]
        assert (active["version"], active["status"], active["phase"]) == (v2, "running", 1)
        phase1 = active["phases"][0]
        assert phase1["cohort"] == cohort and phase1["checked"] == cohort
        assert phase1["started_at"] == before["phases"][0]["started_at"], "same phase, same clock"
        assert [r["status"] for r in status["history"]] == []
        # The candidate topic goes back out (the broker may have restarted with the cloud).
        deadline = time.monotonic() + 10
        while "rollout republished" not in _kinds(registry, v2):
            assert time.monotonic() < deadline, _kinds(registry, v2)
            time.sleep(0.1)
        candidate = _retained_candidate(broker, "staged")  # phase 1's, or already phase 2's
        assert candidate is not None and candidate.version == v2 and candidate.action == "check"
        # Phase 1 passes at once on the stored report (soak 0, its one device answered);
        # phase 2's devices never answer, so it ends at its timeout.
        deadline = time.monotonic() + PHASE_TIMEOUT_S + 15
        while not {"rollout promoted", "rollout halted"} & set(_kinds(registry, v2)):
            assert time.monotonic() < deadline, _kinds(registry, v2)
            time.sleep(0.1)
        kinds = _kinds(registry, v2)
        assert kinds[:4] == [
            "rollout started",
            "rollout resumed",
            "rollout republished",
            "rollout phase passed",
        ], kinds
        passed = next(
            json.loads(e.detail)
            for e in registry.list_events(300)
            if e.kind == "rollout phase passed" and e.version == v2
        )
        assert passed["phase"] == 1 and passed["checked"] == 1.0 and passed["timed_out"] is False
    finally:
        second.stop()


def test_unreadable_stored_states_are_skipped_with_a_warning(  # type: ignore[no-untyped-def]
    cloud, caplog: pytest.LogCaptureFixture
) -> None:
    s, registry = cloud
    run = registry.start_run(num_rounds=3, strategy="fedavg", config={})
    v1 = _add(registry, s, run, 0)
    good = Rollout.from_state(_state(v1))
    registry.save_rollout(v1, "halted", good.to_state())
    bad = {
        v1 + 1: "{not json",
        v1 + 2: json.dumps({**_state(v1 + 2), "format": 99}),
        v1 + 3: json.dumps({**_state(v1 + 3), "index": 5}),
        v1 + 4: json.dumps({**_state(v1 + 4), "phases": "everything"}),
        v1 + 5: json.dumps([1, 2, 3]),
        v1 + 6: json.dumps({**_state(v1 + 6), "last_manifest": "not base64!"}),
    }
    for version in bad:
        registry.save_rollout(version, "running", {"placeholder": True})
    engine = create_engine(s.registry_url)
    try:
        with engine.begin() as conn:
            for version, document in bad.items():
                conn.execute(
                    text("UPDATE rollouts SET state_json = :doc WHERE version = :v"),
                    {"doc": document, "v": version},
                )
    finally:
        engine.dispose()

    with caplog.at_level(logging.WARNING, logger="cloud.rollout"):
        service = SignerService(s, registry).start()
    try:
        status = SignerClient(s.data_dir).rollout("rollout-status")["status"]
        assert status["active"]["version"] == v1 and status["active"]["status"] == "halted"
        assert [r["version"] for r in status["history"]] == [v1]
    finally:
        service.stop()
    ignored = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    assert len(ignored) == len(bad), ignored
    assert any("unknown state format 99" in m for m in ignored), ignored
    assert any("phase index 5" in m for m in ignored), ignored
    assert any("last_manifest does not decode" in m for m in ignored), ignored


def _state(version: int) -> dict:  # type: ignore[type-arg]
    """A well-formed stored state of a halted one-phase rollout of ``version``."""
    return {
        "format": 1,
        "version": version,
        "served_version": 0,
        "round": version,
        "parent_version": 0,
        "architecture_id": "mlp",
        "metrics": {},
        "index": 0,
        "status": "halted",
        "sequence": 1,
        "chunk_count": 1,
        "started_wall": 1000.0,
        "finished_wall": 1001.0,
        "last_manifest": None,
        "phases": [
            {
                "number": 1,
                "fraction": 1.0,
                "min_devices": 0,
                "cohort_ppm": 1_000_000,
                "cohort": ["dev-1"],
                "started_wall": 1000.0,
                "decided_wall": None,
                "reports": {},
                "failed": {},
                "result": None,
            }
        ],
    }


def test_a_state_of_the_wrong_shape_names_its_problem() -> None:
    for change, needle in (
        ({"status": "exploded"}, "unknown status 'exploded'"),
        ({"version": "7"}, "'version' is '7', not int"),
        ({"started_wall": True}, "'started_wall' is True"),
        ({"format": None}, "unknown state format None"),
    ):
        with pytest.raises(RolloutStateError, match=needle):
            Rollout.from_state({**_state(3), **change})
    phase = {**_state(3)["phases"][0], "reports": {"dev-1": {"candidate_accuracy": 2.0}}}
    with pytest.raises(RolloutStateError, match="report of 'dev-1'"):
        Rollout.from_state({**_state(3), "phases": [phase]})
    r = Rollout.from_state(_state(3))
    assert Rollout.from_state(json.loads(json.dumps(r.to_state()))).to_state() == r.to_state()
