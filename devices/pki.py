"""The fleet's public-key infrastructure: a CA, server certificates, device keys.

One self-signed **fleet CA** (ECDSA P-384) signs the TLS server certificates of the
broker and the SuperLink. Devices receive only the CA certificate as a trust anchor,
so a server certificate can be reissued (new host name, expiry) without touching any
device. Server certificates always name ``localhost`` and ``127.0.0.1`` besides the
hosts given, so the same setup works on loopback (tests, the demo) and on a LAN.

Device keys are ECDSA P-384 as Flower's SuperNode authentication wants them: the
SuperNode reads an **OpenSSH** private key (``--auth-supernode-private-key``) and
``flwr supernode register`` reads the matching OpenSSH public key.

Only ``cryptography`` is used; nothing here shells out to ``openssl``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devices.errors import DevicesError

#: Lifetime of the fleet CA.
CA_DAYS = 3650
#: Lifetime of a server certificate (reissue with ``init_secure``; devices are unaffected).
SERVER_DAYS = 825
#: Names every server certificate carries so loopback always works.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")


class PKIError(DevicesError, ValueError):
    """A host name that cannot go into a certificate, or a key file of the wrong kind."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-384 private key (CA, servers and devices alike)."""
    return ec.generate_private_key(ec.SECP384R1())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(
    common_name: str, *, days: int = CA_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate allowed to sign end-entity certificates only."""
    key = generate_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefl"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in [*hosts, *LOOPBACK_HOSTS]:
        host = host.strip()
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        label_ok = all(
            part and len(part) <= 63 and part.replace("-", "").isalnum()
            for part in host.removeprefix("*.").split(".")
        )
        if not label_ok:
            raise PKIError(f"{host!r} is neither an IP address nor a DNS name")
        entries.append(x509.DNSName(host))
    return entries


def check_host(host: str) -> str:
    """Return ``host`` if it can go into a certificate (IP address or DNS name), else raise."""
    _san_entries([host])
    return host


def issue_server_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    hosts: Sequence[str] = (),
    days: int = SERVER_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS server certificate for ``hosts`` (+ localhost, 127.0.0.1) signed by the CA."""
    key = generate_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefl"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def certificate_hosts(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate's SAN extension lists."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


def covers_host(cert: x509.Certificate, host: str) -> bool:
    """Whether a client connecting to ``host`` would accept ``cert`` (exact or ``*.`` match)."""
    names = certificate_hosts(cert)
    if host in names:
        return True
    first, _, rest = host.partition(".")
    return bool(first and rest) and f"*.{rest}" in names


# -- files -----------------------------------------------------------------------------


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` atomically with mode 0600 (never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_public(path: Path, data: bytes) -> None:
    """Write non-secret data (certificates, public keys) atomically with mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_secret(path, private_key_pem(key))


def write_certificate(path: Path, cert: x509.Certificate) -> None:
    write_public(path, certificate_pem(cert))


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path} is not an ECDSA private key")
    return key


# -- device keys (Flower SuperNode authentication) -------------------------------------


def device_private_key_openssh(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private key in the OpenSSH format ``flower-supernode`` loads."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def device_public_key_openssh(key: ec.EllipticCurvePrivateKey, *, comment: str = "") -> bytes:
    """The public key in the OpenSSH one-line format ``flwr supernode register`` reads."""
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return line + (f" {comment}".encode() if comment else b"") + b"\n"


def public_key_fingerprint(openssh_public_key: bytes) -> str:
    """SHA-256 of the key's wire bytes, hex (what the registry shows next to a device)."""
    import hashlib

    key = serialization.load_ssh_public_key(openssh_public_key.split(b"\n")[0])
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return hashlib.sha256(raw).hexdigest()
