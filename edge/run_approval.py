"""Run approvals: the fleet key says which Flower runs a device may execute.

Whoever reaches a SuperLink can submit a run, and Flower hands that run's messages to
every SuperNode. A device therefore executes a message only if it carries an
**approval** for its run: an Ed25519 signature by the fleet's release-signing key (the
key whose public half every device already holds in ``[trust] signing_public_key``)
over the run's id. The cloud supervisor, which submits runs and never loads run code,
signs one right after ``flwr run`` tells it the run id; the ServerApp copies it into
every message it sends; the device's executor verifies it before anything of the
message runs, and refuses the message with an error reply otherwise.

**Signed bytes** (version 1), UTF-8, fields separated by a single ``\\n``, no trailing
newline, every number in decimal ASCII without sign, leading zeros or fraction::

    edgefl-run-approval/v1\\n<fleet>\\n<run id>\\n<issued at>

``<fleet>`` is the fleet name (no control characters), ``<run id>`` Flower's run id
(an unsigned 64-bit integer), ``<issued at>`` Unix seconds when the cloud signed it.
Example: fleet ``lab``, run ``4421``, issued at ``1764547200`` sign
``b"edgefl-run-approval/v1\\nlab\\n4421\\n1764547200"``. The signature is plain Ed25519
over those bytes (RFC 8032), so ``openssl pkeyutl -verify -rawin`` checks it too.

**In a message** the approval is a Flower ``ConfigRecord`` under the content key
:data:`APPROVAL_KEY` with the entries ``fleet`` (str), ``run-id`` (str, decimal),
``issued-at`` (int), ``key-id`` (str, :func:`protos.signing.key_id` of the signing
key) and ``signature`` (bytes, 64). :meth:`RunApproval.to_record` /
:func:`verify_approval` convert; they take and return plain mappings, so this module
does not import Flower. **On disk** (cloud supervisor → ServerApp) it is the same
entries as JSON, the signature in base64: :meth:`RunApproval.to_json` /
:meth:`RunApproval.from_json`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.errors import EdgeError
from protos import wire_keys
from protos.signing import key_id

#: Content key of the approval record in every message of an approved run.
APPROVAL_KEY = wire_keys.APPROVAL
#: First line of the signed bytes; a new layout gets a new version.
DOMAIN = b"edgefl-run-approval/v1"
_MAX_U64 = 2**64 - 1
_FIELDS = ("fleet", "run-id", "issued-at", "key-id", "signature")


class ApprovalError(EdgeError, ValueError):
    """An approval that is missing, malformed, for another run or fleet, or not signed by the fleet."""


def _check_fleet(fleet: str) -> None:
    if not fleet or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in fleet):
        raise ApprovalError(f"fleet name {fleet!r} is empty or holds control characters")


def _check_u64(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_U64:
        raise ApprovalError(f"{name} must be an unsigned 64-bit integer, got {value!r}")


def approval_bytes(fleet: str, run_id: int, issued_at: int) -> bytes:
    """The exact bytes an approval signs (see the module docstring)."""
    _check_fleet(fleet)
    _check_u64("run id", run_id)
    _check_u64("issued-at", issued_at)
    return b"\n".join([DOMAIN, fleet.encode("utf-8"), b"%d" % run_id, b"%d" % issued_at])


@dataclass(frozen=True)
class RunApproval:
    """One signed approval: fleet ``fleet`` may run Flower run ``run_id``."""

    fleet: str
    run_id: int
    issued_at: int
    key_id: str
    signature: bytes

    def signed_bytes(self) -> bytes:
        return approval_bytes(self.fleet, self.run_id, self.issued_at)

    def to_record(self) -> dict[str, str | int | bytes]:
        """The entries of the message's ``ConfigRecord`` (wrap them in one)."""
        return {
            "fleet": self.fleet,
            "run-id": str(self.run_id),
            "issued-at": self.issued_at,
            "key-id": self.key_id,
            "signature": self.signature,
        }

    def to_json(self) -> str:
        doc = dict(self.to_record())
        doc["signature"] = base64.b64encode(self.signature).decode("ascii")
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunApproval:
        try:
            doc = json.loads(text)
            doc["signature"] = base64.b64decode(doc["signature"], validate=True)
        except (ValueError, TypeError, KeyError, binascii.Error) as exc:
            raise ApprovalError(f"approval file is not valid: {exc}") from exc
        if not isinstance(doc, dict):
            raise ApprovalError("approval file does not hold an object")
        return parse_record(doc)


def parse_record(record: Mapping[str, object]) -> RunApproval:
    """Read an approval from its record entries; ApprovalError when malformed."""
    missing = [name for name in _FIELDS if name not in record]
    if missing:
        raise ApprovalError(f"approval record lacks {', '.join(missing)}")
    fleet, run_id, issued_at = record["fleet"], record["run-id"], record["issued-at"]
    kid, signature = record["key-id"], record["signature"]
    if not isinstance(fleet, str) or not isinstance(kid, str):
        raise ApprovalError("approval fleet and key-id must be strings")
    if not isinstance(run_id, str) or not run_id.isdigit() or run_id != str(int(run_id)):
        raise ApprovalError(f"approval run-id must be a decimal string, got {run_id!r}")
    if isinstance(issued_at, bool) or not isinstance(issued_at, int):
        raise ApprovalError(f"approval issued-at must be an integer, got {issued_at!r}")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise ApprovalError("approval signature must be 64 bytes")
    approval = RunApproval(fleet, int(run_id), issued_at, kid, signature)
    approval.signed_bytes()  # validates the ranges and the fleet name
    return approval


def sign_approval(
    private_key: Ed25519PrivateKey, fleet: str, run_id: int, *, issued_at: int | None = None
) -> RunApproval:
    """Approve Flower run ``run_id`` for ``fleet`` with the fleet's signing key."""
    when = int(time.time()) if issued_at is None else issued_at
    signature = private_key.sign(approval_bytes(fleet, run_id, when))
    return RunApproval(fleet, run_id, when, key_id(private_key.public_key()), signature)


def verify_approval(
    public_key: Ed25519PublicKey, record: Mapping[str, object] | None, fleet: str, run_id: int
) -> RunApproval:
    """Check that ``record`` approves run ``run_id`` of ``fleet`` under ``public_key``.

    Raises :class:`ApprovalError` with the reason (absent, malformed, another fleet,
    another run, another key, bad signature); returns the approval otherwise.
    """
    if record is None:
        raise ApprovalError(
            f"run {run_id} carries no approval ({APPROVAL_KEY!r}): the fleet did not approve it"
        )
    approval = parse_record(record)
    if approval.fleet != fleet:
        raise ApprovalError(
            f"the approval is for fleet {approval.fleet!r}, this device is in fleet {fleet!r}"
        )
    if approval.run_id != run_id:
        raise ApprovalError(
            f"the approval is for run {approval.run_id}, the message belongs to run {run_id}"
        )
    expected = key_id(public_key)
    if approval.key_id != expected:
        raise ApprovalError(
            f"the approval is signed by key {approval.key_id or '?'}, this device trusts {expected}"
        )
    try:
        public_key.verify(approval.signature, approval.signed_bytes())
    except InvalidSignature as exc:
        raise ApprovalError(f"the approval of run {run_id} does not verify (forged)") from exc
    return approval


# -- hand-over from the cloud supervisor to the ServerApp ------------------------------------


def approval_path(data_dir: Path, run_id: int) -> Path:
    """``<cloud data_dir>/approvals/<run id>.json``: where the supervisor leaves an approval."""
    return Path(data_dir) / "approvals" / f"{int(run_id)}.json"


def write_approval(data_dir: Path, approval: RunApproval) -> Path:
    """Store ``approval`` for the ServerApp (atomically: a reader never sees half a file)."""
    path = approval_path(data_dir, approval.run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(approval.to_json(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def wait_for_approval(data_dir: Path, run_id: int, *, timeout: float) -> RunApproval:
    """Read the approval of ``run_id``, waiting up to ``timeout`` s for the supervisor to write it.

    The ServerApp may start before ``flwr run`` has returned the run id to the
    supervisor, hence the wait. Raises :class:`ApprovalError` when none appears.
    """
    path = approval_path(data_dir, run_id)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return RunApproval.from_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise ApprovalError(
                    f"no approval for run {run_id} at {path} after {timeout:.0f}s: runs are "
                    "approved by `edgefl cloud up` when it submits them"
                ) from None
        time.sleep(0.2)
