"""The data-dir lock: one holder, its details readable, never stale after a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud.cloud_lock import CloudLock, CloudRunningError, lock_path, running_cloud

HOLD = """
import sys, time
from pathlib import Path
from cloud.cloud_lock import CloudLock
lock = CloudLock(Path(sys.argv[1])).acquire()
lock.update(phase="running", web="http://127.0.0.1:1234")
print("held", flush=True)
time.sleep(600)
"""


def test_second_holder_is_refused_with_the_first_ones_details(tmp_path: Path) -> None:
    with CloudLock(tmp_path) as lock:
        lock.update(broker="127.0.0.1:1883", phase="running")
        info = running_cloud(tmp_path)
        assert info is not None and info.pid == os.getpid() and info.phase == "running"
        with pytest.raises(CloudRunningError, match=f"pid {os.getpid()}.*broker 127.0.0.1:1883"):
            CloudLock(tmp_path).acquire()
    assert running_cloud(tmp_path) is None
    CloudLock(tmp_path).acquire().release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        info = running_cloud(tmp_path)
        assert info is not None and info.pid == proc.pid
        assert info.urls == {"web": "http://127.0.0.1:1234"}
        with pytest.raises(CloudRunningError, match=f"pid {proc.pid}"):
            CloudLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # The file still names the dead holder, but nobody holds the lock: not running.
    assert f'"pid": {proc.pid}' in lock_path(tmp_path).read_text()
    assert running_cloud(tmp_path) is None
    lock = CloudLock(tmp_path).acquire()
    assert running_cloud(tmp_path).pid == os.getpid()  # type: ignore[union-attr]
    lock.release()


def test_no_lock_file_means_no_cloud(tmp_path: Path) -> None:
    assert running_cloud(tmp_path / "nowhere") is None
    start = time.monotonic()
    assert running_cloud(tmp_path) is None
    assert time.monotonic() - start < 60


def test_the_demo_refuses_a_data_dir_in_use_before_fresh_deletes_anything(
    tmp_path: Path, mlp_model_dir: Path
) -> None:
    from cloud.supervisor import init_cloud

    init_cloud(tmp_path, fleet="demo", model_dir=mlp_model_dir)
    data = tmp_path / "data"
    (data / "registry.db").write_bytes(b"the running cloud's registry")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(data)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        res = subprocess.run(
            [
                str(Path(sys.executable).parent / "edgefl"),
                "demo",
                "--dir",
                str(tmp_path),
                "--fresh",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert res.returncode == 1
    assert f"a cloud is already running on {data} (pid {proc.pid}" in res.stderr
    assert (data / "registry.db").read_bytes() == b"the running cloud's registry"
