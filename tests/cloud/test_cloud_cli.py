"""``edgefl cloud up / status / model pin`` as an operator runs them, with real processes.

One cloud per data directory (a second ``cloud up`` is refused and names the first),
status that tells the truth (human by default, ``--json`` for scripts, non-zero when no
cloud runs), ``model pin`` that finds the running cloud's broker, warns during a run and
lists the versions that exist, a busy port reported in one line, Ctrl-C exits 130.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud import config as cloud_config
from cloud.cloud_lock import CloudInfo, running_cloud
from cloud.registry import Registry
from cloud.releases import package_weights
from cloud.supervisor import init_cloud
from edge.litert_model import LiteRTModel

EDGEFL = str(Path(sys.executable).parent / "edgefl")
#: Generous bound for a cloud to come up on a loaded machine.
UP_TIMEOUT_S = 120.0


def edgefl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGEFL, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def conf(tmp_path: Path, mlp_model_dir: Path) -> Path:
    return init_cloud(tmp_path / "cloud", fleet="cli", model_dir=mlp_model_dir)


class Up:
    """A background ``edgefl cloud up`` process, stopped at the end of the test."""

    def __init__(self, conf: Path, *extra: str) -> None:
        self.conf = conf
        self.data_dir = cloud_config.load(conf).data_dir
        self.proc = subprocess.Popen(
            [EDGEFL, "cloud", "up", "--config", str(conf), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_running(self) -> CloudInfo:
        deadline = time.monotonic() + UP_TIMEOUT_S
        while time.monotonic() < deadline:
            info = running_cloud(self.data_dir)
            if info is not None and info.phase == "running":
                return info
            assert self.proc.poll() is None, self.proc.communicate()
            time.sleep(0.2)
        raise AssertionError("cloud up did not come up")

    def interrupt(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=90)
        return self.proc.returncode, out, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


@pytest.fixture
def up_factory() -> Iterator[type[Up]]:
    started: list[Up] = []

    class Tracked(Up):
        def __init__(self, conf: Path, *extra: str) -> None:
            super().__init__(conf, *extra)
            started.append(self)

    yield Tracked
    for up in reversed(started):
        up.close()


def _add_version(conf: Path, mlp_model_dir: Path) -> None:
    """A stored version and a running run, as the aggregator leaves them mid-run."""
    s = cloud_config.load(conf)
    registry = Registry(s.registry_url)
    try:
        run_id = registry.start_run(num_rounds=3, strategy="fedavg", config={})
        arch, data = package_weights(s.model.dir, LiteRTModel.load(mlp_model_dir).get_weights())
        registry.add_version(
            package=data,
            architecture_id=arch,
            round=0,
            run_id=run_id,
            parent_version=None,
            metrics={},
        )
    finally:
        registry.close()


@pytest.mark.slow
def test_one_cloud_per_data_dir_status_and_pin_find_it(
    conf: Path, mlp_model_dir: Path, up_factory: type[Up]
) -> None:
    # No cloud yet: status says so and fails, instead of showing an old fleet as online.
    res = edgefl("cloud", "status", "--config", str(conf))
    assert res.returncode == 1
    assert "no cloud is running" in res.stderr and "online" not in res.stdout

    first = up_factory(conf, "--no-run")
    info = first.wait_running()
    assert info.pid == first.proc.pid and set(info.urls) == {"broker", "superlink", "fleet", "web"}

    # A second `cloud up` on the same data dir refuses at once, naming the running cloud.
    second = edgefl("cloud", "up", "--no-run", "--config", str(conf), timeout=60)
    assert second.returncode == 1
    assert f"pid {first.proc.pid}" in second.stderr and info.urls["web"] in second.stderr
    assert second.stderr.count("\n") == 1, second.stderr

    # Human status by default, JSON only when asked.
    res = edgefl("cloud", "status", "--config", str(conf))
    assert res.returncode == 0, res.stderr
    assert f"cloud running (pid {first.proc.pid}" in res.stdout
    assert info.urls["web"] in res.stdout and "{" not in res.stdout
    assert "no run yet" in res.stdout
    res = edgefl("cloud", "status", "--json", "--config", str(conf))
    doc = json.loads(res.stdout)
    assert doc["running"] is True and doc["cloud"]["pid"] == first.proc.pid
    assert doc["overview"]["fleet"] == "cli"

    # An unknown version lists what exists; a pin during a run warns it will be superseded.
    _add_version(conf, mlp_model_dir)
    res = edgefl("cloud", "model", "pin", "99", "--config", str(conf))
    assert res.returncode == 1 and "no version 99; stored versions: 1" in res.stderr
    # cloud.toml says port 0: the pin must use the running cloud's broker, not port 0.
    res = edgefl("cloud", "model", "pin", "1", "--config", str(conf))
    assert res.returncode == 0, res.stderr
    assert "version 1 pinned" in res.stdout
    assert "run 1 is in progress" in res.stderr and "supersedes this pin" in res.stderr
    res = edgefl("cloud", "status", "--config", str(conf))
    assert "fleet target v1 (pinned)" in res.stdout

    # Ctrl-C: exit code 130, and the data dir is free again.
    code, _out, _err = first.interrupt()
    assert code == 130
    assert running_cloud(first.data_dir) is None
    res = edgefl("cloud", "status", "--config", str(conf))
    assert res.returncode == 1 and "no cloud is running" in res.stderr
    res = edgefl("cloud", "model", "pin", "1", "--config", str(conf))
    assert res.returncode == 1 and "no cloud is running" in res.stderr


def test_a_busy_port_is_one_line_naming_the_port_and_its_holder(conf: Path, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        s = cloud_config.load(conf)
        s.broker.port = port
        conf.write_text(cloud_config.to_toml(s))
        res = edgefl("cloud", "up", "--no-run", "--config", str(conf), timeout=120)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert f"127.0.0.1:{port} is already in use" in lines[0]
    assert "python" in lines[0] and "pid" in lines[0]
    assert running_cloud(s.data_dir) is None


def test_a_broker_that_cannot_bind_fails_in_one_line(tmp_path: Path) -> None:
    """Past `cloud up`'s own check (a port taken in between): Mosquitto's error, one line."""
    from cloud.broker import Broker, BrokerConfig, BrokerError

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        with pytest.raises(BrokerError) as caught:
            Broker(BrokerConfig(port=port, data_dir=tmp_path / "b")).start(timeout=30)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith("mosquitto did not start:") and "mosquitto.log" in message
