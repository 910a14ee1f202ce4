"""Cloud settings, strategy selection and the cloud CLI against a real registry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx

from cloud import config as cloud_config
from cloud.aggregator import make_strategy
from cloud.registry import Registry
from cloud.releases import package_weights
from cloud.supervisor import CloudError, init_cloud
from edge.litert_model import LiteRTModel

EDGEFL = str(Path(sys.executable).parent / "edgefl")


@pytest.mark.parametrize(
    ("name", "cls"),
    [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam), ("fedmedian", FedMedian)],
)
def test_each_strategy_is_selectable(name: str, cls: type) -> None:
    s = cloud_config.from_dict({"run": {"strategy": name, "min_nodes": 2}})
    strategy = make_strategy(s)
    assert isinstance(strategy, cls)
    assert strategy.min_train_nodes == 2  # type: ignore[attr-defined]
    assert strategy.fraction_evaluate == 0.0  # type: ignore[attr-defined]
    if name == "fedprox":
        assert strategy.proximal_mu == s.run.proximal_mu  # type: ignore[attr-defined]


def test_settings_report_every_problem_at_once() -> None:
    with pytest.raises(cloud_config.ConfigError) as info:
        cloud_config.from_dict(
            {
                "run": {"strategy": "fedfoo", "num_rounds": 0, "fraction_train": 2.0, "typo": 1},
                "bogus": {},
            }
        )
    text = str(info.value)
    for expected in ("unknown section [bogus]", "unknown key run.typo"):
        assert expected in text
    with pytest.raises(cloud_config.ConfigError) as info:
        cloud_config.from_dict(
            {"run": {"strategy": "fedfoo", "num_rounds": 0, "fraction_train": 2.0}}
        )
    text = str(info.value)
    for expected in ("run.strategy", "num_rounds", "fraction_train"):
        assert expected in text


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "cloud.toml"
    conf.write_text("[run]\nnum_rounds = 4\n")
    s = cloud_config.load(conf, env={"EDGEFL_RUN_NUM_ROUNDS": "7"})
    assert s.run.num_rounds == 7
    assert s.data_dir == (tmp_path / "data").resolve()
    with pytest.raises(cloud_config.ConfigError, match="not a valid"):
        cloud_config.load(conf, env={"EDGEFL_RUN_NUM_ROUNDS": "many"})


def test_settings_round_trip_through_toml(tmp_path: Path) -> None:
    s = cloud_config.from_dict({"run": {"num_rounds": 3, "strategy": "fedprox"}}, base_dir=tmp_path)
    (tmp_path / "again.toml").write_text(cloud_config.to_toml(s))
    again = cloud_config.load(tmp_path / "again.toml")
    assert again.run == s.run and again.signing == s.signing


def test_init_writes_keys_privately_and_refuses_to_overwrite(
    tmp_path: Path, mlp_model_dir: Path
) -> None:
    conf = init_cloud(tmp_path / "c", model_dir=mlp_model_dir)
    s = cloud_config.load(conf)
    assert s.signing.private_key.stat().st_mode & 0o777 == 0o600
    assert s.web.operator_token_file.stat().st_mode & 0o777 == 0o600
    assert (s.data_dir / "initial.pkg").stat().st_size > 0
    with pytest.raises(CloudError, match="--force"):
        init_cloud(tmp_path / "c", model_dir=mlp_model_dir)


def test_model_list_shows_versions_and_the_current_one(tmp_path: Path, mlp_model_dir: Path) -> None:
    conf = init_cloud(tmp_path / "c", model_dir=mlp_model_dir)
    s = cloud_config.load(conf)
    weights = LiteRTModel.load(mlp_model_dir).get_weights()
    registry = Registry(s.registry_url)
    try:
        for rnd in range(3):
            arch, data = package_weights(
                s.model.dir, {k: v + np.float32(rnd) for k, v in weights.items()}
            )
            registry.add_version(
                package=data,
                architecture_id=arch,
                round=rnd,
                run_id=None,
                parent_version=None,
                metrics={"eval-accuracy": 0.5 + rnd / 10},
            )
        registry.set_current(2, pinned=True)
    finally:
        registry.close()
    res = subprocess.run(
        [EDGEFL, "cloud", "model", "list", "--config", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.split()[:2] == ["3", "2"] and "0.700" in line for line in lines)
    assert "current: version 2 (pinned)" in res.stdout
    # Pinning a version that does not exist fails clearly and changes nothing.
    res = subprocess.run(
        [EDGEFL, "cloud", "model", "pin", "9", "--config", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and "9" in res.stderr
