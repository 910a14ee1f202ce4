"""``edgefl cloud bridge-config``: a regional broker's mosquitto.conf, and clear errors.

The e2e test (tests/e2e/test_bridges.py) runs Mosquitto with what this command writes;
here its options and its errors are checked, in-process through the real parser except
one run of the installed ``edgefl`` script.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edge.cli import main

EDGEFL = str(Path(sys.executable).parent / "edgefl")


def test_writes_the_listener_persistence_and_bridge_with_credentials_and_tls(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "bridge.password"
    secret.write_text("s3cret-pw\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed here\n")
    out = tmp_path / "eu.conf"
    data = tmp_path / "eu-data"
    proc = subprocess.run(
        [
            EDGEFL,
            "cloud",
            "bridge-config",
            "--region",
            "eu",
            "--fleet",
            "lab",
            "--cloud-broker",
            "cloud.internal:8883",
            "--listen",
            "127.0.0.1:1884",
            "--data-dir",
            str(data),
            "--username",
            "bridge-eu",
            "--password-file",
            str(secret),
            "--cafile",
            str(ca),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    lines = out.read_text().splitlines()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # it holds the bridge's password
    assert data.is_dir()
    for line in (
        "listener 1884 127.0.0.1",
        "allow_anonymous true",
        f"persistence_location {data}/",
        "connection edgefl-bridge-eu",
        "address cloud.internal:8883",
        "remote_username bridge-eu",
        "remote_password s3cret-pw",
        f"bridge_cafile {ca}",
        "topic edgefl/lab/release/# in 1",
        "topic edgefl/lab/device/# out 1",
    ):
        assert line in lines


def test_device_credentials_make_the_regional_listener_closed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    passwd.write_text("d1:$7$...\n")
    acl.write_text("user d1\n")
    argv = ["cloud", "bridge-config", "--region", "us", "--fleet", "lab"]
    argv += ["--cloud-broker", "cloud.internal:1883", "--data-dir", str(tmp_path / "us")]
    assert main([*argv, "--device-passwd", str(passwd), "--device-acl", str(acl)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "allow_anonymous false" in lines
    assert f"password_file {passwd}" in lines and f"acl_file {acl}" in lines
    assert "address cloud.internal:1883" in lines
    assert "listener 1883 0.0.0.0" in lines  # the default: the region's devices connect


@pytest.mark.parametrize(
    ("extra", "code", "says"),
    [
        (["--cloud-broker", "cloud.internal"], 2, "is not HOST:PORT"),
        (["--cloud-broker", "cloud.internal:99999"], 2, "not within 1..65535"),
        (["--cloud-broker", "cloud.internal:mqtt"], 2, "is not a number"),
        (["--cloud-broker", "::1:1883"], 2, "use a host name or an IPv4 address"),
        (["--username", "u", "--password-file", "/nonexistent/pw"], 1, "no such file"),
        (["--cafile", "/nonexistent/ca.pem"], 1, "--cafile /nonexistent/ca.pem: no such file"),
        (["--username", "bridge-eu"], 1, "--username and --password-file go together"),
        (["--region", "eu/#"], 1, "region"),
        (["--keepalive", "1"], 1, "keepalive 1 s is not within 5..65535"),
        (["--message-size-limit", "-1"], 1, "is negative"),
    ],
)
def test_bad_options_get_one_clear_line_and_write_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    code: int,
    says: str,
) -> None:
    base = ["--region", "eu", "--fleet", "lab", "--cloud-broker", "127.0.0.1:1883"]
    base += ["--data-dir", str(tmp_path / "data"), "--output", str(tmp_path / "out.conf")]
    try:
        got = main(["cloud", "bridge-config", *base, *extra])
    except SystemExit as exc:  # argparse: usage and the error, exit code 2
        got = int(exc.code or 0)
    err = capsys.readouterr().err
    assert got == code
    assert says in err
    assert "Traceback" not in err
    assert not (tmp_path / "out.conf").exists()
