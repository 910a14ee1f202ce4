"""The fleet PKI: certificates that real TLS stacks accept, device keys that Flower loads."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devices import pki
from devices.secure_fleet import init_secure


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return pki.create_ca("test fleet CA")


def test_server_certificate_names_hosts_and_loopback(ca) -> None:
    ca_cert, ca_key = ca
    cert, _ = pki.issue_server_certificate(
        ca_cert, ca_key, common_name="broker", hosts=["cloud.example", "10.1.2.3"]
    )
    assert sorted(pki.certificate_hosts(cert)) == sorted(
        ["cloud.example", "localhost", "10.1.2.3", "127.0.0.1"]
    )
    cert.verify_directly_issued_by(ca_cert)
    assert pki.covers_host(cert, "127.0.0.1")
    assert not pki.covers_host(cert, "other.example")
    basic = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is True


def test_bad_host_is_rejected(ca) -> None:
    ca_cert, ca_key = ca
    with pytest.raises(pki.PKIError, match="neither an IP address nor a DNS name"):
        pki.issue_server_certificate(ca_cert, ca_key, common_name="x", hosts=["bad host/x"])


def _tls_handshake(tmp_path: Path, ca, server_name: str) -> None:
    """Serve one TLS handshake on loopback with a CA-issued cert; connect as ``server_name``."""
    ca_cert, ca_key = ca
    cert, key = pki.issue_server_certificate(ca_cert, ca_key, common_name="srv", hosts=[])
    pki.write_certificate(tmp_path / "srv.pem", cert)
    pki.write_private_key(tmp_path / "srv.key", key)
    pki.write_certificate(tmp_path / "ca.pem", ca_cert)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            tls.sendall(b"x")
    finally:
        thread.join(timeout=10)
        listener.close()


def test_python_tls_accepts_the_certificate_on_loopback(tmp_path: Path, ca) -> None:
    _tls_handshake(tmp_path, ca, "127.0.0.1")


def test_python_tls_refuses_a_name_the_certificate_lacks(tmp_path: Path, ca) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(tmp_path, ca, "not-the-broker.example")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # typer/click, inside flwr
def test_device_key_is_what_flower_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    key = pki.generate_key()
    private = pki.device_private_key_openssh(key)
    public = pki.device_public_key_openssh(key, comment="edgefl:f:dev")
    loaded = serialization.load_ssh_private_key(private, None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert isinstance(loaded.curve, ec.SECP384R1)
    (tmp_path / "k.pub").write_bytes(public)
    assert try_load_public_key(tmp_path / "k.pub")  # what `flwr supernode register` does
    assert pki.public_key_fingerprint(public) == pki.public_key_fingerprint(
        pki.device_public_key_openssh(key)
    )


def test_secrets_are_created_0600(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "secret"
    old = os.umask(0)
    try:
        pki.write_secret(path, b"s3cret")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(path.parent.glob(".*tmp*"))


def test_init_secure_is_idempotent_and_keeps_the_ca(tmp_path: Path) -> None:
    sf = init_secure(tmp_path / "cloud", fleet="f1", hosts=["cloud.lan"])
    secret_files = [
        sf.ca_key,
        sf.broker_keyfile,
        sf.superlink_keyfile,
        sf.broker_password_file,
        sf.cloud_password_file,
        sf.signing_private_key,
        sf.acl_file,
    ]
    for path in secret_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    ca_before = sf.ca_cert.read_bytes()
    password = sf.cloud_password()
    signing_before = sf.signing_public_key.read_bytes()
    broker_before = sf.broker_certfile.read_bytes()

    again = init_secure(tmp_path / "cloud", fleet="f1", hosts=["cloud.lan"])
    assert again.broker_certfile.read_bytes() == broker_before  # nothing to reissue

    third = init_secure(tmp_path / "cloud", fleet="f1", hosts=["10.0.0.7"])
    assert third.ca_cert.read_bytes() == ca_before
    assert third.cloud_password() == password
    assert third.signing_public_key.read_bytes() == signing_before
    reissued = pki.load_certificate(third.broker_certfile)
    assert {"cloud.lan", "10.0.0.7", "127.0.0.1"} <= set(pki.certificate_hosts(reissued))
    reissued.verify_directly_issued_by(pki.load_certificate(third.ca_cert))
    assert third.broker_password_file.read_text().startswith("cloud:$7$")
