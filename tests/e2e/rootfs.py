"""Real Debian root filesystems for boot tests: built with debootstrap, cached as tarballs.

A rootfs is built once per machine (``debootstrap --variant=minbase``, ≈75 s for amd64)
and kept as a tarball in :data:`CACHE_DIR`, outside the clone, so a second CI run on the
same machine only unpacks it. Each test unpacks its own copy.

A foreign architecture (arm64) goes through ``debootstrap --foreign``. Its second stage
(every package's maintainer scripts, run under qemu-user-static) took over 4 minutes here
and was not half done, so by default it is not run: every downloaded package is unpacked
with ``dpkg-deb -x`` instead (:func:`debian_rootfs` ``configure=False``). That gives the
image's real arm64 binaries and libraries (enough to run its Python and pip), but no
package is configured: nothing that needs a booted, configured system (systemd) runs in it.

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
from collections.abc import Iterator, Sequence
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


#: The oldest qemu-user that runs LiteRT: 7.2 (bookworm's) crashes itself (a host
#: SIGSEGV in qemu) while LiteRT 2.3.0 creates an interpreter; 10.0 runs it.
QEMU_MIN_VERSION = (8, 0)
#: What the kernel's ELF header test for an aarch64 binary is (qemu's own binfmt entry).
_AARCH64_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
_AARCH64_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"


def qemu_version(binary: Path) -> tuple[int, ...]:
    """``qemu-ARCH --version``'s version as integers, e.g. ``(10, 0, 2)``."""
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    words = out.split()
    if len(words) < 3 or words[1] != "version":
        raise RuntimeError(f"{binary} --version said {out[:200]!r}")
    return tuple(int(part) for part in words[2].split(".") if part.isdigit())


def _host_codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("/etc/os-release names no VERSION_CODENAME")


def qemu_aarch64(timeout: float = 900) -> Path:
    """A static ``qemu-aarch64`` of at least :data:`QEMU_MIN_VERSION`.

    The system's ``qemu-aarch64-static`` when it is new enough (Debian 13 has 10.0);
    otherwise Debian's ``qemu-user`` from the host release's backports (bookworm:
    10.0), fetched once with apt into :data:`CACHE_DIR` through a private source list
    and package lists (signed by the Debian archive key; the machine's apt sources are
    not touched) and unpacked with ``dpkg-deb -x``. Its binaries are static.
    """
    system = shutil.which("qemu-aarch64-static")
    if system and qemu_version(Path(system)) >= QEMU_MIN_VERSION:
        return Path(system)
    codename = _host_codename()
    dest = CACHE_DIR / f"qemu-user-{codename}-backports"
    binary = dest / "usr/bin/qemu-aarch64"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / f".{dest.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file() and qemu_version(binary) >= QEMU_MIN_VERSION:
            return binary
        work = CACHE_DIR / f".apt-{codename}-backports"
        shutil.rmtree(work, ignore_errors=True)
        (work / "lists/partial").mkdir(parents=True)
        (work / "archives/partial").mkdir(parents=True)
        sources = work / "sources.list"
        sources.write_text(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
            f"{MIRROR} {codename}-backports main\n"
        )
        apt = [
            "apt-get",
            "-q",
            "-o",
            f"Dir::Etc::SourceList={sources}",
            "-o",
            "Dir::Etc::SourceParts=/nonexistent",
            "-o",
            f"Dir::State::Lists={work / 'lists'}",
            "-o",
            f"Dir::Cache::Archives={work / 'archives'}",
        ]
        log = CACHE_DIR / f"{dest.name}.log"
        log.write_text("")
        _run([*apt, "update"], timeout=timeout, log=log)
        _run(
            [
                *apt,
                "--download-only",
                "--no-install-recommends",
                "-y",
                "--reinstall",
                "install",
                f"qemu-user/{codename}-backports",
            ],
            timeout=timeout,
            log=log,
        )
        debs = sorted((work / "archives").glob("qemu-user_*.deb"))
        if not debs:
            raise RuntimeError(f"apt fetched no qemu-user from {codename}-backports: see {log}")
        build = CACHE_DIR / f".build-{dest.name}"
        shutil.rmtree(build, ignore_errors=True)
        _run(["dpkg-deb", "-x", str(debs[-1]), str(build)], timeout=timeout, log=log)
        shutil.rmtree(dest, ignore_errors=True)
        build.rename(dest)
        shutil.rmtree(work, ignore_errors=True)
    found = qemu_version(binary)
    if found < QEMU_MIN_VERSION:
        raise RuntimeError(f"{codename}-backports has qemu-user {found}, older than needed")
    return binary


@contextlib.contextmanager
def aarch64_binfmt(qemu: Path) -> Iterator[None]:
    """Run aarch64 binaries through ``qemu`` while the block runs.

    The system's own entry (``qemu-aarch64``) is used when it already points at
    ``qemu``. Otherwise an ``edgefl-qemu-aarch64`` entry is registered for the block and
    removed after it: the kernel tries the newest entry first, so it wins over an older
    system entry without changing it. Its ``F`` flag opens ``qemu`` at registration, so
    nspawn containers need no copy; ``P`` passes argv[0] on, which qemu honours when
    called by its ``-binfmt-P`` name (Debian's symlink, next to the binary).
    """
    mount = Path("/proc/sys/fs/binfmt_misc")
    if not (mount / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(mount)], check=True)
    system = mount / "qemu-aarch64"
    if system.exists() and qemu.name == "qemu-aarch64-static":
        ensure_binfmt("aarch64")
        yield
        return
    preserve = qemu.parent.parent / "libexec/qemu-binfmt/aarch64-binfmt-P"
    interpreter, flags = (preserve, "OPF") if preserve.exists() else (qemu, "OF")
    entry = mount / "edgefl-qemu-aarch64"
    if entry.exists():
        entry.write_text("-1")  # a leftover of a killed run: ours to replace
    (mount / "register").write_text(
        f":{entry.name}:M::{_AARCH64_MAGIC}:{_AARCH64_MASK}:{interpreter}:{flags}"
    )
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            entry.write_text("-1")


def debian_rootfs(
    suite: str = "bookworm",
    arch: str = "amd64",
    *,
    packages: Sequence[str] = BASE_PACKAGES,
    flavour: str = "v1",
    configure: bool = True,
    timeout: float = 1800,
) -> Path:
    """The cached tarball of a ``suite``/``arch`` rootfs with ``packages``, built if missing.

    ``flavour`` names the package set in the cache (change it when ``packages`` change).
    ``configure=False`` (foreign architectures only) unpacks the packages without running
    debootstrap's second stage (see the module docstring).
    """
    foreign = arch not in ("amd64",)
    if not configure and not foreign:
        raise ValueError("configure=False is for foreign architectures (no second stage)")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    kind = "" if configure else "-unpacked"
    tarball = CACHE_DIR / f"debian-{suite}-{arch}{kind}-{flavour}.tar"
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
            cmd = ["debootstrap", "--variant=minbase", f"--include={include}", f"--arch={arch}"]
            if foreign:
                ensure_binfmt({"arm64": "aarch64"}.get(arch, arch))
                cmd.append("--foreign")
            _run([*cmd, suite, str(build), MIRROR], timeout=timeout, log=log)
            if foreign and configure:
                _run(
                    ["chroot", str(build), "/debootstrap/debootstrap", "--second-stage"],
                    timeout=timeout,
                    log=log,
                )
            elif foreign:
                for deb in sorted((build / "var/cache/apt/archives").glob("*.deb")):
                    _run(["dpkg-deb", "-x", str(deb), str(build)], timeout=timeout, log=log)
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


def run_in(
    root: Path,
    cmd: Sequence[str],
    *,
    timeout: float,
    binds_ro: Sequence[Path] = (),
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in ``root`` with ``systemd-nspawn`` (its own /proc and /dev, no boot).

    A foreign architecture's binaries run through qemu-user-static (:func:`ensure_binfmt`).
    """
    argv = [
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--pipe",
        f"--directory={root}",
        *[f"--bind-ro={p}" for p in binds_ro],
        "--setenv=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--",
        *cmd,
    ]
    res = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    if check and res.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(cmd)} in {root} exited {res.returncode}:\n"
            f"{res.stdout[-3000:]}{res.stderr[-3000:]}"
        )
    return res
