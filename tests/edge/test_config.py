"""Settings: TOML + EDGEFL_* overrides, defaults, and every error reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

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
