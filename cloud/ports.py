"""Is a port free, and if not, who holds it: one clear line instead of a broker log."""

from __future__ import annotations

import socket
from typing import Any

from cloud.errors import CloudError
from edge.process import connect_host


class PortInUseError(CloudError, RuntimeError):
    """A port the cloud is configured to listen on is taken by another process."""


def port_holder(port: int) -> str | None:
    """``name (pid N)`` of the process listening on TCP ``port``, when it can be told."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return "another process"
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.Error:
                name = "a process"
            return f"{name} (pid {conn.pid})"
    return None


def check_port_free(host: str, port: int, *, what: str) -> None:
    """Raise :class:`PortInUseError` naming the holder when ``host:port`` cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return
        except OSError as exc:
            reason = exc.strerror or str(exc)
    holder = port_holder(port)
    by = f" by {holder}" if holder else ""
    raise PortInUseError(
        f"the {what} port {connect_host(host)}:{port} is already in use{by} ({reason}); "
        "stop that process or choose another port in cloud.toml"
    )


#: The ports ``edgefl cloud init`` writes into a plain (not --secure) ``cloud.toml``.
#: A secure fleet uses 8883 for MQTT over TLS (``devices.secure_fleet``).
DEFAULT_BROKER_PORT = 1883
DEFAULT_SUPERLINK_PORT = 9092
DEFAULT_WEB_PORT = 8080

_LOOPBACK = ("127.", "::1", "localhost")


def is_loopback(host: str) -> bool:
    return host.startswith(_LOOPBACK)


def remote_devices_reason(settings: Any) -> str | None:
    """Why devices outside this host may be configured, or None when all are local.

    Devices elsewhere are expected when the broker or the SuperLink listens beyond
    loopback, or when a secure fleet was initialised for a host name other than this
    host's loopback (``cloud init --secure --host …``): its bundles carry the ports.
    """
    for name, host in (("broker", settings.broker.host), ("superlink", settings.superlink.host)):
        if not is_loopback(host):
            return f"the {name} listens on {host}"
    try:
        from devices.secure_fleet import SecureFleet

        sf = SecureFleet.load(settings.data_dir)
    except Exception:  # no secure fleet (or an unreadable one: `cloud up` reports that)
        return None
    remote = [h for h in sf.hosts if not is_loopback(h)]
    if remote:
        return f"the secure fleet's devices reach the cloud as {', '.join(remote)}"
    return None


def ephemeral_port_problems(settings: Any) -> list[str]:
    """Port-0 settings that would strand devices on other hosts after a restart."""
    reason = remote_devices_reason(settings)
    if reason is None:
        return []
    return [
        f"{key} = 0 picks a new port at every start, but {reason}; set a fixed port "
        f"(edgefl cloud init writes {default})"
        for key, port, default in (
            (
                "broker.port",
                settings.broker.port if settings.broker.managed else 1,
                DEFAULT_BROKER_PORT,
            ),
            ("superlink.port", settings.superlink.port, DEFAULT_SUPERLINK_PORT),
        )
        if port == 0
    ]
