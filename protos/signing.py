"""Ed25519 signatures over release manifests.

The cloud holds the fleet's private key (``edgefl cloud init`` writes it with mode
0600); every device holds the public key and accepts a manifest only if its signature
verifies over :func:`protos.codec.manifest_signing_bytes`. A key id (the first 16 hex
digits of the SHA-256 of the raw public key) travels with the signature so that a
device can tell "signed by another key" from "tampered".
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protos.codec import Manifest, manifest_signing_bytes
from protos.errors import CodecError


class SignatureError(CodecError):
    """A manifest whose signature is missing, made by another key, or does not verify."""


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write a PEM private key readable only by its owner (created with mode 0600)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(path, 0o600)


def write_public_key(key: Ed25519PublicKey, path: Path) -> None:
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pem)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key")
    return key


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey) -> Manifest:
    """Return a copy of ``manifest`` carrying a signature and the signing key id."""
    unsigned = dataclasses.replace(manifest, signature=b"", signing_key_id="")
    signature = key.sign(manifest_signing_bytes(unsigned))
    return dataclasses.replace(
        unsigned, signature=signature, signing_key_id=key_id(key.public_key())
    )


def verify_manifest(manifest: Manifest, public_key: Ed25519PublicKey) -> None:
    """Raise :class:`SignatureError` unless ``manifest`` was signed by ``public_key``."""
    if not manifest.signature:
        raise SignatureError(f"release {manifest.version} is not signed")
    expected_id = key_id(public_key)
    if manifest.signing_key_id != expected_id:
        raise SignatureError(
            f"release {manifest.version} is signed by key {manifest.signing_key_id or '?'}, "
            f"this device trusts key {expected_id}"
        )
    unsigned = dataclasses.replace(manifest, signature=b"", signing_key_id="")
    try:
        public_key.verify(manifest.signature, manifest_signing_bytes(unsigned))
    except InvalidSignature as exc:
        raise SignatureError(
            f"release {manifest.version}: signature does not verify (tampered manifest)"
        ) from exc
