"""The registry on a real SQLite file and a real PostgreSQL server: versions, artifacts, rounds,
devices, concurrency. Every test runs on both databases (``registry_url`` is parametrised)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from cloud.registry import (
    ArtifactCorruptError,
    InvalidRecordError,
    NotFoundError,
    Registry,
)
from protos.codec import DeviceEvent, DeviceStatus

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def registry(registry_url: str) -> Iterator[Registry]:
    reg = Registry(registry_url)
    yield reg
    reg.close()


def _status(device: str, version: int, state: str = "SERVING", ts: int = 1000) -> DeviceStatus:
    return DeviceStatus(
        device_id=device,
        fleet="demo",
        serving_version=version,
        state=state,
        timestamp_ms=ts,
        sample_count=120,
        profile="rpi4",
        last_metrics={"accuracy": 0.9},
    )


def test_versions_are_consecutive_and_idempotent_per_round(registry: Registry) -> None:
    run = registry.start_run(num_rounds=3, strategy="fedavg", config={"lr": 0.05})
    v1 = registry.add_version(
        package=b"pkg-1",
        architecture_id="mlp",
        round=1,
        run_id=run,
        parent_version=None,
        metrics={"loss": 1.5},
        participants=["b", "a"],
    )
    again = registry.add_version(
        package=b"pkg-1",
        architecture_id="mlp",
        round=1,
        run_id=run,
        parent_version=None,
        metrics={"loss": 1.5},
    )
    v2 = registry.add_version(
        package=b"pkg-2",
        architecture_id="mlp",
        round=2,
        run_id=run,
        parent_version=1,
        metrics={"loss": 0.7},
    )
    assert (v1.version, again.version, v2.version) == (1, 1, 2)
    assert again == v1
    assert v1.participants == ["a", "b"]
    assert v2.parent_version == 1
    assert [v.version for v in registry.list_versions()] == [1, 2]
    # A different package for a round that already has a version is not a new version.
    retried = registry.add_version(
        package=b"pkg-other",
        architecture_id="mlp",
        round=2,
        run_id=run,
        parent_version=1,
        metrics={},
    )
    assert retried.version == 2 and retried.sha256 == v2.sha256
    assert registry.latest_version() == v2


def test_same_bytes_are_stored_once(registry: Registry) -> None:
    run = registry.start_run(num_rounds=2, strategy="fedavg", config={})
    a = registry.add_version(
        package=b"same", architecture_id="mlp", round=1, run_id=run, parent_version=None, metrics={}
    )
    b = registry.add_version(
        package=b"same", architecture_id="mlp", round=2, run_id=run, parent_version=1, metrics={}
    )
    assert a.version != b.version
    assert a.sha256 == b.sha256
    assert registry.artifact_count() == 1
    assert registry.version_bytes(2) == b"same"
    assert registry.artifact_bytes(a.sha256) == b"same"


def test_content_address_is_the_sha256_of_the_bytes(registry: Registry) -> None:
    v = registry.add_version(
        package=b"abc", architecture_id="mlp", round=0, run_id=None, parent_version=None, metrics={}
    )
    # SHA-256("abc") from FIPS 180-2, appendix B.1.
    assert v.sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert v.size == 3


def test_reopening_resumes_where_it_stopped(registry_url: str) -> None:
    first = Registry(registry_url)
    run = first.start_run(num_rounds=5, strategy="fedprox", config={"mu": 0.1}, flower_run_id="42")
    for rnd in (1, 2, 3):
        first.add_version(
            package=f"w{rnd}".encode(),
            architecture_id="cnn",
            round=rnd,
            run_id=run,
            parent_version=rnd - 1 or None,
            metrics={"accuracy": rnd / 10},
        )
    first.set_current(3, pinned=False)
    first.close()

    second = Registry(registry_url)
    latest = second.latest_version()
    assert latest is not None and (latest.version, latest.round) == (3, 3)
    resumed_run = second.latest_run()
    assert resumed_run is not None
    assert (resumed_run.id, resumed_run.flower_run_id, resumed_run.config) == (
        run,
        "42",
        {"mu": 0.1},
    )
    # The restarted cloud re-registers round 3, then continues with round 4.
    assert (
        second.add_version(
            package=b"w3", architecture_id="cnn", round=3, run_id=run, parent_version=2, metrics={}
        ).version
        == 3
    )
    assert (
        second.add_version(
            package=b"w4", architecture_id="cnn", round=4, run_id=run, parent_version=3, metrics={}
        ).version
        == 4
    )
    current = second.current()
    assert current is not None and (current.version, current.pinned) == (3, False)
    second.close()


def test_tampered_artifact_is_refused(registry: Registry, registry_url: str) -> None:
    v = registry.add_version(
        package=b"genuine weights",
        architecture_id="mlp",
        round=1,
        run_id=None,
        parent_version=None,
        metrics={},
    )
    engine = create_engine(registry_url)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE artifacts SET data = :data WHERE sha256 = :sha"),
            {"data": b"evil weights!!!", "sha": v.sha256},
        )
    engine.dispose()
    with pytest.raises(ArtifactCorruptError, match=f"expected {v.sha256}"):
        registry.version_bytes(v.version)
    with pytest.raises(ArtifactCorruptError):
        registry.artifact_bytes(v.sha256)


def test_missing_records_and_bad_values_raise(registry: Registry) -> None:
    with pytest.raises(NotFoundError):
        registry.get_version(7)
    with pytest.raises(NotFoundError):
        registry.version_bytes(7)
    with pytest.raises(NotFoundError):
        registry.get_run(3)
    with pytest.raises(NotFoundError):
        registry.set_current(1, pinned=True)
    with pytest.raises(NotFoundError):
        registry.round_started(9, 1, sampled=["a"])
    run = registry.start_run(num_rounds=1, strategy="fedavg", config={})
    with pytest.raises(InvalidRecordError, match="not finite"):
        registry.round_finished(
            run, 1, aggregated_metrics={"loss": float("nan")}, version=None, dropped=[]
        )
    with pytest.raises(InvalidRecordError, match="status"):
        registry.finish_run(run, "exploded")
    with pytest.raises(InvalidRecordError, match="state"):
        registry.upsert_device_status(_status("d1", 0, state="ASLEEP"))
    with pytest.raises(NotFoundError, match="parent"):
        registry.add_version(
            package=b"x", architecture_id="mlp", round=1, run_id=run, parent_version=5, metrics={}
        )


def test_runs_and_serving_pointer(registry: Registry) -> None:
    assert registry.latest_run() is None and registry.current() is None
    r1 = registry.start_run(num_rounds=2, strategy="fedavg", config={})
    registry.finish_run(r1, "completed")
    r2 = registry.start_run(num_rounds=4, strategy="fedavg", config={})
    assert [r.status for r in registry.list_runs()] == ["completed", "running"]
    assert registry.get_run(r1).finished_at is not None
    latest_run = registry.latest_run()
    assert latest_run is not None and latest_run.id == r2
    for rnd in (1, 2):
        registry.add_version(
            package=bytes([rnd]),
            architecture_id="mlp",
            round=rnd,
            run_id=r2,
            parent_version=None,
            metrics={},
        )
    assert registry.set_current(2, pinned=False).sequence == 1
    rollback = registry.set_current(1, pinned=True)
    assert (rollback.version, rollback.pinned, rollback.sequence) == (1, True, 2)
    assert registry.set_current(2, pinned=False, sequence=10).sequence == 10


def test_release_sequences_are_millisecond_timestamps(registry: Registry) -> None:
    # The publisher numbers releases with time.time() in ms (> 2**31): PostgreSQL's
    # INTEGER refused them ("integer out of range"), so every round's release failed.
    registry.add_version(
        package=b"w", architecture_id="mlp", round=0, run_id=None, parent_version=None, metrics={}
    )
    sequence = 1_796_000_000_000
    assert registry.set_current(1, pinned=False, sequence=sequence).sequence == sequence
    current = registry.current()
    assert current is not None and current.sequence == sequence
    assert registry.set_current(1, pinned=True).sequence == sequence + 1


def test_round_bookkeeping(registry: Registry) -> None:
    run = registry.start_run(num_rounds=2, strategy="fedavg", config={})
    registry.record_evaluation(run, 0, {"accuracy": 0.1, "loss": 2.3})
    registry.round_started(run, 1, sampled=["dev-b", "dev-a", "dev-c"], started_at=100.0)
    registry.round_reply(run, 1, "dev-a", ok=True, num_examples=80, metrics={"loss": 0.9})
    registry.round_reply(run, 1, "dev-b", ok=False, error="trainer unavailable")
    in_flight = registry.list_rounds(run)[1]
    assert (in_flight.replied, in_flight.failed, in_flight.pending) == (
        ["dev-a"],
        ["dev-b"],
        ["dev-c"],
    )
    assert not in_flight.finished and in_flight.duration is None
    registry.round_finished(
        run, 1, aggregated_metrics={"loss": 0.9}, version=None, dropped=["dev-c"]
    )
    registry.record_evaluation(run, 1, {"accuracy": 0.8, "loss": 0.6})

    rounds = registry.list_rounds(run)
    assert [r.round for r in rounds] == [0, 1]
    assert rounds[0].eval_metrics == {"accuracy": 0.1, "loss": 2.3}
    done = rounds[1]
    assert done.sampled == ["dev-a", "dev-b", "dev-c"]
    assert done.dropped == ["dev-c"] and done.pending == []
    assert done.aggregated_metrics == {"loss": 0.9}
    assert done.eval_metrics == {"accuracy": 0.8, "loss": 0.6}
    assert done.finished and done.duration is not None and done.duration >= 0
    reply_a = done.replies[0]
    assert (reply_a.device_id, reply_a.num_examples, reply_a.metrics) == (
        "dev-a",
        80,
        {"loss": 0.9},
    )
    assert done.replies[1].error == "trainer unavailable"

    # Restarting the round (cloud restarted mid-round) clears the earlier attempt.
    registry.round_started(run, 1, sampled=["dev-a"])
    again = registry.list_rounds(run)[1]
    assert again.replies == [] and again.pending == ["dev-a"] and not again.finished


def test_device_status_newest_wins_and_spread(registry: Registry) -> None:
    registry.upsert_device_status(_status("d1", 2, ts=2000))
    registry.upsert_device_status(_status("d2", 1, ts=2000))
    registry.upsert_device_status(_status("d3", 2, state="OFFLINE", ts=2000))
    # A re-delivered older status does not roll d1 back.
    assert registry.upsert_device_status(_status("d1", 1, ts=1500)) is False
    d1 = registry.get_device("d1")
    assert (d1.serving_version, d1.online, d1.profile, d1.last_metrics) == (
        2,
        True,
        "rpi4",
        {"accuracy": 0.9},
    )
    assert not registry.get_device("d3").online
    assert registry.spread(2) == {"serving": 1, "online": 2, "total": 3}
    assert registry.spread(1) == {"serving": 1, "online": 2, "total": 3}
    registry.upsert_device_status(_status("d2", 2, ts=2500))
    assert registry.spread(2)["serving"] == 2
    assert [d.device_id for d in registry.list_devices()] == ["d1", "d2", "d3"]
    with pytest.raises(NotFoundError):
        registry.get_device("nope")


def test_a_last_will_older_than_the_stored_status_still_marks_the_device_offline(
    registry: Registry,
) -> None:
    """The Last Will is composed at connect time (older timestamp and version)."""
    registry.upsert_device_status(_status("d1", 3, ts=5000))
    assert registry.upsert_device_status(_status("d1", 2, state="OFFLINE", ts=1000)) is True
    d1 = registry.get_device("d1")
    assert (d1.online, d1.serving_version, d1.timestamp_ms) == (False, 3, 5000)
    assert registry.spread(3) == {"serving": 0, "online": 0, "total": 1}
    # Already offline: a second old OFFLINE changes nothing; an old SERVING never wins.
    assert registry.upsert_device_status(_status("d1", 2, state="OFFLINE", ts=900)) is False
    assert registry.upsert_device_status(_status("d1", 2, ts=4000)) is False
    assert not registry.get_device("d1").online
    # Back after a reconnect: its next status is newer than anything stored.
    assert registry.upsert_device_status(_status("d1", 3, ts=6000)) is True
    assert registry.get_device("d1").online


def test_events_newest_first(registry: Registry) -> None:
    for i, kind in enumerate(("release_installed", "release_rejected", "install_failed")):
        registry.record_event(DeviceEvent("d1", 1000 + i, kind, detail=f"#{i}", version=i))
    events = registry.list_events(limit=2)
    assert [e.kind for e in events] == ["install_failed", "release_rejected"]
    assert events[0].detail == "#2" and events[0].version == 2


def test_change_token_grows_with_writes(registry: Registry) -> None:
    token, changed = registry.changes_since(-1)
    assert changed
    assert registry.changes_since(token) == (token, False)
    registry.upsert_device_status(_status("d1", 0))
    new_token, changed = registry.changes_since(token)
    assert changed and new_token > token


def test_two_registries_in_two_threads(registry_url: str) -> None:
    writer = Registry(registry_url)
    reader = Registry(registry_url)
    run = writer.start_run(num_rounds=40, strategy="fedavg", config={})
    errors: list[BaseException] = []

    def write_versions() -> None:
        try:
            for rnd in range(1, 41):
                writer.add_version(
                    package=f"weights {rnd}".encode(),
                    architecture_id="mlp",
                    round=rnd,
                    run_id=run,
                    parent_version=None,
                    metrics={"round": rnd},
                )
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def write_devices() -> None:
        try:
            for i in range(40):
                reader.upsert_device_status(_status(f"dev-{i % 5}", i, ts=1000 + i))
                reader.list_versions()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write_versions), threading.Thread(target=write_devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert [v.version for v in reader.list_versions()] == list(range(1, 41))
    assert len(writer.list_devices()) == 5
    writer.close()
    reader.close()


_CHILD = textwrap.dedent(
    """
    import sys
    from cloud.registry import Registry
    reg = Registry(sys.argv[1])
    run = reg.start_run(num_rounds=30, strategy="fedavg", config={"child": True})
    for rnd in range(1, 31):
        reg.round_started(run, rnd, sampled=["a", "b"])
        reg.round_reply(run, rnd, "a", ok=True, num_examples=10, metrics={"loss": 1.0 / rnd})
        v = reg.add_version(package=b"child %d" % rnd, architecture_id="mlp", round=rnd,
                            run_id=run, parent_version=None, metrics={"loss": 1.0 / rnd})
        reg.round_finished(run, rnd, aggregated_metrics={"loss": 1.0 / rnd},
                           version=v.version, dropped=["b"])
    print(run)
    """
)


def test_two_processes_on_one_database(registry_url: str) -> None:
    parent = Registry(registry_url)
    parent_run = parent.start_run(num_rounds=30, strategy="fedavg", config={})
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, registry_url],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        for rnd in range(1, 31):
            parent.upsert_device_status(_status(f"dev-{rnd % 3}", rnd, ts=rnd))
            parent.add_version(
                package=b"parent %d" % rnd,
                architecture_id="mlp",
                round=rnd,
                run_id=parent_run,
                parent_version=None,
                metrics={},
            )
            parent.list_rounds(parent_run)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err.decode()
    child_run = int(out.decode().strip())
    versions = parent.list_versions()
    # 60 versions, numbered 1..60 with no gap or duplicate, 30 from each process.
    assert [v.version for v in versions] == list(range(1, 61))
    assert sum(1 for v in versions if v.run_id == child_run) == 30
    rounds = parent.list_rounds(child_run)
    assert len(rounds) == 30 and all(r.dropped == ["b"] and r.replied == ["a"] for r in rounds)
    parent.close()
