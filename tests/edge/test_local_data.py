"""LocalData: validation, persistence, eviction, torn tails, SIGKILL, and the gRPC service."""

from __future__ import annotations

import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from edge.config import load_settings
from edge.errors import InvalidInput, ModelNotLoaded, NoRoomForSamples
from edge.grpc_status import grpc_status
from edge.local_data import LOG_FILE, LocalData, SampleSpec
from edge.server import EdgeServer
from protos import codec
from protos.edgefl.v1 import local_data_pb2, local_data_pb2_grpc
from tests.edge.helpers import device_config, make_package, start_process, wait_for_line

SPEC = SampleSpec((64,), 10)


def batch(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(start, start + n)
    return np.repeat(idx[:, None].astype(np.float32), 64, axis=1), (idx % 10).astype(np.int32)


def test_append_persists_across_reopen(tmp_path: Path) -> None:
    data = LocalData(tmp_path, capacity=100, spec=SPEC)
    assert data.append(*batch(0, 5)).total == 5
    assert data.append(*batch(5, 3)).total == 8
    again = LocalData(tmp_path, capacity=100, spec=SPEC)
    x, y = again.snapshot()
    assert x.shape == (8, 64) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 0], np.arange(8))
    np.testing.assert_array_equal(y, np.arange(8) % 10)
    stats = again.stats()
    assert stats.count == 8 and stats.input_shape == (64,)
    assert stats.label_counts == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1}


def test_capacity_evicts_oldest_first(tmp_path: Path) -> None:
    data = LocalData(tmp_path, capacity=10, spec=SPEC)
    data.append(*batch(0, 6))
    result = data.append(*batch(6, 7))
    assert (result.accepted, result.evicted, result.total) == (7, 3, 10)
    x, _ = LocalData(tmp_path, capacity=10, spec=SPEC).snapshot()
    np.testing.assert_array_equal(x[:, 0], np.arange(3, 13))
    assert data.stats().eviction_policy == "oldest-first"


SAMPLE_BYTES = 64 * 4 + 4  # float32 values and an int32 label
RECORD_OVERHEAD = 12 + 8 + 4  # header, count and rank, one dim


def test_disk_budget_evicts_oldest_and_keeps_the_log_within_it(tmp_path: Path) -> None:
    reserved = [0]  # what the model store "uses"; the test moves it
    budget = 20_000
    data = LocalData(
        tmp_path, capacity=1000, spec=SPEC, max_bytes=budget, reserved_bytes=lambda: reserved[0]
    )
    log = tmp_path / LOG_FILE
    fits = (budget - RECORD_OVERHEAD) // SAMPLE_BYTES
    for i in range(100):  # one sample per record: headers alone would outgrow the budget
        data.append(*batch(i, 1))
        assert log.stat().st_size <= budget
    assert data.stats().capacity == fits == 76
    x, _ = data.snapshot()
    np.testing.assert_array_equal(x[:, 0], np.arange(100 - fits, 100))

    # A bigger model: samples give way at the next append, oldest first.
    reserved[0] = 10_000
    result = data.append(*batch(100, 2))
    fits = (budget - reserved[0] - RECORD_OVERHEAD) // SAMPLE_BYTES
    assert (result.total, data.stats().capacity) == (fits, fits)
    assert log.stat().st_size + reserved[0] <= budget
    np.testing.assert_array_equal(data.snapshot()[0][:, 0], np.arange(102 - fits, 102))

    # Reopened with a smaller budget: trimmed to it on open, newest kept.
    smaller = LocalData(tmp_path, capacity=1000, spec=SPEC, max_bytes=5_000)
    assert len(smaller) == (5_000 - RECORD_OVERHEAD) // SAMPLE_BYTES
    assert (tmp_path / LOG_FILE).stat().st_size <= 5_000


def test_no_room_for_samples_is_refused_and_loses_nothing(tmp_path: Path) -> None:
    reserved = [0]
    data = LocalData(
        tmp_path, capacity=100, spec=SPEC, max_bytes=20_000, reserved_bytes=lambda: reserved[0]
    )
    data.append(*batch(0, 10))
    before = (tmp_path / LOG_FILE).read_bytes()
    reserved[0] = 19_990  # the models take the whole budget
    with pytest.raises(NoRoomForSamples, match=r"model files use 0\.02 MiB") as info:
        data.append(*batch(10, 1))
    assert grpc_status(info.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(NoRoomForSamples):
        data.load_partition(*batch(0, 5))
    assert (tmp_path / LOG_FILE).read_bytes() == before and len(data) == 10
    assert data.stats().capacity == 0
    # Reopening in that state keeps the stored samples (appends stay refused).
    reopened = LocalData(tmp_path, 100, SPEC, max_bytes=20_000, reserved_bytes=lambda: 19_990)
    assert len(reopened) == 10 and (tmp_path / LOG_FILE).read_bytes() == before
    reserved[0] = 0  # room again
    assert data.append(*batch(10, 1)).total == 11


def test_disk_budget_counts_the_real_model_store(tmp_path: Path, mlp_model_dir: Path) -> None:
    """``[data] max_mb`` through the node and the gRPC service: the room left for
    samples is the budget minus the model store's files."""
    pkg = tmp_path / "initial.pkg"
    pkg.write_bytes(make_package(mlp_model_dir))
    settings = load_settings(
        device_config(tmp_path, initial_package=pkg), env={"EDGEFL_DATA_MAX_MB": "1"}
    )
    server = EdgeServer(settings, only="data")
    server.start()
    try:
        models = server.node.store.disk_bytes()
        assert models >= len(pkg.read_bytes())  # the installed package is counted
        expected = (2**20 - models - RECORD_OVERHEAD) // SAMPLE_BYTES
        with grpc.insecure_channel(server.local_address) as channel:
            stub = local_data_pb2_grpc.LocalDataStub(channel)
            assert stub.Stats(local_data_pb2.StatsRequest()).capacity == expected
            reply = stub.Append(append_request(*batch(0, expected + 5)))
            assert (reply.accepted, reply.evicted, reply.total) == (expected + 5, 5, expected)
        size = (settings.device.data_dir / "samples" / LOG_FILE).stat().st_size
        assert size + server.node.store.disk_bytes() <= 2**20
    finally:
        server.stop(grace=0)


def test_clear_and_load_partition(tmp_path: Path) -> None:
    data = LocalData(tmp_path, capacity=10, spec=SPEC)
    data.append(*batch(0, 4))
    assert data.clear() == 4
    assert len(LocalData(tmp_path, spec=SPEC)) == 0
    result = data.load_partition(*batch(100, 12))
    assert (result.evicted, result.total) == (2, 10)
    x, _ = LocalData(tmp_path, spec=SPEC).snapshot()
    np.testing.assert_array_equal(x[:, 0], np.arange(102, 112))


@pytest.mark.parametrize(
    ("x", "y", "problem"),
    [
        (np.zeros((2, 64), np.float64), np.zeros(2, np.int32), "x must be float32"),
        (np.zeros((2, 63), np.float32), np.zeros(2, np.int32), r"shape \['n', 64\]"),
        (np.zeros((2, 64), np.float32), np.zeros(3, np.int32), "2 samples but y 3"),
        (
            np.zeros((2, 64), np.float32),
            np.array([0, 10], np.int32),
            r"labels must lie in \[0, 10\)",
        ),
        (np.zeros((2, 64), np.float32), np.array([0, -1], np.int64), "labels must lie"),
        (np.zeros((2, 64), np.float32), np.zeros(2, np.float32), "integer labels"),
        (np.full((1, 64), np.nan, np.float32), np.zeros(1, np.int32), "NaN"),
        (np.zeros((0, 64), np.float32), np.zeros(0, np.int32), "no samples"),
    ],
)
def test_invalid_samples_are_rejected(
    tmp_path: Path, x: np.ndarray, y: np.ndarray, problem: str
) -> None:
    data = LocalData(tmp_path, spec=SPEC)
    with pytest.raises(InvalidInput, match=problem):
        data.append(x, y)
    assert len(LocalData(tmp_path, spec=SPEC)) == 0


def test_append_without_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotLoaded):
        LocalData(tmp_path).append(*batch(0, 1))


def test_torn_or_corrupt_tail_is_ignored_on_load(tmp_path: Path) -> None:
    data = LocalData(tmp_path, spec=SPEC)
    data.append(*batch(0, 3))
    data.append(*batch(3, 2))
    log = tmp_path / LOG_FILE
    whole = log.read_bytes()
    log.write_bytes(whole[:-17])  # cut the last record in the middle
    assert len(LocalData(tmp_path, spec=SPEC)) == 3
    assert len(log.read_bytes()) < len(whole)  # truncated back to the good prefix
    LocalData(tmp_path, spec=SPEC).append(*batch(3, 2))
    corrupt = bytearray(log.read_bytes())
    corrupt[-5] ^= 0xFF  # flip a bit in the last record: CRC mismatch
    log.write_bytes(bytes(corrupt))
    x, _ = LocalData(tmp_path, spec=SPEC).snapshot()
    np.testing.assert_array_equal(x[:, 0], np.arange(3))


def test_sigkill_mid_append_never_corrupts_the_store(tmp_path: Path) -> None:
    """A real appender process is SIGKILLed at random moments; acked samples survive."""
    root = tmp_path / "samples"
    rng = np.random.default_rng(7)
    acked = 0
    for attempt in range(6):
        proc = start_process(
            "appender",
            [sys.executable, "-m", "tests.edge.helpers", "sample-appender", str(root), "2000"],
            tmp_path / f"appender-{attempt}.log",
        )
        try:
            wait_for_line(proc, re.compile(r"acked \d+"), timeout=60)
            time.sleep(float(rng.uniform(0.0, 0.3)))
            proc.signal(signal.SIGKILL)
            proc.proc.wait(timeout=10)  # type: ignore[union-attr]
        finally:
            proc.stop()
        acked = max(int(n) for n in re.findall(r"acked (\d+)", proc.log_path.read_text()))
        data = LocalData(root, capacity=10**7, spec=SPEC)
        x, y = data.snapshot()
        assert len(y) >= acked, f"attempt {attempt}: acknowledged samples lost"
        assert len(y) % 2000 == 0, "a partial batch was loaded"
        np.testing.assert_array_equal(x[:, 0], np.arange(len(y)))
        np.testing.assert_array_equal(x[:, 63], np.arange(len(y)))
        np.testing.assert_array_equal(y, np.arange(len(y)) % 10)
        acked = len(y)


# -- the gRPC service ---------------------------------------------------------------------


@pytest.fixture
def data_stub(tmp_path: Path, mlp_model_dir: Path) -> Iterator[local_data_pb2_grpc.LocalDataStub]:
    pkg = tmp_path / "initial.pkg"
    pkg.write_bytes(make_package(mlp_model_dir))
    settings = load_settings(device_config(tmp_path, initial_package=pkg))
    server = EdgeServer(settings, only="data")
    server.start()
    try:
        with grpc.insecure_channel(server.local_address) as channel:
            yield local_data_pb2_grpc.LocalDataStub(channel)
    finally:
        server.stop(grace=0)


def append_request(x: np.ndarray, y: np.ndarray) -> local_data_pb2.AppendRequest:
    return local_data_pb2.AppendRequest(
        x=codec.tensor_to_proto("x", x), y=codec.tensor_to_proto("y", y)
    )


def test_service_append_stats_clear(data_stub: local_data_pb2_grpc.LocalDataStub) -> None:
    reply = data_stub.Append(append_request(*batch(0, 12)))
    assert (reply.accepted, reply.evicted, reply.total) == (12, 0, 12)
    stats = data_stub.Stats(local_data_pb2.StatsRequest())
    assert stats.count == 12 and stats.capacity == 5000
    assert list(stats.input_shape) == [64]
    assert dict(stats.label_counts) == {k: (2 if k < 2 else 1) for k in range(10)}
    assert stats.eviction_policy == "oldest-first"
    assert data_stub.Clear(local_data_pb2.ClearRequest()).removed == 12
    assert data_stub.Stats(local_data_pb2.StatsRequest()).count == 0


def test_service_rejects_bad_samples(data_stub: local_data_pb2_grpc.LocalDataStub) -> None:
    x, y = batch(0, 2)
    cases = [
        (append_request(x[:, :10], y), "shape"),
        (append_request(x, np.array([3, 11], np.int32)), "labels must lie"),
        (local_data_pb2.AppendRequest(x=codec.tensor_to_proto("x", x)), "x and y are required"),
    ]
    broken = append_request(x, y)
    broken.x.data = broken.x.data[:-4]
    cases.append((broken, "bytes do not match"))
    for request, problem in cases:
        with pytest.raises(grpc.RpcError) as info:
            data_stub.Append(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert problem in (info.value.details() or "")
    assert data_stub.Stats(local_data_pb2.StatsRequest()).count == 0
