"""LocalData writes/clear and Trainer.Fit are reachable only by the device's own user.

Played as an attacker against a real device server: another OS user (``nobody``,
via ``setpriv``; the tests run as root) on the same machine, and a plain TCP client
on the gRPC port, each try to clear the samples and run training. Both are refused
and the samples stay. The device's data dir sits on a path every user can traverse,
so the refusal comes from the socket's own directory (mode 0700), not from the test's
temporary directory.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from edge.config import load_settings
from edge.server import BindError, EdgeServer
from protos import codec
from protos.edgefl.v1 import local_data_pb2, local_data_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from tests.edge.helpers import device_config, make_package, model_weights

NOBODY = 65534
ATTACK = r"""
import sys, grpc
from protos.edgefl.v1 import local_data_pb2, local_data_pb2_grpc
from protos.kserve import grpc_predict_v2_pb2 as kpb, grpc_predict_v2_pb2_grpc as kgrpc
local, tcp = sys.argv[1], sys.argv[2]
with grpc.insecure_channel(tcp) as ch:  # inference is open to anyone who reaches the port
    print("tcp-live", kgrpc.GRPCInferenceServiceStub(ch).ServerLive(kpb.ServerLiveRequest(), timeout=20).live)
with grpc.insecure_channel(local) as ch:
    try:
        local_data_pb2_grpc.LocalDataStub(ch).Clear(local_data_pb2.ClearRequest(), timeout=10)
        print("clear-accepted")
    except grpc.RpcError as exc:
        print("clear-refused", exc.code().name, exc.details())
try:
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.connect(local.removeprefix("unix:"))
    print("connect-accepted")
except OSError as exc:
    print("connect-refused", type(exc).__name__)
"""

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="playing another OS user needs root and setpriv",
)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (unlike pytest's 0700 temporary directory)."""
    path = Path(tempfile.mkdtemp(prefix="edgefl-uds-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(open_dir: Path, mlp_model_dir: Path) -> Iterator[EdgeServer]:
    pkg = open_dir / "initial.pkg"
    pkg.write_bytes(make_package(mlp_model_dir))
    settings = load_settings(device_config(open_dir, initial_package=pkg, grpc={"host": "0.0.0.0"}))
    settings.device.data_dir.mkdir(parents=True, exist_ok=True)
    settings.device.data_dir.chmod(0o755)
    srv = EdgeServer(settings)
    srv.start()
    x = np.random.default_rng(0).uniform(0, 16, (40, 64)).astype(np.float32)
    srv.node.data.append(x, np.arange(40, dtype=np.int32) % 10)
    try:
        yield srv
    finally:
        srv.stop(grace=0)


def test_the_socket_and_its_directory_are_owner_only(server: EdgeServer) -> None:
    sock = server.settings.local_socket
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700


@needs_root
def test_another_os_user_cannot_clear_the_samples(server: EdgeServer) -> None:
    tcp = f"127.0.0.1:{server.port}"
    # Control: the path is traversable for nobody (it can read the port file next to it).
    peek = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "cat", str(server.settings.port_file)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert peek.returncode == 0 and peek.stdout.strip() == str(server.port), peek.stderr
    res = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", ATTACK, server.local_address, tcp],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "HOME": "/tmp"},
    )  # fmt: skip
    out = res.stdout
    assert res.returncode == 0, res.stderr
    assert "tcp-live True" in out  # the attacker runs real gRPC clients
    assert "clear-refused UNAVAILABLE" in out, out
    assert "connect-refused PermissionError" in out, out
    assert len(server.node.data) == 40  # nothing lost


def test_a_tcp_client_reaches_neither_local_data_nor_the_trainer(
    server: EdgeServer, mlp_model_dir: Path
) -> None:
    # Bound to every interface: still only inference, health and reflection over TCP.
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            local_data_pb2_grpc.LocalDataStub(channel).Clear(
                local_data_pb2.ClearRequest(), timeout=30
            )
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as info:
            trainer_pb2_grpc.TrainerStub(channel).Fit(
                trainer_pb2.FitRequest(
                    weights=codec.tensors_to_proto(model_weights(mlp_model_dir))
                ),
                timeout=30,
            )
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert len(server.node.data) == 40
    # The device's own user does reach them, over the socket.
    with grpc.insecure_channel(server.local_address) as local:
        stats = local_data_pb2_grpc.LocalDataStub(local).Stats(
            local_data_pb2.StatsRequest(), timeout=30
        )
    assert stats.count == 40


def test_a_socket_directory_of_another_user_is_refused_at_start(
    open_dir: Path, mlp_model_dir: Path
) -> None:
    settings = load_settings(device_config(open_dir))
    run_dir = settings.local_socket.parent
    run_dir.mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(run_dir, NOBODY, NOBODY)
    else:  # not root: a file where the directory should be is refused the same way
        run_dir.rmdir()
        run_dir.write_text("not a directory")
    srv = EdgeServer(settings)
    with pytest.raises(BindError, match="not a directory owned by this user"):
        srv.start()
    srv.stop(grace=0)


def test_a_stale_socket_of_a_killed_server_does_not_block_the_next_start(
    open_dir: Path,
) -> None:
    settings = load_settings(device_config(open_dir))
    settings.local_socket.parent.mkdir(parents=True, mode=0o700)
    settings.local_socket.write_text("left behind")
    srv = EdgeServer(settings)
    srv.start()
    try:
        assert stat.S_ISSOCK(settings.local_socket.stat().st_mode)
    finally:
        srv.stop(grace=0)
