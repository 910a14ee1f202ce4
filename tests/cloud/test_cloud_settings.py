"""Cloud settings, strategy selection and the cloud CLI against a real registry."""

from __future__ import annotations

import dataclasses
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
                "web": {"port": "8080"},
                "bogus": {},
            },
            env={"EDGEFL_RUN_SEED": "x"},
        )
    problems = info.value.problems
    for expected in (
        "unknown section [bogus]",
        "[run] typo: unknown key",
        "[web] port: must be int, got str",
        "environment EDGEFL_RUN_SEED: 'x' is not a valid int",
        "[run] strategy: must be one of 'fedavg', 'fedprox', 'fedadam', 'fedmedian'",
        "[run] num_rounds: must be >= 1 (got 0)",
        "[run] fraction_train: must be in (0, 1] (got 2.0)",
    ):
        assert any(p.startswith(expected) for p in problems), expected
    assert len(problems) == 7
    assert str(info.value).startswith("invalid cloud settings:\n  - ")


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "cloud.toml"
    conf.write_text("[run]\nnum_rounds = 4\n")
    s = cloud_config.load(conf, env={"EDGEFL_RUN_NUM_ROUNDS": "7"})
    assert s.run.num_rounds == 7
    assert s.data_dir == (tmp_path / "data").resolve()
    assert cloud_config.load(conf, env={"EDGEFL_PROXY_ENABLED": "off"}).proxy.enabled is False
    with pytest.raises(cloud_config.ConfigError, match="not a valid"):
        cloud_config.load(conf, env={"EDGEFL_RUN_NUM_ROUNDS": "many"})


def test_unknown_edgefl_variables_of_a_cloud_section_are_errors(tmp_path: Path) -> None:
    """A typo in an operator's environment used to do nothing at all (#14)."""
    conf = tmp_path / "cloud.toml"
    conf.write_text("[run]\nnum_rounds = 4\n")
    with pytest.raises(cloud_config.ConfigError) as info:
        cloud_config.load(
            conf, env={"EDGEFL_RUN_NUM_ROUDNS": "7", "EDGEFL_WEB_": "1", "EDGEFL_MODEL_NAME": "x"}
        )
    assert sorted(info.value.problems) == [
        "environment EDGEFL_MODEL_NAME: unknown key 'name' in [model] (known: dir)",
        "environment EDGEFL_RUN_NUM_ROUDNS: unknown key 'num_roudns' in [run] (known: "
        + ", ".join(f.name for f in dataclasses.fields(cloud_config.RunSection))
        + ")",
        "environment EDGEFL_WEB_: names no key",
    ]
    # Variables of the device side, the test tools and bootstrap are not the cloud's.
    s = cloud_config.load(
        conf,
        env={
            "EDGEFL_DEVICE_DATA_DIR": "/x",
            "EDGEFL_GRPC_PORT": "0",
            "EDGEFL_WITH_BROWSER": "1",
            "EDGEFL_TEST_MODEL_CACHE": "0",
            "EDGEFL_VENV": "/v",
        },
    )
    assert s.run.num_rounds == 4


def test_relative_paths_resolve_as_the_docstring_says(tmp_path: Path) -> None:
    """data_dir next to the file; every other relative path under data_dir (#14)."""
    assert "every other relative path" in (cloud_config.__doc__ or "")
    conf = tmp_path / "conf" / "cloud.toml"
    conf.parent.mkdir()
    conf.write_text(
        '[cloud]\ndata_dir = "state"\n[model]\ndir = "model"\n'
        '[signing]\npublic_key = "/etc/fleet/signing.pub"\n'
    )
    s = cloud_config.load(conf, env={"EDGEFL_WEB_OPERATOR_TOKEN_FILE": "token"})
    data = (tmp_path / "conf" / "state").resolve()
    assert s.data_dir == data
    assert s.model.dir == data / "model"
    assert s.signing.private_key == data / "keys" / "signing.pem"  # a default
    assert s.signing.public_key == Path("/etc/fleet/signing.pub")
    assert s.web.operator_token_file == data / "token"  # from the environment
    assert s.broker.ca_file is None
    # Without a file, nothing is anchored.
    assert cloud_config.from_dict({"model": {"dir": "m"}}, env={}).model.dir == Path("m")


@pytest.mark.parametrize("key", sorted(k for s, k in cloud_config.RULES))
def test_every_rule_is_enforced(key: str) -> None:
    (section, _), rule = next(((s, k), r) for (s, k), r in cloud_config.RULES.items() if k == key)
    with pytest.raises(cloud_config.ConfigError) as info:
        cloud_config.from_dict({section: {key: BAD_CLOUD_VALUES[(section, key)]}}, env={})
    assert info.value.problems == [
        f"[{section}] {key}: {rule.message} (got {BAD_CLOUD_VALUES[(section, key)]!r})"
    ]


BAD_CLOUD_VALUES: dict[tuple[str, str], object] = {
    ("superlink", "port"): 65536,
    ("proxy", "superlink_port"): -1,
    ("proxy", "max_body_mb"): 0,
    ("broker", "port"): 70000,
    ("web", "port"): -5,
    ("run", "num_rounds"): 0,
    ("run", "strategy"): "fedsgd",
    ("run", "fraction_train"): 0.0,
    ("run", "min_nodes"): 0,
    ("run", "round_timeout_s"): 0.0,
    ("run", "release_wait_s"): -1.0,
    ("run", "chunk_size"): 1023,
    ("run", "evaluation"): "mnist",
}


def test_every_rule_has_a_bad_value_above() -> None:
    assert set(BAD_CLOUD_VALUES) == set(cloud_config.RULES)


def test_checks_across_keys() -> None:
    with pytest.raises(cloud_config.ConfigError) as info:
        cloud_config.from_dict(
            {
                "cloud": {"fleet": "lab#1"},
                "superlink": {"host": "0.0.0.0", "supernode_auth": True},
                "proxy": {"enabled": False},
            },
            env={},
        )
    text = str(info.value)
    assert "Control API" in text and "supernode_auth needs TLS" in text and "cloud.fleet" in text
    assert len(info.value.problems) == 3


def test_settings_round_trip_through_toml(tmp_path: Path) -> None:
    s = cloud_config.from_dict(
        {"run": {"num_rounds": 3, "strategy": "fedprox"}, "cloud": {"fleet": "lab-1"}},
        base_dir=tmp_path,
        env={},
    )
    s.broker.username = 'odd "name" \\ é 🙂'
    (tmp_path / "again.toml").write_text(cloud_config.to_toml(s))
    again = cloud_config.load(tmp_path / "again.toml", env={})
    again.source = None
    assert again == s


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
