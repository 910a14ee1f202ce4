"""The signed form of a release manifest is reproducible without edgefl (#15 item 7).

The vector in docs/vectors/ is rebuilt here from its JSON values by a second, tiny
implementation that follows docs/reference.md, and verified by OpenSSL's command line.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from protos import codec, signing

VECTORS = Path(__file__).resolve().parents[2] / "docs" / "vectors"


def _doc() -> dict[str, Any]:
    return json.loads((VECTORS / "release-manifest.json").read_text(encoding="utf-8"))


def _string(value: str) -> bytes:
    raw = value.encode("utf-8")
    return f"{len(raw)}:".encode() + raw


def rebuild_signed_bytes(doc: dict[str, Any]) -> bytes:
    """The documented steps, written out again without protos.codec."""
    out = [b"edgefl.release-manifest.v2"]
    out.append(b"fleet=" + _string(doc["fleet"]))
    for name in ("version", "parent_version", "round", "created_at_ms"):
        out.append(f"{name}={doc[name]}".encode())
    out.append(b"architecture_id=" + _string(doc["architecture_id"]))
    out.append(f"artifact_sha256={doc['artifact_sha256']}".encode())
    out.append(f"artifact_size={doc['artifact_size']}".encode())
    out.append(f"chunk_size={doc['chunk_size']}".encode())
    out.append(f"chunk_count={len(doc['chunk_sha256'])}".encode())
    out += [f"chunk_sha256={d}".encode() for d in doc["chunk_sha256"]]
    metrics = doc["metrics"]
    out.append(f"metric_count={len(metrics)}".encode())
    for name in sorted(metrics, key=lambda n: n.encode("utf-8")):
        out.append(b"metric=" + _string(name) + b" " + metrics[name]["binary64"].encode())
    out.append(b"pinned=" + (b"true" if doc["pinned"] else b"false"))
    out.append(f"sequence={doc['sequence']}".encode())
    return b"".join(line + b"\n" for line in out)


def _manifest(doc: dict[str, Any]) -> codec.Manifest:
    return codec.Manifest(
        fleet=doc["fleet"],
        version=doc["version"],
        parent_version=doc["parent_version"],
        round=doc["round"],
        created_at_ms=doc["created_at_ms"],
        architecture_id=doc["architecture_id"],
        artifact_sha256=doc["artifact_sha256"],
        artifact_size=doc["artifact_size"],
        chunk_size=doc["chunk_size"],
        chunk_sha256=tuple(doc["chunk_sha256"]),
        metrics={k: v["value"] for k, v in doc["metrics"].items()},
        pinned=doc["pinned"],
        sequence=doc["sequence"],
        signature=bytes.fromhex(doc["signature_hex"]),
        signing_key_id=doc["signing_key_id"],
    )


def test_metric_bit_patterns_in_the_vector_match_their_values() -> None:
    for name, metric in _doc()["metrics"].items():
        assert struct.pack(">d", metric["value"]).hex() == metric["binary64"], name


def test_the_documented_steps_rebuild_the_signed_file_and_the_codec_agrees() -> None:
    doc = _doc()
    expected = (VECTORS / "release-manifest.signed").read_bytes()
    assert rebuild_signed_bytes(doc) == expected
    assert codec.manifest_signing_bytes(_manifest(doc)) == expected
    assert b"." not in expected.split(b"metric_count=")[1].split(b"pinned=")[0].replace(
        b"\xce\x94", b""
    ), "metric values must not be written as decimal floats"


def test_the_wire_manifest_of_the_vector_verifies_with_edgefl() -> None:
    doc = _doc()
    wire = codec.manifest_from_bytes((VECTORS / "release-manifest.pb").read_bytes())
    assert wire == _manifest(doc)
    key = signing.load_public_key(VECTORS / "release-manifest.pub.pem")
    assert signing.key_id(key) == doc["signing_key_id"]
    signing.verify_manifest(wire, key)
    with pytest.raises(signing.SignatureError, match="does not verify"):
        signing.verify_manifest(dataclasses.replace(wire, sequence=wire.sequence + 1), key)


def test_openssl_verifies_the_vector_and_refuses_a_changed_byte(tmp_path: Path) -> None:
    assert shutil.which("openssl"), "openssl is needed: apt-get install openssl"
    def verify(signed: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "openssl", "pkeyutl", "-verify", "-pubin",
                "-inkey", str(VECTORS / "release-manifest.pub.pem"), "-rawin",
                "-in", str(signed), "-sigfile", str(VECTORS / "release-manifest.sig"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )  # fmt: skip

    good = verify(VECTORS / "release-manifest.signed")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "Signature Verified Successfully" in good.stdout
    tampered = tmp_path / "tampered.signed"
    tampered.write_bytes(
        (VECTORS / "release-manifest.signed").read_bytes().replace(b"version=7", b"version=8")
    )
    bad = verify(tampered)
    assert bad.returncode != 0
    assert "Signature Verification Failure" in bad.stdout + bad.stderr


def test_openssl_verifies_what_the_publisher_signs_now(tmp_path: Path) -> None:
    """Not only the frozen vector: a fresh signature over tricky strings verifies too."""
    assert shutil.which("openssl"), "openssl is needed: apt-get install openssl"
    key = signing.generate_private_key()
    m = dataclasses.replace(
        _manifest(_doc()),
        architecture_id="arch\nversion=99",
        metrics={"a=b c": 1e-300, "": -0.0, "nan-free": 12345.678},
        signature=b"",
        signing_key_id="",
    )
    signed = signing.sign_manifest(m, key)
    (tmp_path / "m.signed").write_bytes(codec.manifest_signing_bytes(m))
    (tmp_path / "m.sig").write_bytes(signed.signature)
    signing.write_public_key(key.public_key(), tmp_path / "m.pub")
    res = subprocess.run(
        ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "m.pub"),
         "-rawin", "-in", str(tmp_path / "m.signed"), "-sigfile", str(tmp_path / "m.sig")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_length_prefixes_keep_fields_apart() -> None:
    """A newline or '=' inside a string cannot impersonate another field."""
    base = _manifest(_doc())
    sneaky = dataclasses.replace(base, architecture_id="x\nversion=99")
    assert codec.manifest_signing_bytes(sneaky) != codec.manifest_signing_bytes(base)
    assert b"architecture_id=12:x\nversion=99\n" in codec.manifest_signing_bytes(sneaky)
    a = dataclasses.replace(base, metrics={"a": 1.0, "b": 2.0})
    b = dataclasses.replace(base, metrics={"a": 1.0})
    assert codec.manifest_signing_bytes(a) != codec.manifest_signing_bytes(b)
