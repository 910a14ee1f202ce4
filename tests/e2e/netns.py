"""A private IPv4 LAN of Linux network namespaces, made and torn down by a test.

Every host (the cloud, each device) gets a network namespace of its own with ``lo``
up and one ``eth0``: a veth pair whose other end is a port of a bridge that lives
in yet another namespace. Nothing touches the root namespace's interfaces or routes,
and the subnet (``10.231.<random>.0/24``) exists only inside these namespaces, so
two tests building LANs at once cannot collide and no traffic leaves the machine.

Cutting a host's cable (:meth:`Lan.cut`) sets its bridge port down: the host keeps
its address and route, and what it sends is silently lost, like an unplugged cable
rather than a refused connection.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and the ``ip`` tool; :func:`require_netns`
raises :class:`NetnsError` with the reason when either is missing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The subnet's first two octets: a private range nothing else here uses.
SUBNET_PREFIX = "10.231"
_CMD_TIMEOUT_S = 30.0


class NetnsError(RuntimeError):
    """Network namespaces cannot be made here, or an ``ip`` command failed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ip = shutil.which("ip")
    if ip is None:
        raise NetnsError("the `ip` tool (iproute2) is not installed")
    res = subprocess.run(
        [ip, *args], capture_output=True, text=True, timeout=_CMD_TIMEOUT_S, check=False
    )
    if check and res.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


def require_netns() -> None:
    """Raise :class:`NetnsError` unless this process may create network namespaces."""
    probe = f"eflprobe{secrets.token_hex(3)}"
    _ip("netns", "add", probe)
    _ip("netns", "del", probe)


@dataclass
class Host:
    """One machine on the LAN: a namespace with ``eth0`` at ``address``."""

    name: str
    netns: str
    address: str
    #: The veth end in the bridge namespace (this host's port on the switch).
    bridge_port: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace.

        ``ip netns exec`` execs the command after entering the namespace, so the PID
        of the started process is the command's own PID (signals reach it directly).
        """
        return ["ip", "netns", "exec", self.netns, *argv]


@dataclass
class Lan:
    """A bridge in its own namespace and any number of hosts plugged into it."""

    token: str = field(default_factory=lambda: secrets.token_hex(2))
    third_octet: int = field(default_factory=lambda: secrets.randbelow(254) + 1)
    hosts: dict[str, Host] = field(default_factory=dict)
    _namespaces: list[str] = field(default_factory=list)

    @property
    def bridge_netns(self) -> str:
        return f"efl{self.token}-switch"

    @property
    def subnet(self) -> str:
        return f"{SUBNET_PREFIX}.{self.third_octet}.0/24"

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def start(self) -> Lan:
        """Create the switch (bridge ``br0`` in a namespace of its own)."""
        self._add_netns(self.bridge_netns)
        _ip("-n", self.bridge_netns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_netns, "link", "set", "br0", "up")
        return self

    def add_host(self, name: str) -> Host:
        """A new namespace plugged into the switch, with the next free address."""
        index = len(self.hosts) + 1
        host = Host(
            name=name,
            netns=f"efl{self.token}-{name}",
            address=f"{SUBNET_PREFIX}.{self.third_octet}.{index}",
            bridge_port=f"efl{self.token}p{index}",
        )
        self._add_netns(host.netns)
        inner = f"efl{self.token}h{index}"
        # Both ends are born in the root namespace and moved out at once; never leave
        # one behind there if moving fails.
        _ip("link", "add", inner, "type", "veth", "peer", "name", host.bridge_port)
        try:
            _ip("link", "set", inner, "netns", host.netns)
            _ip("link", "set", host.bridge_port, "netns", self.bridge_netns)
        except NetnsError:
            _ip("link", "del", inner, check=False)
            _ip("link", "del", host.bridge_port, check=False)
            raise
        _ip("-n", self.bridge_netns, "link", "set", host.bridge_port, "master", "br0", "up")
        _ip("-n", host.netns, "link", "set", inner, "name", "eth0")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        self.hosts[name] = host
        logger.info("host %s at %s in netns %s", name, host.address, host.netns)
        return host

    # -- faults ----------------------------------------------------------------------------

    def cut(self, host: Host) -> None:
        """Unplug ``host``: its switch port goes down, its packets are lost silently."""
        _ip("-n", self.bridge_netns, "link", "set", host.bridge_port, "down")

    def restore(self, host: Host) -> None:
        """Plug ``host`` back in."""
        _ip("-n", self.bridge_netns, "link", "set", host.bridge_port, "up")

    @contextlib.contextmanager
    def unplugged(self, host: Host) -> Iterator[None]:
        self.cut(host)
        try:
            yield
        finally:
            self.restore(host)

    # -- running things inside a host ------------------------------------------------------

    def python(self, host: Host, code: str, *args: str, timeout: float = 30.0) -> str:
        """Run ``code`` with this interpreter inside ``host``; returns its stdout."""
        res = subprocess.run(
            host.argv([sys.executable, "-c", textwrap.dedent(code), *args]),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
            check=False,
        )
        if res.returncode != 0:
            raise NetnsError(f"python in {host.name} failed ({res.returncode}):\n{res.stderr}")
        return res.stdout.strip()

    def can_connect(self, host: Host, address: str, port: int, *, timeout: float = 1.0) -> bool:
        """Whether a TCP connection from inside ``host`` to ``address:port`` succeeds."""
        code = """
            import socket, sys
            try:
                socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
                print("open")
            except OSError:
                print("closed")
        """
        return self.python(host, code, address, str(port), str(timeout)) == "open"

    def pids(self, host: Host) -> list[int]:
        """PIDs of the processes inside ``host``'s namespace."""
        res = _ip("netns", "pids", host.netns, check=False)
        return [int(p) for p in res.stdout.split()]

    # -- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        """Delete every link and namespace this LAN made.

        Processes a test left inside one of these namespaces (which only the test can
        have started) are SIGKILLed by PID first, so no namespace outlives the test.
        """
        for host in self.hosts.values():
            for pid in self.pids(host):
                logger.warning("process %d still in %s; killing it", pid, host.netns)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _ip("-n", self.bridge_netns, "link", "del", host.bridge_port, check=False)
        for name in reversed(self._namespaces):
            res = _ip("netns", "del", name, check=False)
            if res.returncode != 0:
                logger.error("could not delete netns %s: %s", name, res.stderr.strip())
        self._namespaces.clear()

    def __enter__(self) -> Lan:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def namespaces() -> list[str]:
    """Names of the network namespaces that exist now."""
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]
