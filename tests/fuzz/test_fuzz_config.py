"""Fuzz the settings loaders: any file (or override) gives settings or a ConfigError.

Documents are hypothesis-built TOML (known sections and keys mixed with unknown ones,
values of every TOML type including huge integers, ``nan``/``inf``, ``~user`` paths,
control characters and nested tables), byte-level mutations of a valid file, and raw
bytes. Each goes through the real loader from a real file: :func:`edge.config.load_settings`
and :func:`cloud.config.load`. The only acceptable failure is the loader's
``ConfigError`` naming at least one problem; any other exception is a bug.

Case counts: 2 x 600 generated documents + 2 x 250 mutated files + 2 x 200 raw files
+ 300 environment overrides (≈ 2,400 cases; ~15 s on 2 cores).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import cloud.config as cloud_config
from edge import config as edge_config
from edge.errors import ConfigError as EdgeConfigError
from edge.settings import toml_value
from tests.fuzz.cases import fuzz

EDGE_SECTIONS: dict[str, list[str]] = {
    "device": ["id", "fleet", "profile", "data_dir"],
    "grpc": ["host", "port", "max_batch", "max_message_bytes", "serving_threads", "grace_s"],
    "training": ["epochs", "learning_rate", "batch", "proximal_mu", "seed"],
    "data": ["capacity"],
    "mqtt": ["host", "port", "username", "password_file", "ca_file", "keepalive"],
    "trust": ["signing_public_key"],
    "model": ["name", "initial_package", "keep_versions"],
}
CLOUD_SECTIONS: dict[str, list[str]] = {
    section.name: [
        f.name for f in dataclasses.fields(getattr(cloud_config.CloudSettings(), section.name))
    ]
    for section in dataclasses.fields(cloud_config.CloudSettings)
    if section.name != "source"
}

VALID_EDGE = """\
[device]
id = "dev-1"
fleet = "lab"
data_dir = "data"

[grpc]
port = 0
max_batch = 64
grace_s = 1.5

[training]
epochs = 2
learning_rate = 0.05

[mqtt]
host = "127.0.0.1"
port = 1883
status_interval_s = 5.0

[trust]
signing_public_key = "fleet.pub"

[model]
name = "digits"
keep_versions = 2
"""

VALID_CLOUD = """\
[cloud]
data_dir = "state"
fleet = "lab"

[broker]
managed = true
port = 0

[run]
num_rounds = 3
strategy = "fedavg"
round_timeout_s = 30.0
chunk_size = 65536
"""

# -- a small TOML writer (tables and arrays around the settings writer's scalars) -------


def _toml_key(key: str) -> str:
    return json.dumps(key)  # a quoted key is always valid TOML for printable text


def _toml_value(value: Any) -> str:
    if isinstance(value, bool | int | float | str):
        return toml_value(value)  # the settings writer's own scalars
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, RawToml):
        return value.text
    raise TypeError(type(value))


class RawToml:
    """A TOML literal written as is (dates, times)."""

    def __init__(self, text: str) -> None:
        self.text = text


def render(doc: dict[str, Any]) -> str:
    """TOML text for ``{section: {key: value} or value}``."""
    lines: list[str] = []
    for section, body in doc.items():
        if not isinstance(body, dict):
            lines.append(f"{_toml_key(section)} = {_toml_value(body)}")
    for section, body in doc.items():
        if isinstance(body, dict):
            lines.append(f"[{_toml_key(section)}]")
            lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in body.items())
    return "\n".join(lines) + "\n"


# -- strategies -------------------------------------------------------------------------

texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["", "~", "~nosuchuser-edgefl/x", "~/x", "/", "..", "a/../../b", "\x00", "lab", "0"]
    ),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=10).map(lambda s: "~" + s),
)
scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    st.sampled_from([RawToml("1979-05-27T07:32:00Z"), RawToml("1979-05-27"), RawToml("07:32:00")]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def documents(sections: dict[str, list[str]]) -> st.SearchStrategy[dict[str, Any]]:
    """Documents mixing known sections/keys with unknown ones and any values."""
    section_names = st.one_of(st.sampled_from(sorted(sections)), st.text(max_size=8))

    def body(name: str) -> st.SearchStrategy[Any]:
        keys = st.one_of(st.sampled_from(sections.get(name, ["x"])), st.text(max_size=8))
        return st.one_of(
            st.dictionaries(keys, values, max_size=6),
            values,  # a section that is not a table
        )

    return st.dictionaries(section_names, st.just(None), max_size=5).flatmap(
        lambda names: st.fixed_dictionaries({n: body(n) for n in names})
    )


def mutate(base: bytes, data: st.DataObject) -> bytes:
    """Apply a few random byte-level edits (flip, delete, insert, duplicate) to ``base``."""
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(1, 8), label="edits")):
        op = data.draw(st.sampled_from(["flip", "delete", "insert", "dup", "truncate"]))
        pos = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "delete" and buf:
            del buf[pos : pos + data.draw(st.integers(1, 16))]
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "dup":
            buf[pos:pos] = buf[pos : pos + data.draw(st.integers(1, 40))]
        elif op == "truncate":
            del buf[pos:]
    return bytes(buf)


# -- the checks -------------------------------------------------------------------------


def check_edge(text: bytes, env: dict[str, str] | None = None) -> None:
    """Load ``text`` from a real file: Settings, or ConfigError with problems; nothing else."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "edge.toml"
        path.write_bytes(text)
        try:
            result = edge_config.load_settings(path, env=env or {})
        except EdgeConfigError as exc:
            assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
            assert str(exc)
            return
        assert isinstance(result, edge_config.Settings)
        assert 0 <= result.grpc.port <= 65535 and result.grpc.max_batch >= 1
        assert result.device.id


def check_cloud(text: bytes, env: dict[str, str] | None = None) -> None:
    """Same contract for the cloud loader (its own ConfigError)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cloud.toml"
        path.write_bytes(text)
        try:
            result = cloud_config.load(path, env=env or {})
        except cloud_config.ConfigError as exc:
            assert str(exc)
            return
        assert isinstance(result, cloud_config.CloudSettings)
        assert result.run.num_rounds >= 1


def test_valid_files_load() -> None:
    """The seeds of the mutation fuzzers are themselves valid."""
    with tempfile.TemporaryDirectory() as tmp:
        edge_path = Path(tmp) / "edge.toml"
        edge_path.write_text(VALID_EDGE)
        loaded = edge_config.load_settings(edge_path, env={})
        assert loaded.mqtt is not None and loaded.mqtt.port == 1883
        cloud_path = Path(tmp) / "cloud.toml"
        cloud_path.write_text(VALID_CLOUD)
        assert cloud_config.load(cloud_path, env={}).run.num_rounds == 3


@pytest.mark.slow  # the longest fuzz runs: CI runs them, `-m "not slow"` does not
@fuzz(600)
@given(documents(EDGE_SECTIONS))
@example({"device": {"data_dir": "~nosuchuser-edgefl/data"}})
@example({"grpc": {"port": float("nan"), "grace_s": float("nan")}})
@example({"training": {"learning_rate": 2**70, "epochs": -(2**63)}})
def test_edge_generated_documents(doc: dict[str, Any]) -> None:
    check_edge(render(doc).encode("utf-8", "surrogatepass"))


@pytest.mark.slow  # the longest fuzz runs: CI runs them, `-m "not slow"` does not
@fuzz(600)
@given(documents(CLOUD_SECTIONS))
@example({"run": {"num_rounds": float("inf")}})
@example({"cloud": {"data_dir": "a\x00b"}})
def test_cloud_generated_documents(doc: dict[str, Any]) -> None:
    check_cloud(render(doc).encode("utf-8", "surrogatepass"))


@fuzz(250)
@given(st.data())
def test_edge_mutated_files(data: st.DataObject) -> None:
    check_edge(mutate(VALID_EDGE.encode(), data))


@fuzz(250)
@given(st.data())
def test_cloud_mutated_files(data: st.DataObject) -> None:
    check_cloud(mutate(VALID_CLOUD.encode(), data))


@fuzz(200)
@given(st.binary(max_size=300))
@example(b"\xff\xfe[run]\n")
def test_edge_raw_bytes(raw: bytes) -> None:
    check_edge(raw)


@fuzz(200)
@given(st.binary(max_size=300))
@example(b"\xff\xfe[run]\n")
def test_cloud_raw_bytes(raw: bytes) -> None:
    check_cloud(raw)


@fuzz(300)
@given(
    st.dictionaries(
        st.one_of(
            st.sampled_from(
                [
                    f"EDGEFL_{s.upper()}_{k.upper()}"
                    for s, keys in EDGE_SECTIONS.items()
                    for k in keys
                ]
                + ["EDGEFL_GRPC_", "EDGEFL_RUN_NUM_ROUNDS", "EDGEFL_CLOUD_DATA_DIR"]
            ),
            st.text(max_size=12).map(lambda s: "EDGEFL_" + s.upper()),
        ),
        texts,
        max_size=4,
    )
)
def test_environment_overrides(env: dict[str, str]) -> None:
    check_edge(VALID_EDGE.encode(), env)
    check_cloud(VALID_CLOUD.encode(), env)
