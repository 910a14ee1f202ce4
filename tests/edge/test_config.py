"""Settings: TOML + EDGEFL_* overrides, defaults, and every error reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge import config as edge_config
from edge.config import DEFAULT_MAX_MESSAGE_BYTES, ConfigError, load_settings
from tests.edge.helpers import write_config


def test_defaults_without_a_file() -> None:
    s = load_settings(None, env={})
    assert (s.grpc.host, s.grpc.port, s.grpc.max_batch) == ("127.0.0.1", 0, 256)
    assert s.grpc.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES == 4 * 1024 * 1024
    assert s.grpc.serving_threads == 2 and (s.data.capacity, s.data.max_mb) == (5000, 0)
    assert (s.litert.threads, s.litert.delegate) == (1, "xnnpack")
    assert s.model.name == "digits" and s.model.initial_package is None
    assert s.training.learning_rate is None and s.training.batch is None
    assert s.mqtt is None and s.device.id  # the host name


def test_file_values_relative_paths_and_env_overrides(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "edge.toml",
        {
            "device": {"id": "pi-1", "fleet": "north", "data_dir": "state"},
            "grpc": {"port": 50051, "serving_threads": 3},
            "litert": {"threads": 2, "delegate": "none"},
            "training": {"epochs": 2, "learning_rate": 1},
            "mqtt": {"host": "broker.local", "password_file": "secret"},
            "trust": {"signing_public_key": "/etc/edgefl/release.pub"},
            "model": {"initial_package": "v1.pkg"},
        },
    )
    s = load_settings(
        path, env={"EDGEFL_GRPC_PORT": "0", "EDGEFL_MQTT_PORT": "8883", "EDGEFL_TEST_X": "1"}
    )
    assert s.device.data_dir == tmp_path / "state"
    assert s.port_file == tmp_path / "state" / "grpc.port"
    assert (s.grpc.port, s.grpc.serving_threads) == (0, 3)
    assert (s.litert.threads, s.litert.delegate) == (2, "none")
    assert load_settings(path, env={"EDGEFL_LITERT_THREADS": "4"}).litert.threads == 4
    assert load_settings(path, env={"EDGEFL_DATA_MAX_MB": "512"}).data.max_mb == 512
    with pytest.raises(ConfigError, match=r"\[data\] max_mb: must be >= 0"):
        load_settings(path, env={"EDGEFL_DATA_MAX_MB": "-1"})
    assert s.training.learning_rate == 1.0 and isinstance(s.training.learning_rate, float)
    assert s.mqtt is not None and (s.mqtt.host, s.mqtt.port) == ("broker.local", 8883)
    assert s.mqtt.password_file == tmp_path / "secret"
    assert s.trust.signing_public_key == Path("/etc/edgefl/release.pub")
    assert s.model.initial_package == tmp_path / "v1.pkg"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "edge.toml",
        {
            "grpc": {"port": 70000, "max_batch": "many", "colour": "blue"},
            "litert": {"threads": 0, "delegate": "gpu"},
            "training": {"epochs": True},
            "mqtt": {"port": 1883},
            "wifi": {"ssid": "x"},
        },
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={"EDGEFL_DATA_CAPACITY": "lots", "EDGEFL_GRPC_TYPO": "1"})
    text = str(info.value)
    for problem in (
        "unknown section [wifi]",
        "[grpc] colour: unknown key",
        "[grpc] max_batch: must be int, got str",
        "[grpc] port: must be in 0..65535",
        "[litert] threads: must be in 1..64",
        "[litert] delegate: must be one of 'xnnpack', 'none' (got 'gpu')",
        "[training] epochs: must be an integer, got a boolean",
        "[mqtt] host: is required",
        "EDGEFL_DATA_CAPACITY: 'lots' is not a valid int",
        "EDGEFL_GRPC_TYPO: unknown key",
        "[trust] signing_public_key is required when [mqtt] is configured",
    ):
        assert problem in text, problem
    assert len(info.value.problems) == 11


def test_unreadable_or_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[grpc\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, env={})


BAD_EDGE_VALUES: dict[tuple[str, str], object] = {
    ("grpc", "port"): 65536,
    ("grpc", "max_batch"): 0,
    ("grpc", "max_message_bytes"): 1023,
    ("grpc", "serving_threads"): 65,
    ("grpc", "grace_s"): -1.0,
    ("grpc", "drain_delay_s"): -0.5,
    ("litert", "threads"): 0,
    ("litert", "delegate"): "gpu",
    ("training", "epochs"): -1,
    ("training", "learning_rate"): 0.0,
    ("training", "batch"): 0,
    ("training", "proximal_mu"): -0.1,
    ("training", "seed"): -1,
    ("data", "capacity"): 0,
    ("data", "max_mb"): -1,
    ("data", "holdout_fraction"): 0.6,
    ("data", "min_holdout"): 0,
    ("mqtt", "host"): "",
    ("mqtt", "port"): 0,
    ("mqtt", "keepalive"): 0,
    ("mqtt", "status_interval_s"): 0.0,
    ("trust", "min_sequence"): -1,
    ("model", "name"): "",
    ("model", "keep_versions"): 0,
    ("flower", "port"): 70000,
    ("flower", "task_timeout_s"): 0.0,
    ("metrics", "port"): -1,
}


def test_every_rule_has_a_bad_value_below() -> None:
    assert set(BAD_EDGE_VALUES) == set(edge_config.RULES)


@pytest.mark.parametrize(("section", "key"), sorted(BAD_EDGE_VALUES))
def test_every_rule_is_enforced(section: str, key: str) -> None:
    bad = BAD_EDGE_VALUES[(section, key)]
    doc: dict[str, dict[str, object]] = {section: {key: bad}}
    if section == "mqtt":  # [mqtt] needs a host and a signing key; only the bad key fails
        doc[section].setdefault("host", "broker")
        doc["trust"] = {"signing_public_key": "/k.pub"}
    with pytest.raises(ConfigError) as info:
        edge_config.SCHEMA.from_document(doc, env={})
    rule = edge_config.RULES[(section, key)]
    assert info.value.problems == [f"[{section}] {key}: {rule.message} (got {bad!r})"]


def test_unknown_keys_of_a_device_section_in_the_environment_are_errors() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={"EDGEFL_MODEL_DIR": "m", "EDGEFL_GRPC_": "1"})
    assert sorted(info.value.problems) == [
        "environment EDGEFL_GRPC_: names no key",
        "environment EDGEFL_MODEL_DIR: unknown key 'dir' in [model] "
        "(known: name, initial_package, keep_versions)",
    ]
    # The cloud's variables and the test and bootstrap switches are not the device's.
    s = load_settings(
        None, env={"EDGEFL_RUN_NUM_ROUNDS": "x", "EDGEFL_WITH_DEVICES": "1", "EDGEFL_VENV": "/v"}
    )
    assert s.grpc.port == 0


def test_paths_from_the_environment_stay_relative_to_the_working_directory(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path / "edge.toml", {"device": {"id": "d"}})
    assert load_settings(path, env={}).device.data_dir == tmp_path / "edgefl-data"
    s = load_settings(path, env={"EDGEFL_DEVICE_DATA_DIR": "rel", "EDGEFL_MODEL_INITIAL_PACKAGE": ""})
    assert s.device.data_dir == Path("rel") and s.model.initial_package is None


def test_written_settings_load_back_equal(tmp_path: Path) -> None:
    s = edge_config.Settings(
        device=edge_config.DeviceSettings(id='pi "1" \\ 🙂', data_dir=tmp_path / "data"),
        mqtt=edge_config.MqttSettings(host="b", password_file=tmp_path / "pw"),
        trust=edge_config.TrustSettings(signing_public_key=tmp_path / "k.pub"),
        training=edge_config.TrainingSettings(learning_rate=0.05),
    )
    path = edge_config.write_settings(s, tmp_path / "edge.toml", header="made here")
    assert path.read_text().startswith("# made here\n")
    assert load_settings(path, env={}) == s
