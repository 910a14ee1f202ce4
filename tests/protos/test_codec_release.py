"""Manifests, packages and status reports: round trips, validation and signatures."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import codec, signing
from protos.edgefl.v1 import release_pb2, status_pb2
from protos.errors import ManifestError, PackageError, StatusError


def make_manifest(
    data: bytes = b"x" * 1000, chunk_size: int = 300, **overrides: object
) -> codec.Manifest:
    chunks = codec.split_chunks(data, chunk_size if chunk_size > 0 else 300)
    fields: dict[str, object] = dict(
        fleet="fleet-a",
        version=3,
        parent_version=2,
        round=2,
        created_at_ms=1_700_000_000_000,
        architecture_id="mlp-64-10-abc",
        artifact_sha256=codec.sha256_hex(data),
        artifact_size=len(data),
        chunk_size=chunk_size,
        chunk_sha256=tuple(codec.sha256_hex(c) for c in chunks),
        metrics={"accuracy": 0.9, "loss": 0.3},
        sequence=17,
    )
    fields.update(overrides)
    return codec.Manifest(**fields)  # type: ignore[arg-type]


@st.composite
def manifests(draw: st.DrawFn) -> codec.Manifest:
    data = draw(st.binary(min_size=1, max_size=3000))
    chunk_size = draw(st.integers(1, 4000))
    version = draw(st.integers(1, 10**9))
    return make_manifest(
        data,
        chunk_size,
        fleet=draw(st.from_regex(r"[a-z0-9_.-]{1,20}", fullmatch=True)),
        version=version,
        parent_version=draw(st.integers(0, version - 1)),
        round=draw(st.integers(0, 10**6)),
        metrics=draw(
            st.dictionaries(
                st.text(max_size=8), st.floats(allow_nan=False, allow_infinity=False), max_size=4
            )
        ),
        pinned=draw(st.booleans()),
        sequence=draw(st.integers(0, 2**62)),
    )


@settings(max_examples=200, deadline=None)
@given(manifests())
def test_manifest_round_trip(m: codec.Manifest) -> None:
    assert codec.manifest_from_bytes(codec.manifest_to_bytes(m)) == m


@settings(max_examples=100, deadline=None)
@given(manifests())
def test_signature_verifies_and_any_field_change_breaks_it(m: codec.Manifest) -> None:
    key = signing.generate_private_key()
    signed = signing.sign_manifest(m, key)
    wire = codec.manifest_from_bytes(codec.manifest_to_bytes(signed))
    signing.verify_manifest(wire, key.public_key())
    for change in (
        {"version": wire.version + 1},
        {"artifact_sha256": "0" * 64 if wire.artifact_sha256 != "0" * 64 else "1" * 64},
        {"fleet": wire.fleet + "x"},
        {"pinned": not wire.pinned},
        {"sequence": wire.sequence + 1},
    ):
        with pytest.raises(signing.SignatureError, match="does not verify"):
            signing.verify_manifest(dataclasses.replace(wire, **change), key.public_key())  # type: ignore[arg-type]


def test_signature_by_another_key_and_unsigned_are_named() -> None:
    m = make_manifest()
    signed = signing.sign_manifest(m, signing.generate_private_key())
    with pytest.raises(signing.SignatureError, match="signed by key"):
        signing.verify_manifest(signed, signing.generate_private_key().public_key())
    with pytest.raises(signing.SignatureError, match="not signed"):
        signing.verify_manifest(m, signing.generate_private_key().public_key())


def test_key_files_round_trip_and_private_key_is_0600(tmp_path) -> None:
    key = signing.generate_private_key()
    signing.write_private_key(key, tmp_path / "k.pem")
    signing.write_public_key(key.public_key(), tmp_path / "k.pub")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    loaded = signing.load_private_key(tmp_path / "k.pem")
    assert signing.key_id(loaded.public_key()) == signing.key_id(
        signing.load_public_key(tmp_path / "k.pub")
    )


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"fleet": ""}, "fleet is empty"),
        ({"version": 0, "parent_version": 0}, "version must be positive"),
        ({"parent_version": 3}, "parent_version"),
        ({"artifact_sha256": "XYZ"}, "artifact_sha256"),
        ({"artifact_size": 999_999}, "make"),
        ({"chunk_size": 0}, "chunk_size must be positive"),
        ({"chunk_sha256": ()}, "chunk count 0"),
        ({"metrics": {"loss": float("nan")}}, "not finite"),
        ({"created_at_ms": 0}, "created_at_ms"),
    ],
)
def test_invalid_manifests_are_rejected_naming_the_problem(
    overrides: dict[str, object], pattern: str
) -> None:
    bad = make_manifest(**overrides)
    with pytest.raises(ManifestError, match=pattern):
        codec.manifest_from_bytes(codec.manifest_to_bytes(bad))


def test_all_manifest_problems_are_reported_at_once() -> None:
    with pytest.raises(ManifestError) as info:
        codec.manifest_from_bytes(release_pb2.ReleaseManifest().SerializeToString())
    message = str(info.value)
    for expected in (
        "fleet is empty",
        "version must be positive",
        "architecture_id is empty",
        "chunk_size",
    ):
        assert expected in message


def test_manifest_signing_bytes_ignore_signature_fields() -> None:
    m = make_manifest()
    assert codec.manifest_signing_bytes(m) == codec.manifest_signing_bytes(
        dataclasses.replace(m, signature=b"sig", signing_key_id="abc")
    )


def test_package_round_trip_is_deterministic() -> None:
    weights = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), np.float32)}
    pkg = codec.ModelPackage("arch-1", b"TFL3...", '{"format": "x"}', weights)
    data = codec.package_to_bytes(pkg)
    assert data == codec.package_to_bytes(
        codec.ModelPackage(
            "arch-1", b"TFL3...", '{"format": "x"}', dict(reversed(list(weights.items())))
        )
    )
    back = codec.package_from_bytes(data)
    assert back.architecture_id == "arch-1" and back.tflite == b"TFL3..."
    assert set(back.weights) == {"a", "b"}
    assert np.array_equal(back.weights["a"], weights["a"])


def test_package_missing_fields_and_garbage_are_rejected() -> None:
    with pytest.raises(PackageError, match="missing architecture_id, tflite, card_json"):
        codec.package_from_bytes(b"")
    with pytest.raises(PackageError, match="not a valid protobuf"):
        codec.package_from_bytes(b"\xff\xff\xff\xff")
    bad_card = release_pb2.ModelPackage(
        architecture_id="a", tflite=b"t", card_json="{not json"
    ).SerializeToString()
    with pytest.raises(PackageError, match="card is not JSON"):
        codec.package_from_bytes(bad_card)


def test_status_round_trip_and_validation() -> None:
    s = codec.DeviceStatus(
        device_id="dev-1",
        fleet="f",
        serving_version=4,
        state="TRAINING",
        timestamp_ms=5,
        sample_count=100,
        rss_bytes=1 << 20,
        last_metrics={"accuracy": 0.5},
        profile="rpi4",
    )
    assert codec.status_from_bytes(codec.status_to_bytes(s)) == s
    with pytest.raises(StatusError, match="device_id is empty"):
        codec.status_from_bytes(b"")
    with pytest.raises(StatusError, match="unknown device state"):
        codec.status_to_bytes(dataclasses.replace(s, state="DANCING"))


@pytest.mark.parametrize("state", [0, 6, 99])
def test_a_status_with_an_unknown_state_number_names_every_problem(state: int) -> None:
    msg = status_pb2.DeviceStatus(device_id="", serving_version=-1, state=state)  # type: ignore[arg-type]
    with pytest.raises(StatusError) as caught:
        codec.status_from_bytes(msg.SerializeToString())
    assert str(caught.value) == (
        "invalid device status: device_id is empty; "
        f"state {state} is not a known device state; serving_version is negative"
    )
    for name in codec.DEVICE_STATES:  # and every known one decodes to its name
        ok = status_pb2.DeviceStatus(device_id="d", state=status_pb2.DeviceState.Value(name))
        assert codec.status_from_bytes(ok.SerializeToString()).state == name


def test_split_chunks_reassemble() -> None:
    data = bytes(range(256)) * 10
    for size in (1, 7, 256, 2560, 10_000):
        chunks = codec.split_chunks(data, size)
        assert b"".join(chunks) == data
        assert all(len(c) <= size for c in chunks)
