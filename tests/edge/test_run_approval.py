"""Run approvals: the documented signed bytes, signing, and every way verification refuses."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from edge.run_approval import (
    APPROVAL_KEY,
    ApprovalError,
    RunApproval,
    approval_bytes,
    parse_record,
    sign_approval,
    verify_approval,
)
from protos import signing


@pytest.fixture(scope="module")
def key():
    return signing.generate_private_key()


def test_the_signed_bytes_are_the_documented_ones() -> None:
    assert (
        approval_bytes("lab", 4421, 1764547200) == b"edgefl-run-approval/v1\nlab\n4421\n1764547200"
    )
    assert approval_bytes("lab", 2**64 - 1, 0).split(b"\n")[2] == b"18446744073709551615"
    assert APPROVAL_KEY == "edgefl-approval"


@pytest.mark.parametrize(
    ("fleet", "run_id", "issued_at"),
    [
        ("", 1, 1),
        ("a\nb", 1, 1),
        ("lab", -1, 1),
        ("lab", 2**64, 1),
        ("lab", 1, -5),
        ("lab", True, 1),
    ],
)
def test_values_that_cannot_be_signed_unambiguously_are_refused(fleet, run_id, issued_at) -> None:
    with pytest.raises(ApprovalError):
        approval_bytes(fleet, run_id, issued_at)


def test_a_signed_approval_verifies_for_its_run_and_fleet(key) -> None:
    approval = sign_approval(key, "lab", 987654321987654321, issued_at=1764547200)
    record = approval.to_record()
    assert record["run-id"] == "987654321987654321"
    assert verify_approval(key.public_key(), record, "lab", 987654321987654321) == approval
    # The JSON form the cloud supervisor hands to the ServerApp round-trips.
    assert RunApproval.from_json(approval.to_json()) == approval


def test_openssl_verifies_the_signature_over_the_documented_bytes(key, tmp_path: Path) -> None:
    approval = sign_approval(key, "lab", 4421, issued_at=1764547200)
    pub = tmp_path / "fleet.pub"
    signing.write_public_key(key.public_key(), pub)
    data = tmp_path / "data"
    data.write_bytes(b"edgefl-run-approval/v1\nlab\n4421\n1764547200")
    sig = tmp_path / "sig"
    sig.write_bytes(approval.signature)
    res = subprocess.run(
        ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-rawin",
         "-in", str(data), "-sigfile", str(sig)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Signature Verified Successfully" in res.stdout


def test_refusals_name_the_reason(key) -> None:
    pub = key.public_key()
    good = sign_approval(key, "lab", 7).to_record()
    with pytest.raises(ApprovalError, match="carries no approval"):
        verify_approval(pub, None, "lab", 7)
    with pytest.raises(ApprovalError, match="for run 7, the message belongs to run 8"):
        verify_approval(pub, good, "lab", 8)
    with pytest.raises(ApprovalError, match="for fleet 'lab'"):
        verify_approval(pub, good, "other", 7)
    stranger = signing.generate_private_key()
    with pytest.raises(ApprovalError, match="signed by key"):
        verify_approval(pub, sign_approval(stranger, "lab", 7).to_record(), "lab", 7)
    # Right key id, signature by another key: forged.
    forged = dataclasses.replace(
        sign_approval(stranger, "lab", 7), key_id=signing.key_id(pub)
    ).to_record()
    with pytest.raises(ApprovalError, match="does not verify"):
        verify_approval(pub, forged, "lab", 7)
    # A signature for run 7 with the run id edited to 8.
    edited = dict(good, **{"run-id": "8"})
    with pytest.raises(ApprovalError, match="does not verify"):
        verify_approval(pub, edited, "lab", 8)


@pytest.mark.parametrize(
    "change",
    [
        {"run-id": 7},
        {"run-id": "07"},
        {"run-id": "-7"},
        {"issued-at": "1"},
        {"signature": b"short"},
        {"signature": "x" * 64},
        {"fleet": 3},
    ],
)
def test_malformed_records_are_refused(key, change) -> None:
    record = dict(sign_approval(key, "lab", 7).to_record(), **change)
    with pytest.raises(ApprovalError):
        parse_record(record)


def test_a_record_missing_entries_is_refused(key) -> None:
    record = dict(sign_approval(key, "lab", 7).to_record())
    del record["signature"]
    with pytest.raises(ApprovalError, match="lacks signature"):
        verify_approval(key.public_key(), record, "lab", 7)


@pytest.mark.parametrize("text", ["", "[]", '{"fleet": "lab"}', '{"signature": "!!"}'])
def test_a_bad_approval_file_is_refused(text: str) -> None:
    with pytest.raises(ApprovalError):
        RunApproval.from_json(text)
