"""nginx in front of the Flower SuperLink: the fleet port serves only the Fleet API.

Flower 1.42 serves its Control API (``/v1/control/…``: submit, stop and list runs,
register and unregister SuperNodes), its Fleet API (``/v1/fleet/…``: what SuperNodes
call) and its Runtime API (``/v1/runtime/…``: what ServerApp processes call) from one
HTTP server, and open-source Flower has no authentication for the Control API. So the
SuperLink must not face the network itself. With the proxy on, ``edgefl cloud up``:

* binds the SuperLink to loopback on a port of its own (``proxy.superlink_port``): the
  operator's path, used by ``cloud up`` itself, ``devices flash``/``revoke`` and the
  ServerApp's runtime connection;
* starts nginx (Debian package ``nginx``) on the fleet address devices know
  (``superlink.host:superlink.port``), terminating TLS with the SuperLink's
  certificate, and forwards exactly the Fleet API's routes (``POST`` only) to the
  SuperLink over TLS verified against the fleet CA;
* answers every other request with ``403`` and a JSON ``detail`` that the ``flwr``
  CLI prints, and writes one JSON line per request to ``access.log``, from which
  :meth:`FleetProxy.refusals` reads the refused ones (``cloud up`` records them as
  registry events).

SuperNodes authenticate with signed request headers (Flower's
``--enable-supernode-auth``), which nginx passes through unchanged. Flower's SuperNode
cannot present a TLS client certificate, so the proxy does not ask for one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cloud.errors import CloudError
from edge.process import ManagedProcess, ProcessError, connect_host

logger = logging.getLogger(__name__)

#: Every route of Flower 1.42's Fleet API (``flwr.superlink.routers.fleet.router``).
FLEET_ROUTES = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
#: What a refused request is told (the ``flwr`` CLI prints ``detail``).
REFUSAL_DETAIL = (
    "edgefl: this port serves only the Flower Fleet API (SuperNodes); "
    "run control (run, stop, list, supernode register/unregister) is only available "
    "to the operator on the cloud host"
)
#: Largest request body forwarded (Fleet messages carry model weights).
DEFAULT_MAX_BODY_MB = 256
#: Seconds nginx waits for the SuperLink's answer to one Fleet call.
UPSTREAM_TIMEOUT_S = 300


class ProxyError(CloudError, RuntimeError):
    """nginx is missing, misconfigured or did not start."""


def nginx_binary() -> str:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ProxyError("the nginx binary was not found; install it with `sudo apt-get install nginx`")


def nginx_version(binary: str | None = None) -> str:
    """The version nginx reports (e.g. ``1.22.1``)."""
    res = subprocess.run(
        [binary or nginx_binary(), "-v"], capture_output=True, text=True, timeout=10
    )
    match = re.search(r"nginx/(\S+)", res.stderr + res.stdout)
    if not match:
        raise ProxyError(f"cannot read the nginx version from: {res.stderr[:200]!r}")
    return match.group(1)


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


@dataclass
class ProxyConfig:
    """What goes into a generated ``nginx.conf``."""

    #: Where devices connect (the fleet address).
    listen_port: int
    #: The SuperLink on loopback.
    upstream_port: int
    listen_host: str = "127.0.0.1"
    upstream_host: str = "127.0.0.1"
    data_dir: Path = field(default_factory=lambda: Path("proxy"))
    #: TLS certificate and key served to devices; None serves plain HTTP.
    certfile: Path | None = None
    keyfile: Path | None = None
    #: CA that signed the SuperLink's certificate (verifies the upstream TLS).
    upstream_ca: Path | None = None
    #: Name checked in the SuperLink's certificate (its certificates cover localhost).
    upstream_name: str = "localhost"
    max_body_mb: int = DEFAULT_MAX_BODY_MB

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    @property
    def access_log(self) -> Path:
        return self.data_dir / "access.log"

    @property
    def error_log(self) -> Path:
        return self.data_dir / "error.log"

    def render(self) -> str:
        if self.tls and self.keyfile is None:
            raise ProxyError("TLS needs both certfile and keyfile")
        d = self.data_dir
        listen_host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        scheme = "https" if self.tls else "http"
        refusal = json.dumps({"detail": REFUSAL_DETAIL})
        routes = "|".join(FLEET_ROUTES)
        lines = [
            "# Generated by edgefl (cloud/proxy.py); edit the edgefl configuration instead.",
            f"user {_current_user()};",
            "daemon off;",
            "worker_processes 1;",
            f"pid {d / 'nginx.pid'};",
            f"error_log {self.error_log} notice;",
            "events { worker_connections 1024; }",
            "http {",
            "    log_format edgefl escape=json",
            '        \'{"time":"$time_iso8601","remote":"$remote_addr",'
            '"method":"$request_method","uri":"$uri","status":$status,'
            '"upstream":"$upstream_addr"}\';',
            f"    access_log {self.access_log} edgefl;",
            f"    client_body_temp_path {d / 'tmp' / 'body'};",
            f"    proxy_temp_path {d / 'tmp' / 'proxy'};",
            f"    fastcgi_temp_path {d / 'tmp' / 'fastcgi'};",
            f"    uwsgi_temp_path {d / 'tmp' / 'uwsgi'};",
            f"    scgi_temp_path {d / 'tmp' / 'scgi'};",
            f"    client_max_body_size {self.max_body_mb}m;",
            "    server_tokens off;",
            "    server {",
            f"        listen {listen_host}:{self.listen_port}{' ssl' if self.tls else ''};",
        ]
        if self.tls:
            lines += [
                f"        ssl_certificate {self.certfile};",
                f"        ssl_certificate_key {self.keyfile};",
                "        ssl_protocols TLSv1.2 TLSv1.3;",
            ]
        lines += [
            f"        location ~ ^/v1/fleet/({routes})$ {{",
            "            limit_except POST { deny all; }",
            f"            proxy_pass {scheme}://{self.upstream_host}:{self.upstream_port};",
            "            proxy_http_version 1.1;",
            '            proxy_set_header Connection "";',
            "            proxy_request_buffering off;",
            "            proxy_buffering off;",
            f"            proxy_read_timeout {UPSTREAM_TIMEOUT_S}s;",
            f"            proxy_send_timeout {UPSTREAM_TIMEOUT_S}s;",
        ]
        if self.tls:
            if self.upstream_ca is None:
                raise ProxyError("a TLS proxy needs the CA of the SuperLink's certificate")
            lines += [
                "            proxy_ssl_verify on;",
                f"            proxy_ssl_trusted_certificate {self.upstream_ca};",
                f"            proxy_ssl_name {self.upstream_name};",
                "            proxy_ssl_server_name on;",
            ]
        lines += [
            "        }",
            "        location / {",
            "            default_type application/json;",
            f"            return 403 '{refusal}';",
            "        }",
            "    }",
            "}",
            "",
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class Refusal:
    """One request the proxy refused (a line of its access log)."""

    time: str
    remote: str
    method: str
    uri: str
    status: int
    #: Where nginx forwarded the request ("" when it answered itself).
    upstream: str = ""

    def describe(self) -> str:
        return f"{self.method} {self.uri} from {self.remote} refused ({self.status})"


class FleetProxy:
    """A running nginx for one :class:`ProxyConfig`."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.conf_path = config.data_dir / "nginx.conf"
        self.process: ManagedProcess | None = None
        self._log_offset = 0

    @property
    def address(self) -> str:
        """Where devices on this host reach the fleet port."""
        host = connect_host(self.config.listen_host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def port(self) -> int:
        return self.config.listen_port

    def start(self, *, timeout: float = 15.0) -> FleetProxy:
        c = self.config
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (c.data_dir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(c.render())
        binary = nginx_binary()
        check = subprocess.run(
            [
                binary,
                "-t",
                "-q",
                "-p",
                str(c.data_dir),
                "-e",
                str(c.error_log),
                "-c",
                str(self.conf_path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            raise ProxyError(f"nginx refused its configuration {self.conf_path}:\n{check.stderr}")
        if self.process is None:
            # Refusals logged by an earlier `cloud up` were reported then; after a
            # restart of this proxy, reading goes on where it stopped.
            self._log_offset = c.access_log.stat().st_size if c.access_log.exists() else 0
        started_at = c.error_log.stat().st_size if c.error_log.exists() else 0
        self.process = ManagedProcess(
            "nginx",
            [binary, "-p", str(c.data_dir), "-e", str(c.error_log), "-c", str(self.conf_path)],
            log_path=c.data_dir / "stdout.log",
        )
        # Held before it starts: an interrupt right after the fork still finds it to stop.
        self.process.start()
        try:
            # A port another process holds makes nginx retry, then exit; wait for its workers.
            self.process.wait_until(
                lambda: "start worker process" in self._error_log_since(started_at),
                timeout=timeout,
                what="running",
            )
            self.process.wait_for_port(c.listen_host, c.listen_port, timeout=timeout)
        except ProcessError as exc:
            self.process.stop()
            raise ProxyError(f"{exc}\n{self._error_log_since(started_at)[-2000:]}") from exc
        logger.info(
            "nginx serving the Fleet API on %s, SuperLink on %s:%d (pid %d)",
            self.address,
            c.upstream_host,
            c.upstream_port,
            self.process.pid,
        )
        return self

    def _error_log_since(self, offset: int) -> str:
        try:
            with open(self.config.error_log, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def restart(self, *, timeout: float = 15.0) -> None:
        self.stop()
        self.start(timeout=timeout)

    def refusals(self) -> list[Refusal]:
        """Requests refused since the last call (or since start)."""
        path = self.config.access_log
        try:
            with open(path, "rb") as fh:
                fh.seek(self._log_offset)
                data = fh.read()
        except OSError:
            return []
        # Keep a partly written last line for the next call.
        end = data.rfind(b"\n") + 1
        self._log_offset += end
        # The proxy's own 403s; a 403 the SuperLink gave a forwarded Fleet call is not one.
        return [r for r in _parse_access_lines(data[:end]) if r.status == 403 and not r.upstream]

    def __enter__(self) -> FleetProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parse_access_lines(data: bytes) -> Iterator[Refusal]:
    for line in data.decode(errors="replace").splitlines():
        try:
            doc = json.loads(line)
            yield Refusal(
                time=str(doc["time"]),
                remote=str(doc["remote"]),
                method=str(doc["method"]),
                uri=str(doc["uri"])[:200],
                status=int(doc["status"]),
                upstream=str(doc.get("upstream", "")),
            )
        except (ValueError, KeyError, TypeError):
            logger.debug("unreadable proxy access log line: %r", line[:200])


def running_proxy(data_dir: Path) -> str | None:
    """What the fleet proxy of the cloud in ``data_dir`` does, if it runs (for doctor)."""
    proxy_dir = Path(data_dir) / "proxy"
    try:
        pid = int((proxy_dir / "nginx.pid").read_text().strip())
        port = int((proxy_dir / "port").read_text().strip())
        upstream = int((Path(data_dir) / "superlink.port").read_text().strip())
        with open(f"/proc/{pid}/comm") as fh:
            if "nginx" not in fh.read():
                return None
    except (OSError, ValueError):
        return None
    return f"pid {pid}, fleet port {port} -> SuperLink 127.0.0.1:{upstream} (Fleet API only)"
