"""Real Debian root filesystems for boot tests: built with debootstrap, cached as tarballs.

A rootfs is built once per machine (``debootstrap --variant=minbase``, ≈75 s for amd64;
arm64 goes through ``--foreign`` and a second stage under qemu-user-static) and kept as
a tarball in :data:`CACHE_DIR`, outside the clone, so a second CI run on the same machine
only unpacks it. Each test unpacks its own copy.

A booted rootfs (:class:`Container`) runs under ``systemd-nspawn --boot`` with the
host's network namespace (the test's cloud on loopback is reachable) or a private one
(no network at all). Commands run inside it through ``nsenter`` into the container's
init, so no machined or D-Bus on the host is needed.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

#: Where rootfs tarballs and the pip cache shared by boot tests live (outside the clone).
CACHE_DIR = Path(os.environ.get("EDGEFL_TEST_CACHE", "/var/cache/edgefl-test"))
MIRROR = "http://deb.debian.org/debian"
#: Packages of the image besides minbase: what a cloud image of that family has.
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "cloud-init",
    "ca-certificates",
    "python3",
    "python3-venv",
    "iproute2",
    # debootstrap does not resolve virtual packages: python3-cryptography (cloud-init)
    # needs python3-cffi-backend-api-min, which this provides.
    "python3-cffi-backend",
)
TOOLS = ("debootstrap", "systemd-nspawn", "nsenter")


def missing_tools(extra: Sequence[str] = ()) -> list[str]:
    return [t for t in (*TOOLS, *extra) if shutil.which(t) is None]


def _run(cmd: list[str], *, timeout: float, log: Path) -> None:
    with log.open("ab") as fh:
        fh.write(f"\n$ {shlex.join(cmd)}\n".encode())
        fh.flush()
        res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    if res.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{shlex.join(cmd)} exited {res.returncode}:\n{tail}")


def ensure_binfmt(arch: str) -> None:
    """Make the kernel run ``arch`` binaries through qemu-user-static (binfmt_misc).

    Mounts binfmt_misc if needed and registers qemu-user-static's own entry
    (``/usr/lib/binfmt.d/qemu-ARCH.conf``; its ``F`` flag opens the interpreter now, so
    chroots need no copy of it).
    """
    mount = Path("/proc/sys/fs/binfmt_misc")
    if not (mount / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(mount)], check=True)
    entry = mount / f"qemu-{arch}"
    if entry.exists():
        return
    conf = Path(f"/usr/lib/binfmt.d/qemu-{arch}.conf")
    if not conf.is_file():
        raise RuntimeError(f"{conf} missing: install qemu-user-static")
    line = next(ln for ln in conf.read_text().splitlines() if ln.startswith(":"))
    with contextlib.suppress(FileExistsError):  # registered by someone else meanwhile
        (mount / "register").write_text(line)
    if not entry.exists():
        raise RuntimeError(f"binfmt_misc did not take the qemu-{arch} entry")


def debian_rootfs(
    suite: str = "bookworm",
    arch: str = "amd64",
    *,
    packages: Sequence[str] = BASE_PACKAGES,
    flavour: str = "v1",
    timeout: float = 1800,
) -> Path:
    """The cached tarball of a ``suite``/``arch`` rootfs with ``packages``, built if missing.

    ``flavour`` names the package set in the cache (change it when ``packages`` change).
    """
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tarball = CACHE_DIR / f"debian-{suite}-{arch}-{flavour}.tar"
    lock_path = CACHE_DIR / f".{tarball.name}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building it
        if tarball.exists():
            return tarball
        build = CACHE_DIR / f".build-{suite}-{arch}-{os.getpid()}"
        log = CACHE_DIR / f"debootstrap-{suite}-{arch}.log"
        log.write_text("")
        shutil.rmtree(build, ignore_errors=True)
        started = time.monotonic()
        try:
            include = ",".join(packages)
            foreign = arch not in ("amd64",)
            cmd = ["debootstrap", "--variant=minbase", f"--include={include}", f"--arch={arch}"]
            if foreign:
                ensure_binfmt({"arm64": "aarch64"}.get(arch, arch))
                cmd.append("--foreign")
            _run([*cmd, suite, str(build), MIRROR], timeout=timeout, log=log)
            if foreign:
                _run(
                    ["chroot", str(build), "/debootstrap/debootstrap", "--second-stage"],
                    timeout=timeout,
                    log=log,
                )
            (build / "etc/hostname").write_text("edgefl-device\n")
            (build / "etc/machine-id").write_text("")  # a fresh id at every first boot
            shutil.rmtree(build / "var/cache/apt/archives", ignore_errors=True)
            (build / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
            partial = tarball.with_suffix(".tar.partial")
            _run(
                ["tar", "-C", str(build), "--numeric-owner", "-cf", str(partial), "."],
                timeout=timeout,
                log=log,
            )
            partial.rename(tarball)
            logger.info("built %s in %.0f s", tarball, time.monotonic() - started)
        except BaseException:
            if (build / "debootstrap/debootstrap.log").exists():
                shutil.copyfile(
                    build / "debootstrap/debootstrap.log", log.with_suffix(".inner.log")
                )
            raise
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return tarball


def unpack(tarball: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["tar", "-C", str(dest), "--numeric-owner", "-xf", str(tarball)], check=True, timeout=600
    )
    return dest


def host_pip_config() -> tuple[str, list[Path]]:
    """The host's pip settings as one pip.conf for the rootfs, and host paths it names.

    The CA bundle is copied into the rootfs by :func:`install_host_pip_config` (so TLS
    verification stays on); other local paths (find-links directories, ``file://``
    indexes, constraint files) are bind-mounted read-only at the same place.
    """
    res = subprocess.run(
        ["python3", "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    )
    values: dict[str, str] = {}
    for line in res.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("global."):
            values[key.removeprefix("global.")] = value.strip().strip("'\"")
    for var, key in (
        ("PIP_INDEX_URL", "index-url"),
        ("PIP_EXTRA_INDEX_URL", "extra-index-url"),
        ("PIP_FIND_LINKS", "find-links"),
        ("PIP_DEFAULT_TIMEOUT", "timeout"),
    ):
        if os.environ.get(var):
            values.setdefault(key, os.environ[var])
    values.pop("cert", None)
    binds: list[Path] = []
    for key, value in values.items():
        for item in value.split():
            path = Path(item.removeprefix("file://"))
            if (item.startswith("/") or item.startswith("file:///")) and path.exists():
                # A simple index links its files relative to it (``../../files/...``).
                binds.append(path.parent if key.endswith("index-url") else path)
            elif key in ("find-links", "constraint") and not item.startswith("http"):
                values[key] = " ".join(v for v in values[key].split() if v != item)
    cfg = configparser.ConfigParser()
    cfg["global"] = {k: v for k, v in values.items() if v}
    cfg["global"]["cert"] = "/etc/ssl/certs/edgefl-host-ca.crt"
    lines = [f"{k} = {v}" for k, v in cfg["global"].items()]
    return "[global]\n" + "\n".join(lines) + "\n", sorted(set(binds))


def install_host_pip_config(root: Path) -> list[Path]:
    """Write the host's pip configuration and CA bundle into ``root``; return paths to bind."""
    text, binds = host_pip_config()
    (root / "etc/pip.conf").write_text(text)
    host_ca = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))
    shutil.copyfile(host_ca, root / "etc/ssl/certs/edgefl-host-ca.crt")
    return binds


class Container:
    """A rootfs booted with ``systemd-nspawn --boot``; stop it with :meth:`stop`."""

    def __init__(
        self,
        root: Path,
        *,
        name: str,
        network: bool = True,
        binds_ro: Sequence[Path] = (),
        binds: Sequence[tuple[Path, str]] = (),
        log: Path,
    ) -> None:
        self.root = root
        self.name = name
        self.network = network
        self.binds_ro = list(binds_ro)
        self.binds = list(binds)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Container:
        cmd = [
            "systemd-nspawn",
            "--boot",
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--console=pipe",
            f"--machine={self.name}",
            f"--directory={self.root}",
        ]
        if not self.network:
            cmd.append("--private-network")
        cmd += [f"--bind-ro={p}" for p in self.binds_ro]
        cmd += [f"--bind={host}:{inside}" for host, inside in self.binds]
        self._log_fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log_fh, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode}: {self.tail()}")
            if self._leader() is not None and self.run(["true"], check=False).returncode == 0:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the container did not come up in 120 s: {self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def _leader(self) -> int | None:
        """The container's init: the child of systemd-nspawn (or of its helper)."""
        assert self.proc is not None
        pid = self.proc.pid
        for _ in range(3):
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                return None
            if not children:
                return None
            pid = int(children[0])
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                return None
            if comm == "systemd":
                return pid
        return None

    def run(
        self, cmd: Sequence[str], *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the container (all its namespaces, its root)."""
        leader = self._leader()
        if leader is None:
            raise RuntimeError("the container is not running")
        res = subprocess.run(
            ["nsenter", "-t", str(leader), "-m", "-u", "-i", "-n", "-p", "--", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        if check and res.returncode != 0:
            raise RuntimeError(
                f"{shlex.join(cmd)} exited {res.returncode}: {res.stdout}{res.stderr}"
            )
        return res

    def wait_for(
        self, cmd: Sequence[str], *, timeout: float, what: str, expect: str | None = None
    ) -> str:
        """Rerun ``cmd`` until it exits 0 (and prints ``expect``); return its output."""
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            res = self.run(cmd, check=False)
            out = res.stdout + res.stderr
            if res.returncode == 0 and (expect is None or expect in out):
                return res.stdout
            time.sleep(2)
        raise AssertionError(f"{what}: not reached in {timeout:.0f} s; last output: {out}")

    def stop(self, timeout: float = 90) -> None:
        """Shut the container down (SIGTERM to nspawn = a clean poweroff), kill if stuck."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log_fh.close()
        self.proc = None
