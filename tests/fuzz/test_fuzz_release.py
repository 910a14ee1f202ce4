"""Fuzz the device agent with release manifests and chunks, as bytes from the network.

The device is real: an :class:`~edge.node.EdgeNode` serving the digits MLP as version
1 from a real on-disk store, behind a real :class:`~edge.agent.Agent` whose MQTT client
talks to a real Mosquitto. During the fuzz phase hypothesis feeds
``Agent._handle_message(topic, payload)`` directly: it is the one function the agent's
worker runs for every message it receives, and calling it from the test makes an
escaping exception fail the example (the worker itself would log and swallow it).
After the fuzz phase the agent is started for real and the cloud's
:class:`~cloud.publisher.Publisher` pushes a genuine release over the broker; the
device must install it.

Inputs: random bytes on the manifest and chunk topics (and on odd topics), byte-level
mutations of a genuine signed manifest, and manifests built field by field, signed
with the fleet key or with an outsider's key, announcing wrong digests, huge sizes,
huge versions, up to 65,536 chunks, followed by their chunks whole, partial,
duplicated, out of range, or carrying random, truncated or mutated packages (broken
flatbuffer, card, weights). After every example the device serves the version it
served before (or, only for a fleet-signed manifest whose chunks all arrived intact,
that manifest's version) and answers an inference with that version's exact output.

Case counts: 700 random messages + 500 mutated manifests + 600 built manifests with
their chunks (≈ 1,800 cases; ~45 s on 2 shared cores).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import event, example, given
from hypothesis import strategies as st

from cloud.broker import Broker
from cloud.publisher import Publisher
from edge.agent import Agent, AgentSettings
from edge.config import load_settings
from edge.errors import InstallError
from edge.litert_model import LiteRTModel
from edge.model_card import ModelCard
from edge.node import EdgeNode
from protos import codec, signing, topics
from tests.edge.helpers import device_config, make_package, model_weights, perturbed
from tests.fuzz.cases import fuzz

FLEET = "fuzz"
DEVICE = "fuzz-device"
WAIT_S = 30.0
FEATURES = 64


@dataclass
class Rig:
    """A device (node + agent, not started yet) and what the test knows about it."""

    node: EdgeNode
    agent: Agent
    broker: Broker
    key: Ed25519PrivateKey
    model_dir: Path
    probe: np.ndarray
    expected: dict[int, np.ndarray] = field(default_factory=dict)
    sequence: int = 0

    def next_sequence(self) -> int:
        """Sequences for manifests the test signs: small, so the Publisher's are newer."""
        self.sequence += 1
        return self.sequence

    def feed(self, topic: str, payload: bytes) -> None:
        """Hand one network message to the agent exactly as its worker would."""
        self.agent._handle_message(topic, payload)

    def assert_serving(self, version: int) -> None:
        """``version`` serves and gives its own exact output for the probe batch."""
        assert self.node.serving_version() == version
        served, probs = self.node.serving.infer(self.probe)
        assert served == version
        np.testing.assert_array_equal(probs, self.expected[version])


def expected_output(model_dir: Path, weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    model = LiteRTModel.load(model_dir)
    model.set_weights(weights)
    return model.infer(x)


@pytest.fixture
def rig(tmp_path: Path, broker: Broker, mlp_model_dir: Path) -> Iterator[Rig]:
    key = signing.generate_private_key()
    public = tmp_path / "fleet.pub"
    signing.write_public_key(key.public_key(), public)
    package = tmp_path / "v1.pkg"
    package.write_bytes(make_package(mlp_model_dir))
    node = EdgeNode(load_settings(device_config(tmp_path, initial_package=package), env={}))
    node.start()
    agent = Agent(
        AgentSettings(
            device_id=DEVICE,
            fleet=FLEET,
            host=broker.host,
            port=broker.port,
            signing_public_key=public,
            status_interval_s=1.0,
            reconnect_min_s=0.2,
            reconnect_max_s=2.0,
        ),
        node,
    )
    probe = np.random.default_rng(5).uniform(0, 16, (4, FEATURES)).astype(np.float32)
    rig = Rig(node, agent, broker, key, mlp_model_dir, probe)
    rig.expected[1] = expected_output(mlp_model_dir, model_weights(mlp_model_dir), probe)
    rig.assert_serving(1)
    try:
        yield rig
    finally:
        agent.stop()


def genuine_release_installs(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Start the agent for real; a release pushed by the Publisher over the broker installs.

    Also checks that no install failure was anything but a clean InstallError.
    """
    for record in caplog.records:
        if record.name == "edge.agent" and record.exc_info:
            exc = record.exc_info[1]
            assert isinstance(exc, InstallError), f"{type(exc).__name__}: {exc}"
        assert "unexpected error" not in record.getMessage()
    before = rig.node.serving_version()
    version = before + 1
    weights = perturbed(model_weights(rig.model_dir), seed=version)
    rig.expected[version] = expected_output(rig.model_dir, weights, rig.probe)
    rig.agent.start()
    assert rig.agent.wait_connected(WAIT_S)
    with Publisher(
        host=rig.broker.host,
        port=rig.broker.port,
        fleet=FLEET,
        signing_key=rig.key,
        chunk_size=16 * 1024,
        timeout_s=WAIT_S,
    ) as publisher:
        publisher.publish_release(
            version=version,
            parent_version=before,
            round=version,
            package=make_package(rig.model_dir, weights),
            architecture_id=ModelCard.load(rig.model_dir / "card.json").architecture_id,
        )
    deadline = time.monotonic() + WAIT_S
    while rig.node.serving_version() != version and time.monotonic() < deadline:
        time.sleep(0.1)
    rig.assert_serving(version)
    current = rig.node.store.current()
    assert current is not None and current.version == version
    assert rig.node.status().last_error == ""


def genuine_manifest(rig: Rig, version: int, package: bytes, chunk_size: int) -> codec.Manifest:
    chunks = codec.split_chunks(package, chunk_size)
    return signing.sign_manifest(
        codec.Manifest(
            fleet=FLEET,
            version=version,
            parent_version=version - 1,
            round=version,
            created_at_ms=1_700_000_000_000,
            architecture_id="mlp",
            artifact_sha256=codec.sha256_hex(package),
            artifact_size=len(package),
            chunk_size=chunk_size,
            chunk_sha256=tuple(codec.sha256_hex(c) for c in chunks),
            sequence=rig.next_sequence(),
        ),
        rig.key,
    )


# -- 1: random bytes on every topic the agent may receive ---------------------------------

topic_strategy = st.one_of(
    st.just(topics.release_manifest(FLEET)),
    st.builds(
        topics.release_chunk,
        st.just(FLEET),
        st.integers(1, 3) | st.integers(1, 2**62),
        st.integers(0, 8) | st.integers(0, 2**62),
    ),
    st.sampled_from(
        [
            topics.release_manifest("other"),
            f"edgefl/{FLEET}/release/2/chunk/-1",
            f"edgefl/{FLEET}/release/0/chunk/0",
            f"edgefl/{FLEET}/release/x/chunk/0",
            f"edgefl/{FLEET}/device/{DEVICE}/status",
            f"edgefl/{FLEET}/release",
            "edgefl//release/manifest",
            "",
            "#",
        ]
    ),
    st.text(max_size=40),
)


@fuzz(700)
@given(st.lists(st.tuples(topic_strategy, st.binary(max_size=2048)), min_size=1, max_size=4))
@example([(topics.release_manifest(FLEET), b"")])
@example([(topics.release_manifest(FLEET), b"\x0a\xff\xff\xff\xff\x0f")])
def test_random_bytes(
    rig: Rig, caplog: pytest.LogCaptureFixture, messages: list[tuple[str, bytes]]
) -> None:
    for topic, payload in messages:
        rig.feed(topic, payload)
    rig.assert_serving(1)


def test_random_bytes_then_genuine_release(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """A short burst of garbage, then the real path still installs a release."""
    rng = np.random.default_rng(11)
    for i in range(200):
        topic = topics.release_manifest(FLEET) if i % 2 else topics.release_chunk(FLEET, 2, i % 5)
        rig.feed(topic, rng.bytes(int(rng.integers(0, 600))))
    rig.assert_serving(1)
    genuine_release_installs(rig, caplog)


# -- 2: mutations of a genuine signed manifest --------------------------------------------


def mutate(base: bytes, data: st.DataObject) -> bytes:
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(1, 6), label="edits")):
        op = data.draw(st.sampled_from(["flip", "set", "delete", "insert", "dup", "truncate"]))
        pos = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[pos] = data.draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]))
        elif op == "delete" and buf:
            del buf[pos : pos + data.draw(st.integers(1, 16))]
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=12))
        elif op == "dup":
            buf[pos:pos] = buf[pos : pos + data.draw(st.integers(1, 64))]
        elif op == "truncate":
            del buf[pos:]
    return bytes(buf)


@pytest.mark.slow  # the longest fuzz runs: CI runs them, `-m "not slow"` does not
@fuzz(500)
@given(st.data())
def test_mutated_genuine_manifests(
    rig: Rig, caplog: pytest.LogCaptureFixture, data: st.DataObject
) -> None:
    package = make_package(rig.model_dir, perturbed(model_weights(rig.model_dir), seed=2))
    if not hasattr(rig, "_manifest"):
        manifest = genuine_manifest(rig, 2, package, 8 * 1024)
        rig._manifest = codec.manifest_to_bytes(manifest)  # type: ignore[attr-defined]
    before = rig.node.serving_version()
    mutated = mutate(rig._manifest, data)  # type: ignore[attr-defined]
    rig.feed(topics.release_manifest(FLEET), mutated)
    # Chunks of the genuine package follow, as they would on the broker.
    for i, chunk in enumerate(codec.split_chunks(package, 8 * 1024)):
        if data.draw(st.booleans(), label=f"send chunk {i}"):
            rig.feed(topics.release_chunk(FLEET, 2, i), chunk)
    version = rig.node.serving_version()
    if version != before or version == 2:
        # A mutation the signature does not cover (an unknown field, a varint spelled
        # longer) may pass, now or completed by chunks of a later example; then the
        # device must hold exactly the genuine release 2, byte for byte. (The install
        # may also finish after this example's read, so an example can start at 2.)
        assert version == 2
        current = rig.node.store.current()
        assert current is not None and current.data == package
        rig.expected.setdefault(
            2,
            expected_output(
                rig.model_dir, perturbed(model_weights(rig.model_dir), seed=2), rig.probe
            ),
        )
    rig.assert_serving(version)


def test_mutated_manifests_then_genuine_release(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    package = make_package(rig.model_dir)
    base = codec.manifest_to_bytes(genuine_manifest(rig, 2, package, 8 * 1024))
    rng = np.random.default_rng(3)
    for _ in range(200):
        buf = bytearray(base)
        for _ in range(int(rng.integers(1, 4))):
            buf[int(rng.integers(0, len(buf)))] ^= 1 << int(rng.integers(0, 8))
        rig.feed(topics.release_manifest(FLEET), bytes(buf))
    rig.assert_serving(1)
    genuine_release_installs(rig, caplog)


# -- 3: manifests built field by field, signed, followed by their chunks -------------------

hex64 = st.binary(min_size=32, max_size=32).map(bytes.hex)


@st.composite
def artifacts(draw: st.DrawFn, model_dir: Path) -> bytes:
    """Release artifacts that must not install: garbage, truncated or damaged packages."""
    card_json = (model_dir / "card.json").read_text()
    tflite = (model_dir / "model.tflite").read_bytes()
    weights = model_weights(model_dir)
    kind = draw(
        st.sampled_from(
            ["random", "truncated", "tflite", "tflite_cut", "card", "weights", "arch", "empty"]
        )
    )
    card = ModelCard.from_json(card_json)
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=3000))
    if kind == "truncated":
        full = make_package(model_dir)
        return full[: draw(st.integers(1, len(full) - 1))]
    if kind in ("tflite", "tflite_cut"):
        buf = bytearray(tflite)
        if kind == "tflite_cut":
            del buf[draw(st.integers(0, len(buf) - 1)) :]
        for _ in range(draw(st.integers(1, 8))):
            if buf:
                pos = draw(st.integers(0, min(len(buf) - 1, 4096)))
                buf[pos] = draw(st.integers(0, 255))
        pkg = codec.ModelPackage(card.architecture_id, bytes(buf), card_json, weights)
        return codec.package_to_bytes(pkg)
    if kind == "card":
        broken = draw(
            st.sampled_from(
                ["", "{}", "[]", "null", card_json[:-10], card_json.replace("64", "65")]
            )
        )
        return codec.package_to_bytes(
            codec.ModelPackage(card.architecture_id, tflite, broken, weights)
        )
    if kind == "weights":
        name = draw(st.sampled_from(sorted(weights)))
        damaged = dict(weights)
        choice = draw(st.sampled_from(["drop", "shape", "extra"]))
        if choice == "drop":
            del damaged[name]
        elif choice == "shape":
            damaged[name] = np.zeros((3, 3), np.float32)
        else:
            damaged["extra"] = np.zeros(2, np.float32)
        return codec.package_to_bytes(
            codec.ModelPackage(card.architecture_id, tflite, card_json, damaged)
        )
    if kind == "arch":
        return codec.package_to_bytes(codec.ModelPackage("other-arch", tflite, card_json, weights))
    return codec.package_to_bytes(codec.ModelPackage("", b"", "", {}))


MANIFEST_FAULTS = [
    "fleet",
    "version",
    "parent",
    "round",
    "created",
    "arch",
    "artifact_sha",
    "size",
    "chunk_digests",
    "chunk_size",
    "sequence",
    "signer",
    "forged",
    "metrics",
]
CHUNK_FAULTS = ["random", "empty", "beyond", "dup", "missing", "other_version"]


@pytest.mark.slow  # the longest fuzz runs: CI runs them, `-m "not slow"` does not
@fuzz(600)
@given(st.data())
def test_signed_manifests_with_wrong_content(
    rig: Rig, caplog: pytest.LogCaptureFixture, data: st.DataObject
) -> None:
    """A correct, fleet-signed manifest and chunks carrying a damaged artifact, with 0-2
    further faults in the manifest and 0-2 in the chunk stream."""
    draw = data.draw
    serving = rig.node.serving_version()
    payload = draw(artifacts(rig.model_dir), label="artifact")
    faults = set(draw(st.lists(st.sampled_from(MANIFEST_FAULTS), max_size=2), label="faults"))
    chunk_faults = draw(st.lists(st.sampled_from(CHUNK_FAULTS), max_size=2), label="chunks")
    chunk_size = draw(st.sampled_from([1024, 4096, 65536]), label="chunk size")
    if "chunk_size" in faults:
        chunk_size = draw(st.integers(1, 2**20) | st.sampled_from([0, -1, 2**63 - 1]))
    chunks = codec.split_chunks(payload, max(1, chunk_size))
    digests = [codec.sha256_hex(c) for c in chunks]
    if "chunk_digests" in faults:
        digests = draw(st.lists(hex64, max_size=8) | st.just(digests[::-1]))
    version = serving + 1
    if "version" in faults:
        version = draw(st.sampled_from([serving, 1, 0, -5, 2**62]) | st.integers())
    fields = {
        "fleet": FLEET,
        "version": version,
        "parent_version": serving,
        "round": 7,
        "created_at_ms": 1_700_000_000_000,
        "architecture_id": "mlp",
        "artifact_sha256": codec.sha256_hex(payload),
        "artifact_size": len(payload),
        "chunk_size": chunk_size,
        "chunk_sha256": tuple(digests),
        "metrics": {"accuracy": 0.5},
        "pinned": draw(st.booleans()),
        "sequence": rig.next_sequence(),
    }
    if "fleet" in faults:
        fields["fleet"] = draw(st.sampled_from(["other", "", "fuzz/x", "FUZZ"]))
    if "parent" in faults:
        fields["parent_version"] = draw(st.sampled_from([-1, version, version + 1]))
    if "round" in faults:
        fields["round"] = draw(st.sampled_from([-1, 2**63 - 1]))
    if "created" in faults:
        fields["created_at_ms"] = draw(st.sampled_from([0, -1, 2**63 - 1]))
    if "arch" in faults:
        fields["architecture_id"] = draw(st.sampled_from(["", "other", "x" * 5000]))
    if "artifact_sha" in faults:
        fields["artifact_sha256"] = draw(hex64 | st.sampled_from(["", "ABC", "0" * 63]))
    if "size" in faults:
        fields["artifact_size"] = draw(
            st.sampled_from([0, -1, 1, len(payload) + 1, 2**31, 2**63 - 1])
        )
    if "sequence" in faults:
        fields["sequence"] = draw(st.sampled_from([0, 1, rig.sequence - 1, -1]))
    if "metrics" in faults:
        fields["metrics"] = draw(st.dictionaries(st.text(max_size=5), st.floats(), max_size=3))
    manifest = codec.Manifest(**fields)  # type: ignore[arg-type]
    signer = Ed25519PrivateKey.generate() if "signer" in faults else rig.key
    signed = signing.sign_manifest(manifest, signer)
    if "forged" in faults:
        signed = dataclasses.replace(signed, artifact_size=signed.artifact_size + 1)
    try:
        wire = codec.manifest_to_bytes(signed)
    except ValueError:
        wire = draw(st.binary(max_size=200))  # out of protobuf range: send garbage instead
    rig.feed(topics.release_manifest(FLEET), wire)
    chunk_version = max(1, min(version, 2**62))
    order = list(range(len(chunks)))
    if "missing" in chunk_faults and order:
        order.pop(draw(st.integers(0, len(order) - 1)))
    for i in draw(st.permutations(order)):
        topic = topics.release_chunk(FLEET, chunk_version, i)
        if "random" in chunk_faults and draw(st.booleans()):
            rig.feed(topic, draw(st.binary(max_size=64)))
        if "empty" in chunk_faults:
            rig.feed(topic, b"")
        if "beyond" in chunk_faults:
            rig.feed(topics.release_chunk(FLEET, chunk_version, len(chunks) + i), chunks[i])
        if "other_version" in chunk_faults:
            rig.feed(topics.release_chunk(FLEET, chunk_version + 1, i), chunks[i])
        rig.feed(topic, chunks[i])
        if "dup" in chunk_faults:
            rig.feed(topic, chunks[i])
    now = rig.node.serving_version()
    if now != serving:
        # A flatbuffer damaged where LiteRT does not look still loads: a release signed by
        # the fleet key, complete and intact on the wire, may install; then the device
        # must serve exactly that artifact.
        event("damaged artifact still usable: installed")
        assert now == version and not faults - {"metrics", "round", "arch", "created", "chunk_size"}
        current = rig.node.store.current()
        assert current is not None and current.data == payload
        package = codec.package_from_bytes(payload)
        model = LiteRTModel(package.tflite, ModelCard.from_json(package.card_json))
        model.set_weights(package.weights)
        rig.expected[now] = model.infer(rig.probe)
    rig.assert_serving(now)
    if rig.node.last_error:
        event("install refused: " + rig.node.last_error.split(":")[1].strip()[:30])
        rig.node.last_error = ""


def test_huge_chunk_counts_and_sizes(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """65,536 declared chunks (the limit), 65,537 (over it) and a 2**63-1 byte artifact."""
    rng = np.random.default_rng(0)
    for count in (65_536, 65_537):
        digests = tuple(rng.bytes(32).hex() for _ in range(count))
        manifest = signing.sign_manifest(
            codec.Manifest(
                fleet=FLEET,
                version=2,
                parent_version=1,
                round=1,
                created_at_ms=1_700_000_000_000,
                architecture_id="mlp",
                artifact_sha256=rng.bytes(32).hex(),
                artifact_size=2**63 - 1,
                chunk_size=2**31,
                chunk_sha256=digests,
                sequence=rig.next_sequence(),
            ),
            rig.key,
        )
        rig.feed(topics.release_manifest(FLEET), codec.manifest_to_bytes(manifest))
        for index in (0, 1, count - 1, count, 2**40):
            rig.feed(topics.release_chunk(FLEET, 2, index), rng.bytes(100))
        rig.assert_serving(1)
    genuine_release_installs(rig, caplog)


def test_built_manifests_then_genuine_release(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Damaged packages signed by the fleet key fail to install; then a genuine one installs."""
    caplog.set_level(logging.INFO)
    full = make_package(rig.model_dir)
    for version, data in ((2, full[: len(full) // 2]), (3, b"\x00" * 5000), (4, full + b"x")):
        manifest = genuine_manifest(rig, version, data, 4096)
        rig.feed(topics.release_manifest(FLEET), codec.manifest_to_bytes(manifest))
        for i, chunk in enumerate(codec.split_chunks(data, 4096)):
            rig.feed(topics.release_chunk(FLEET, version, i), chunk)
        rig.assert_serving(1)
        assert f"release {version}" in rig.node.status().last_error
    assert math.isfinite(float(rig.node.status().disk_free_bytes))
    genuine_release_installs(rig, caplog)
