"""The device's gRPC servers: Inference, Trainer, LocalData, health and reflection.

Two servers, because they face different callers:

* :func:`build_server`: **TCP** on ``[grpc] host:port`` (port 0 picks a free port):
  ``inference.GRPCInferenceService``, health, reflection. Inference changes nothing,
  so any client that reaches the port may call it.
* :func:`build_local_server`: a **Unix socket**, ``<data_dir>/run/local.sock``, in a
  directory of mode 0700, socket mode 0600: ``edgefl.v1.Trainer`` and
  ``edgefl.v1.LocalData`` (which write and clear samples and run training), health,
  reflection. Only processes of the device's own OS user can connect; these services
  have no TCP form at all, so no bind address, loopback or not, exposes them.

:class:`EdgeServer` adds the lifecycle: start,
write ``data_dir/grpc.port``, and a graceful stop: every health status goes
NOT_SERVING, new calls are still answered for ``drain_delay_s`` so watchers notice,
then the server stops accepting and in-flight calls get ``grace_s`` to finish.
:func:`serve` runs one until SIGTERM/SIGINT and prints, once ready::

    edgefl edge: serving on 127.0.0.1:43817

Health (``grpc.health.v1``): the overall status ("") and LocalData are SERVING once
started; ``inference.GRPCInferenceService`` and ``edgefl.v1.Trainer`` only once a
model is loaded. ``--only inference|trainer|data`` registers one service (with health
and reflection); by default all run in one process.

Run as ``python -m edge.server --config edge.toml [--only inference]`` or
``edgefl edge serve``. When ``[mqtt]`` is configured, :func:`serve` also runs the MQTT
agent (:mod:`edge.agent`) with the same node.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, Literal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge import inference_service, local_data_service, trainer_service
from edge.config import Settings, load_settings
from edge.errors import ConfigError, EdgeError
from edge.model_store import atomic_write
from edge.node import EdgeNode
from edge.serving import ServingModel
from protos.edgefl.v1 import local_data_pb2_grpc, trainer_pb2_grpc

logger = logging.getLogger(__name__)

Only = Literal["inference", "trainer", "data"]
ONLY_CHOICES: tuple[Only, ...] = ("inference", "trainer", "data")
READY_LINE = "edgefl edge: serving on {host}:{port}"
_NEEDS_MODEL = (inference_service.SERVICE_NAME, trainer_service.SERVICE_NAME)


class BindError(EdgeError, RuntimeError):
    """The gRPC server could not bind its address."""


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _new_server(node: EdgeNode, settings: Settings) -> grpc.Server:
    cfg = settings.grpc
    workers = max(8, cfg.serving_threads + 6)
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgefl-grpc"),
        interceptors=[node.metrics.interceptor()],
        options=[
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )


def _add_health_and_reflection(
    server: grpc.Server, node: EdgeNode, names: list[str], hs: health.HealthServicer
) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    serving_status = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    for name in names:
        model_ok = node.ready or name not in _NEEDS_MODEL
        hs.set(name, serving_status if model_ok else not_serving)
    hs.set("", serving_status)

    def on_swap(_model: ServingModel) -> None:
        for name in names:
            if name in _NEEDS_MODEL:
                hs.set(name, serving_status)

    node.serving.add_listener(on_swap)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )


def build_server(
    node: EdgeNode,
    settings: Settings,
    *,
    only: Only | None = None,
    health_servicer: health.HealthServicer | None = None,
) -> tuple[grpc.Server, int]:
    """Create and bind (not start) the **TCP** server for ``node``; returns it and its port.

    It carries inference (unless ``only`` names another service), health and
    reflection; never Trainer or LocalData, which change the device's state and live
    on the local socket (:func:`build_local_server`). Pass ``health_servicer`` to keep
    a handle on health statuses. Raises :class:`BindError` when the address cannot
    be bound.
    """
    cfg = settings.grpc
    server = _new_server(node, settings)
    names: list[str] = []
    if only in (None, "inference"):
        inference_service.add_to_server(
            inference_service.InferenceServicer(node.serving, settings.model.name, cfg.max_batch),
            server,
        )
        names.append(inference_service.SERVICE_NAME)
    _add_health_and_reflection(server, node, names, health_servicer or health.HealthServicer())
    try:
        port = server.add_insecure_port(_address(cfg.host, cfg.port))
    except RuntimeError as exc:  # grpcio raises on a port in use
        port = 0
        logger.debug("bind failed: %s", exc)
    if port == 0:
        raise BindError(
            f"cannot bind the gRPC services to {_address(cfg.host, cfg.port)}: the port is in use "
            "or the address is not on this host (set [grpc] port = 0 for a free port)"
        )
    logger.info("gRPC services %s bound to %s", ", ".join(names), _address(cfg.host, port))
    return server, port


def prepare_socket_dir(path: Path) -> None:
    """Create the local socket's directory with mode 0700 (owner only), fixing its mode.

    Connecting to a Unix socket needs search permission on its directory, so this one
    mode keeps every other OS user out, whatever the modes of the directories above.
    Refuses a directory owned by another user (it could hold a planted socket).
    """
    path.mkdir(parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise BindError(f"{path} is not a directory owned by this user; refusing to use it")
    os.chmod(path, 0o700)


def build_local_server(
    node: EdgeNode,
    settings: Settings,
    *,
    only: Only | None = None,
    health_servicer: health.HealthServicer | None = None,
) -> tuple[grpc.Server, str]:
    """Create and bind (not start) the **local** server: Trainer and LocalData on a Unix socket.

    The socket is ``settings.local_socket`` (``<data_dir>/run/local.sock``) in a
    directory of mode 0700, and the socket itself gets mode 0600 once bound: only the
    device's own user (its processes) can connect. There is no TCP form of these
    services, so no network peer can reach them. Returns the server and the gRPC
    target (``unix:/abs/path``).
    """
    sock = settings.local_socket.resolve()
    prepare_socket_dir(sock.parent)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()  # a stale socket of a previous run (the directory is ours alone)
    server = _new_server(node, settings)
    names: list[str] = []
    if only in (None, "trainer"):
        trainer_pb2_grpc.add_TrainerServicer_to_server(
            trainer_service.TrainerServicer(node.trainer, settings.model.name), server
        )
        names.append(trainer_service.SERVICE_NAME)
    if only in (None, "data"):
        local_data_pb2_grpc.add_LocalDataServicer_to_server(
            local_data_service.LocalDataServicer(node.data), server
        )
        names.append(local_data_service.SERVICE_NAME)
    _add_health_and_reflection(server, node, names, health_servicer or health.HealthServicer())
    target = f"unix:{sock}"
    try:
        bound = server.add_insecure_port(target)
    except RuntimeError as exc:
        raise BindError(f"cannot bind the local services to {sock}: {exc}") from exc
    if bound == 0:
        raise BindError(f"cannot bind the local services to {sock}")
    os.chmod(sock, 0o600)
    logger.info("gRPC services %s bound to %s", ", ".join(names), target)
    return server, target


class EdgeServer:
    """A node and its gRPC server with start/stop; used by :func:`serve` and by tests."""

    def __init__(
        self, settings: Settings, *, only: Only | None = None, node: EdgeNode | None = None
    ) -> None:
        self.settings = settings
        self.only = only
        self.node = node or EdgeNode(settings)
        self._own_node = node is None
        self.health = health.HealthServicer()
        self.local_health = health.HealthServicer()
        self._server: grpc.Server | None = None
        self._local: grpc.Server | None = None
        self.port = 0
        #: ``unix:`` target of Trainer and LocalData (valid after :meth:`start`).
        self.local_address = ""
        #: Port of the ``/metrics`` endpoint (0 when ``[metrics] enabled = false``).
        self.metrics_port = 0

    @property
    def address(self) -> str:
        """``host:port`` of the TCP server (inference, health), valid after :meth:`start`."""
        return _address(self.settings.grpc.host, self.port)

    def start(self) -> int:
        """Start the node (if created here), the server and ``/metrics``; write the port files.

        Returns the gRPC port; raises :class:`BindError` when either port cannot be bound.
        """
        if self._own_node:
            self.node.start()
        if self.only in (None, "trainer", "data"):
            self._local, self.local_address = build_local_server(
                self.node, self.settings, only=self.only, health_servicer=self.local_health
            )
            self._local.start()
        self._server, self.port = build_server(
            self.node, self.settings, only=self.only, health_servicer=self.health
        )
        self._server.start()
        atomic_write(self.settings.port_file, f"{self.port}\n".encode("ascii"))
        metrics = self.settings.metrics
        if metrics.enabled:
            try:
                self.metrics_port = self.node.metrics.serve(metrics.host, metrics.port)
            except OSError as exc:
                self._server.stop(0).wait()
                self._server = None
                if self._local is not None:
                    self._local.stop(0).wait()
                    self._local = None
                with contextlib.suppress(OSError):
                    self.settings.port_file.unlink()
                raise BindError(
                    f"cannot bind the metrics endpoint to {_address(metrics.host, metrics.port)}: "
                    f"{exc.strerror or exc} (set [metrics] port = 0 for a free port, or "
                    "enabled = false)"
                ) from exc
            atomic_write(self.settings.metrics_port_file, f"{self.metrics_port}\n".encode("ascii"))
        return self.port

    def stop(self, grace: float | None = None) -> None:
        """Go NOT_SERVING, wait ``drain_delay_s``, stop accepting, drain in-flight calls."""
        if self._server is None and self._local is None:
            return
        grace = self.settings.grpc.grace_s if grace is None else grace
        self.health.enter_graceful_shutdown()
        self.local_health.enter_graceful_shutdown()
        logger.info("shutting down: health NOT_SERVING, draining for %.1fs", grace)
        time.sleep(self.settings.grpc.drain_delay_s)
        for server in (self._server, self._local):
            if server is not None:
                server.stop(grace).wait()
        self._server = self._local = None
        self.node.metrics.stop()
        for port_file in (
            self.settings.port_file,
            self.settings.metrics_port_file,
            self.settings.local_socket,
        ):
            with contextlib.suppress(OSError):
                port_file.unlink()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout``); True if it stopped."""
        return self._server is None or self._server.wait_for_termination(timeout)


def _start_agent(settings: Settings, node: EdgeNode) -> Any | None:
    """Start the MQTT agent if ``[mqtt]`` is configured and :mod:`edge.agent` exists."""
    mqtt = settings.mqtt
    if mqtt is None:
        return None
    try:
        from edge.agent import Agent, AgentSettings
    except ImportError as exc:
        logger.error("[mqtt] is configured but the MQTT agent is unavailable: %s", exc)
        return None
    password = None
    if mqtt.password_file is not None:
        password = Path(mqtt.password_file).read_text(encoding="utf-8").strip()
    if settings.trust.signing_public_key is None:
        raise ConfigError(["[trust] signing_public_key is required when [mqtt] is configured"])
    agent = Agent(
        AgentSettings(
            device_id=settings.device.id,
            fleet=settings.device.fleet,
            host=mqtt.host,
            port=mqtt.port,
            username=mqtt.username,
            password=password,
            ca_file=mqtt.ca_file,
            keepalive=mqtt.keepalive,
            status_interval_s=mqtt.status_interval_s,
            signing_public_key=settings.trust.signing_public_key,
            min_sequence=settings.trust.min_sequence,
        ),
        node,
    )
    agent.start()
    return agent


class DeviceServices:
    """The node, its gRPC server and (with ``[mqtt]``) its MQTT agent, started and stopped together.

    What ``edgefl edge serve`` runs, and what ``edgefl edge up`` runs next to the
    Flower executor in the same process.
    """

    def __init__(self, settings: Settings, *, only: Only | None = None) -> None:
        self.settings = settings
        self.server = EdgeServer(settings, only=only)
        self.agent: Any | None = None

    @property
    def node(self) -> EdgeNode:
        return self.server.node

    @property
    def address(self) -> str:
        return self.server.address

    def start(self) -> DeviceServices:
        try:
            self.server.start()
            self.agent = _start_agent(self.settings, self.server.node)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.agent is not None:
            try:
                self.agent.stop()
            except Exception:
                logger.exception("MQTT agent did not stop cleanly")
            self.agent = None
        self.server.stop()


def serve(settings: Settings, *, only: Only | None = None) -> int:
    """Run the device services until SIGTERM/SIGINT, then shut down gracefully; exit code."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("received signal %d", signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    services = DeviceServices(settings, only=only)
    try:
        services.start()
        print(READY_LINE.format(host=settings.grpc.host, port=services.server.port), flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        services.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``serve`` (shared by ``python -m edge.server`` and ``edgefl edge serve``)."""
    parser.add_argument("--config", type=Path, help="settings file (TOML); EDGEFL_* overrides")
    parser.add_argument("--only", choices=ONLY_CHOICES, help="run just this service")


def run_serve(args: argparse.Namespace) -> int:
    """Load settings from ``args`` and :func:`serve`; config errors exit with code 2."""
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return serve(settings, only=args.only)
    except (ConfigError, ValueError) as exc:  # e.g. agent settings rejected at start
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge.server --config FILE [--only SERVICE] [-v]``."""
    parser = argparse.ArgumentParser(
        prog="python -m edge.server", description=__doc__.splitlines()[0]
    )
    add_serve_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    from edge.logging_config import configure_logging

    configure_logging(args.verbose)
    return run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
