"""Flower processes: the SuperLink (cloud) and a SuperNode (device), Flower 1.42.

Both are started as child processes with the flags measured in DESIGN.md: one HTTP
port for the SuperLink's Fleet/Control/Runtime APIs, a distinct runtime port per
SuperNode, a private ``FLWR_HOME`` per process tree, telemetry off, and no runtime
``uv sync`` (which fails offline).

This module lives in ``edge`` because a device runs the SuperNode; the cloud imports
it for the SuperLink. It imports nothing from Flower itself: it only runs the CLIs.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import EdgeError
from edge.process import ManagedProcess, ProcessError, connect_host, free_port, tool_env

logger = logging.getLogger(__name__)

#: Tries :meth:`SuperNode.start_with_retries` makes before it gives up.
START_ATTEMPTS = 3


class FlowerError(EdgeError, RuntimeError):
    """A Flower process did not start, or a Flower CLI call failed."""


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def write_flwr_config(
    flwr_home: Path,
    *,
    address: str,
    name: str = "edgefl",
    root_certificates: Path | None = None,
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` naming one SuperLink connection ``name``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{name}"',
        "",
        f"[superlink.{name}]",
        f'address = "{address}"',
    ]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{root_certificates}"')
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class SuperLinkTLS:
    certfile: Path
    keyfile: Path
    ca_certfile: Path


@dataclass
class SuperLink:
    """A Flower SuperLink on ``host:port`` with its state in ``data_dir``."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    tls: SuperLinkTLS | None = None
    enable_supernode_auth: bool = False
    persistent_state: bool = True
    process: ManagedProcess | None = None

    @property
    def address(self) -> str:
        """Where local clients (flwr CLI, SuperNodes on this host) reach the SuperLink."""
        host = connect_host(self.host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def flwr_home(self) -> Path:
        return self.data_dir / "flwr-home"

    def env(self) -> dict[str, str]:
        return {"FLWR_HOME": str(self.flwr_home), "FLWR_TELEMETRY_ENABLED": "0"}

    def argv(self) -> list[str]:
        argv = [
            _bin("flower-superlink"),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if self.persistent_state:
            argv += ["--database", str(self.data_dir / "superlink-state.db")]
        if self.tls is None:
            argv.append("--insecure")
        else:
            argv += [
                "--ssl-certfile",
                str(self.tls.certfile),
                "--ssl-keyfile",
                str(self.tls.keyfile),
                "--ssl-ca-certfile",
                str(self.tls.ca_certfile),
            ]
        if self.enable_supernode_auth:
            if self.tls is None:
                raise FlowerError("SuperNode authentication requires TLS on the SuperLink")
            argv.append("--enable-supernode-auth")
        return argv

    def start(self, *, timeout: float = 60.0) -> SuperLink:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        write_flwr_config(
            self.flwr_home,
            address=self.address,
            root_certificates=None if self.tls is None else self.tls.ca_certfile,
        )
        self.process = ManagedProcess(
            "flower-superlink",
            self.argv(),
            log_path=self.data_dir / "superlink.log",
            env=self.env(),
        )
        # Held before it starts: an interrupt right after the fork still finds it to stop.
        self.process.start()
        try:
            self.process.wait_for_port(self.host, self.port, timeout=timeout)
        except ProcessError as exc:
            self.process.stop()
            raise FlowerError(str(exc)) from exc
        logger.info("Flower SuperLink on %s (pid %d)", self.address, self.process.pid)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this SuperLink (its private FLWR_HOME)."""
        return subprocess.run(
            [_bin("flwr"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=tool_env(self.env()),
        )

    def flwr_json(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        """``flwr ARGS --format json`` against this SuperLink: the document it printed.

        The one wrapper of Flower's JSON CLI: raises :class:`FlowerError` when the call
        times out, prints no JSON object, or reports ``"success": false`` (with Flower's
        ``error-message``).
        """
        what = f"flwr {' '.join(args[:2])}"
        try:
            res = self.flwr(*args, "--format", "json", timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise FlowerError(f"{what}: no answer within {timeout:.0f} s") from exc
        try:
            doc = json.loads(res.stdout)
        except ValueError as exc:
            raise FlowerError(f"{what}: {res.stdout[-800:]} {res.stderr[-800:]}") from exc
        if not isinstance(doc, dict):
            raise FlowerError(f"{what}: unexpected output {res.stdout[-800:]}")
        if not doc.get("success"):
            raise FlowerError(f"{what} failed: {doc.get('error-message', doc)}")
        return doc

    def nodes(self) -> list[dict[str, object]]:
        """The SuperNodes the SuperLink knows, as ``flwr supernode list`` reports them."""
        return list(self.flwr_json("supernode", "list", "edgefl").get("nodes", []))

    def online_node_ids(self) -> list[str]:
        return [str(n["node-id"]) for n in self.nodes() if n.get("status") == "online"]

    def register_supernode(self, public_key: Path) -> str:
        """``flwr supernode register``: allow a SuperNode key (needs node auth enabled)."""
        doc = self.flwr_json("supernode", "register", str(public_key), "edgefl")
        return str(doc.get("node-id", ""))

    def unregister_supernode(self, node_id: str) -> None:
        """``flwr supernode unregister``: the SuperLink refuses that key from now on."""
        self.flwr_json("supernode", "unregister", str(node_id), "edgefl")

    def submit(self, app_dir: Path, run_config: str, *, timeout: float = 120.0) -> str:
        """``flwr run app_dir edgefl --run-config …``; returns Flower's run id."""
        doc = self.flwr_json(
            "run", str(app_dir), "edgefl", "--run-config", run_config, timeout=timeout
        )
        return str(doc.get("run-id"))

    def run_status(self, run_id: str) -> str:
        """Flower's status of run ``run_id`` (pending, starting, running, finished:…).

        ``unknown`` when ``flwr list`` fails or does not list the run (a loaded host can
        make one call slow; callers ask again).
        """
        try:
            runs = self.flwr_json("list", "--run-id", run_id, "edgefl").get("runs", [])
            return str(runs[0].get("status", "unknown")) if runs else "unknown"
        except (FlowerError, AttributeError, IndexError, TypeError) as exc:
            logger.warning("status of Flower run %s unknown: %s", run_id, exc)
            return "unknown"

    def stop_run(self, run_id: str) -> None:
        """``flwr stop run_id``."""
        self.flwr_json("stop", run_id, "edgefl")

    def __enter__(self) -> SuperLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class SuperNode:
    """A Flower SuperNode connected to ``superlink`` (``host:port``)."""

    superlink: str
    data_dir: Path
    node_config: dict[str, str | int | float] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    max_wait_time: float | None = None
    #: ``subprocess`` (Flower starts a SuperExec and a ``flwr-clientapp`` per message) or
    #: ``process`` (no SuperExec: an external executor takes the tasks, see edge.executor).
    isolation: str = "subprocess"
    #: Secret file (isolation ``process``): only a holder of it may ``AcquireTask``.
    superexec_auth_secret_file: Path | None = None
    #: SIGTERM the SuperNode when the thread that started it exits (edge.process).
    die_with_parent: bool = False
    #: ``PYTHONOPTIMIZE`` for the SuperNode's Python: 2 drops the docstrings (and
    #: asserts) of the ~1,500 modules Flower's SuperNode imports, about 4.5 MB of RSS,
    #: which a 512 MB device feels (``edge up`` uses 2; the SuperNode reads no docstring
    #: at run time). Its optimized bytecode is compiled when the device is provisioned.
    python_optimize: int = 0
    process: ManagedProcess | None = None

    @property
    def flwr_home(self) -> Path:
        return self.data_dir / "flwr-home"

    @property
    def runtime_address(self) -> str:
        """Where an executor reaches this SuperNode's runtime API."""
        host = connect_host(self.host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def node_config_arg(self) -> str:
        parts = []
        for key, value in self.node_config.items():
            if isinstance(value, str):
                parts.append(f"{key}={json.dumps(value)}")
            else:
                parts.append(f"{key}={value}")
        return " ".join(parts)

    def argv(self) -> list[str]:
        argv = [
            _bin("flower-supernode"),
            "--superlink",
            self.superlink,
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        if self.root_certificates is None:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(self.root_certificates)]
        if self.auth_private_key is not None:
            argv += ["--auth-supernode-private-key", str(self.auth_private_key)]
        if self.node_config:
            argv += ["--node-config", self.node_config_arg()]
        if self.max_wait_time is not None:
            argv += ["--max-wait-time", str(self.max_wait_time)]
        if self.isolation != "subprocess":
            argv += ["--isolation", self.isolation]
        if self.superexec_auth_secret_file is not None:
            argv += ["--superexec-auth-secret-file", str(self.superexec_auth_secret_file)]
        return argv

    def env(self) -> dict[str, str]:
        """Variables the SuperNode runs with, on top of this process's environment."""
        env = {"FLWR_HOME": str(self.flwr_home), "FLWR_TELEMETRY_ENABLED": "0"}
        if self.python_optimize:
            env["PYTHONOPTIMIZE"] = str(self.python_optimize)
        return env

    def start(self, *, timeout: float = 60.0) -> SuperNode:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess(
            "flower-supernode",
            self.argv(),
            log_path=self.data_dir / "supernode.log",
            env=self.env(),
            die_with_parent=self.die_with_parent,
        )
        # Held before it starts: an interrupt right after the fork still finds it to stop.
        self.process.start()
        try:
            self.process.wait_for_port(self.host, self.port, timeout=timeout)
        except ProcessError as exc:
            self.process.stop()
            raise FlowerError(str(exc)) from exc
        return self

    def start_with_retries(
        self, *, attempts: int = START_ATTEMPTS, fixed_port: bool = False
    ) -> SuperNode:
        """:meth:`start`, with up to ``attempts`` tries.

        A free port taken by someone else meanwhile gets another port; a SuperNode that
        exits while starting is started again (Flower 1.42's ``flower-supernode`` has been
        seen to abort at start-up with "epoll_wait error: Bad file descriptor", exit -6,
        where a rerun started normally). A ``fixed_port`` that is taken is an operator's
        problem: that is raised at once.
        """
        for attempt in range(1, attempts + 1):
            try:
                return self.start()
            except FlowerError as exc:
                port_taken = "address already in use" in str(exc)
                if attempt == attempts or (port_taken and fixed_port):
                    raise
                if port_taken:
                    logger.warning("runtime port %d was taken; trying another", self.port)
                    self.port = free_port()
                else:
                    logger.warning("the SuperNode did not start (%s); starting it again", exc)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> SuperNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
