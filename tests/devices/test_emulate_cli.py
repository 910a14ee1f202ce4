"""``edgefl devices emulate``, as the README runs it: virtual devices beside a running cloud.

Without a running cloud it refuses with a hint. With ``cloud up`` running it starts real
``edgefl edge up`` devices that serve the fleet's model over KServe V2, and Ctrl-C stops
them all (exit 0, no device process left).
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from cloud.supervisor import init_cloud
from protos.kserve import grpc_predict_v2_pb2 as kpb
from protos.kserve import grpc_predict_v2_pb2_grpc as kgrpc
from tests.cloud.test_cloud_cli import Up

pytestmark = pytest.mark.slow

EDGEFL = str(Path(sys.executable).parent / "edgefl")
SERVICES = re.compile(r"^(\S+): services on (\S+), (\d+) samples$")


@pytest.fixture
def cloud(tmp_path: Path, mlp_model_dir: Path) -> Iterator[Path]:
    conf = init_cloud(tmp_path / "cloud", fleet="emu", model_dir=mlp_model_dir)
    yield conf


def _lines(stream: object) -> queue.Queue[str]:
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            out.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return out


def test_emulate_needs_a_cloud_then_serves_and_stops(cloud: Path, tmp_path: Path) -> None:
    refused = subprocess.run(
        [EDGEFL, "devices", "emulate", "--config", str(cloud), "--count", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1 and "start the cloud first" in refused.stderr

    up = Up(cloud, "--no-run")
    emulate: subprocess.Popen[str] | None = None
    try:
        up.wait_running()
        emulate = subprocess.Popen(
            [EDGEFL, "devices", "emulate", "--config", str(cloud), "--count", "1",
             "--dir", str(tmp_path / "devices")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines = _lines(emulate.stdout)
        seen: list[str] = []
        deadline = time.monotonic() + 240
        while not any("press Ctrl-C" in line for line in seen):
            assert time.monotonic() < deadline, seen
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert emulate.poll() is None, seen
        devices = [m for m in map(SERVICES.match, seen) if m]
        assert len(devices) == 1 and int(devices[0].group(3)) > 0, seen
        address = devices[0].group(2)
        with grpc.insecure_channel(address) as channel:
            stub = kgrpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(kpb.ServerLiveRequest(), timeout=30).live
        children = psutil.Process(emulate.pid).children(recursive=True)
        assert children, "no device process under devices emulate"

        emulate.send_signal(signal.SIGINT)
        assert emulate.wait(timeout=120) == 0
        _gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if emulate is not None and emulate.poll() is None:
            emulate.kill()
            emulate.wait()
        up.close()
