"""Stable addresses for a fleet (#20.4): `cloud init` writes fixed, documented ports, and
`cloud up` refuses a port 0 that would move the broker or SuperLink at every restart
when devices elsewhere are configured to reach them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cloud import config as cloud_config
from cloud.ports import (
    DEFAULT_BROKER_PORT,
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_WEB_PORT,
    ephemeral_port_problems,
)

EDGEFL = str(Path(sys.executable).parent / "edgefl")


def _init(tmp_path: Path, model_dir: Path, *extra: str) -> Path:
    res = subprocess.run(
        [EDGEFL, "cloud", "init", "--dir", str(tmp_path), "--model-dir", str(model_dir), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    return tmp_path / "cloud.toml"


def test_cloud_init_writes_fixed_ports(tmp_path: Path, mlp_model_dir: Path) -> None:
    s = cloud_config.load(_init(tmp_path / "a", mlp_model_dir))
    assert (
        (s.broker.port, s.superlink.port, s.web.port)
        == (
            DEFAULT_BROKER_PORT,
            DEFAULT_SUPERLINK_PORT,
            DEFAULT_WEB_PORT,
        )
        == (1883, 9092, 8080)
    )
    s = cloud_config.load(
        _init(tmp_path / "b", mlp_model_dir, "--broker-port", "11883", "--web-port", "18080")
    )
    assert (s.broker.port, s.superlink.port, s.web.port) == (11883, 9092, 18080)


def test_cloud_up_refuses_port_0_when_devices_are_elsewhere(
    tmp_path: Path, mlp_model_dir: Path
) -> None:
    conf = _init(tmp_path, mlp_model_dir)
    s = cloud_config.load(conf)
    s.broker.host = s.superlink.host = "0.0.0.0"
    s.broker.port = 0
    conf.write_text(cloud_config.to_toml(s))
    res = subprocess.run(
        [EDGEFL, "cloud", "up", "--no-run", "--config", str(conf)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    assert "broker.port = 0 picks a new port at every start" in res.stderr
    assert "the broker listens on 0.0.0.0" in res.stderr
    assert "superlink.port" not in res.stderr  # 9092 is fixed
    assert (
        not (s.data_dir / "cloud.lock").exists()
        or "pid" not in (s.data_dir / "cloud.lock").read_text()
    )


def test_port_0_on_loopback_stays_allowed_for_tests_and_the_demo(
    tmp_path: Path, mlp_model_dir: Path
) -> None:
    s = cloud_config.load(_init(tmp_path, mlp_model_dir))
    s.broker.port = s.superlink.port = 0
    assert ephemeral_port_problems(s) == []
    s.superlink.host = "192.0.2.10"
    assert [p.split(" = ")[0] for p in ephemeral_port_problems(s)] == [
        "broker.port",
        "superlink.port",
    ]
