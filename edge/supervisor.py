"""``edgefl edge up``: everything one device runs, in one warm process plus the SuperNode.

The process itself holds:

1. the device services (:class:`~edge.server.DeviceServices`: inference, trainer and
   local data gRPC, health, reflection, and the MQTT agent);
2. the Flower executor (:class:`~edge.executor.TaskExecutor`), a thread that takes
   each task from the SuperNode and answers it with the installed
   :class:`~edge.clientapp.EdgeClientApp`, calling the Trainer directly, only for
   runs the fleet key approved.

Its only child is ``flower-supernode --isolation process`` (no SuperExec, no
``flwr-clientapp``), started once the services are up, with a fresh SuperExec auth
secret (``supernode/superexec.secret``, mode 0600) so that only this process can take
the device's tasks. The SuperNode gets SIGTERM from the kernel if this process dies,
even by SIGKILL (``PR_SET_PDEATHSIG``), so systemd's restart finds no orphan.

A SuperNode that exits is restarted with backoff (at most ``MAX_RESTARTS`` times within
``RESTART_WINDOW_S``, then ``edge up`` exits 1 and systemd restarts the device); a task
it had handed to the executor is cancelled first, as its reply could never be delivered.
SIGTERM/SIGINT stop the executor (a running task is cancelled and answered with an
error), the SuperNode (by PID) and the services, in that order.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edge.errors import ConfigError
from edge.flower_node import SuperNode

if TYPE_CHECKING:
    from edge.executor import TaskExecutor, Trust
    from edge.server import DeviceServices

logger = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW_S = 300.0
READY_LINE = "edgefl edge up: device {device} serving on {address}"


def write_secret(path: Path) -> bytes:
    """A fresh random secret in ``path``, readable by this user only; returns it."""
    secret = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    os.replace(tmp, path)
    return secret


class DeviceSupervisor:
    def __init__(self, config: Path) -> None:
        from edge.config import load_settings

        self.config = config.resolve()
        self.settings = load_settings(self.config)
        self.data_dir = Path(self.settings.device.data_dir)
        self.services: DeviceServices | None = None
        self.node: SuperNode | None = None
        self.executor: TaskExecutor | None = None
        self._stop = threading.Event()
        self._restarts: list[float] = []

    # -- start ------------------------------------------------------------------------------

    def _trust(self) -> Trust:
        from edge.executor import Trust
        from protos import signing

        key_path = self.settings.trust.signing_public_key
        if key_path is None:
            raise ConfigError(
                [
                    "[trust] signing_public_key is required when [flower] is configured: the "
                    "device executes only runs the fleet key approved"
                ]
            )
        try:
            public_key = signing.load_public_key(Path(key_path))
        except (OSError, ValueError) as exc:
            raise ConfigError([f"[trust] signing_public_key {key_path}: {exc}"]) from exc
        return Trust(fleet=self.settings.device.fleet, public_key=public_key)

    def _start_flower(self) -> None:
        flower = self.settings.flower
        if flower is None or not flower.superlink:
            logger.warning(
                "no [flower] superlink configured: this device serves but does not train in rounds"
            )
            return
        from edge.clientapp import EdgeClientApp
        from edge.executor import TaskExecutor

        trust = self._trust()
        node_dir = self.data_dir / "supernode"
        secret_file = node_dir / "superexec.secret"
        secret = write_secret(secret_file)
        options: dict[str, object] = {}
        if flower.port:
            options["port"] = flower.port
        self.node = SuperNode(
            superlink=flower.superlink,
            data_dir=node_dir,
            node_config={"device-id": self.settings.device.id},
            root_certificates=flower.root_certificates,
            auth_private_key=flower.auth_private_key,
            isolation="process",
            superexec_auth_secret_file=secret_file,
            die_with_parent=True,
            python_optimize=2,  # no docstrings: ~4.5 MB less on the device
            **options,  # type: ignore[arg-type]
        )
        assert self.services is not None
        self.node.start_with_retries(fixed_port=bool(flower.port))
        app = EdgeClientApp(self.services.node.trainer, self.settings.device.id)
        self.executor = TaskExecutor(
            self.node.runtime_address,
            app,
            trust,
            auth_secret=secret,
            task_timeout_s=flower.task_timeout_s,
        )
        self.executor.start()
        logger.info(
            "device %s: SuperNode (pid %d) connected towards %s",
            self.settings.device.id,
            self.node.process.pid,  # type: ignore[union-attr]
            flower.superlink,
        )

    def start(self) -> DeviceSupervisor:
        from edge.server import DeviceServices

        try:
            self.services = DeviceServices(self.settings).start()
            self._start_flower()
        except BaseException:
            self.stop()
            raise
        print(
            READY_LINE.format(device=self.settings.device.id, address=self.services.address),
            flush=True,
        )
        return self

    # -- watch ------------------------------------------------------------------------------

    def _may_restart(self, what: str) -> bool:
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
        if len(self._restarts) >= MAX_RESTARTS:
            logger.error(
                "%s keeps exiting (%d restarts in %.0fs); giving up",
                what,
                MAX_RESTARTS,
                RESTART_WINDOW_S,
            )
            return False
        self._restarts.append(now)
        self._stop.wait(min(2 ** len(self._restarts) * 0.5, 10.0))
        return not self._stop.is_set()

    def watch(self) -> int:
        """Block until SIGTERM/SIGINT (or a SuperNode that cannot be kept alive); exit code.

        Runs in the main thread, which also (re)starts the SuperNode: the kernel's
        parent-death signal is tied to the thread that started the child.
        """
        while not self._stop.wait(0.5):
            node = self.node
            if node is None or node.process is None or node.process.alive():
                continue
            logger.warning(
                "SuperNode exited (code %s):\n%s",
                node.process.returncode(),
                node.process.log_tail(10),
            )
            if self.executor is not None:
                # The dead SuperNode's task can never be answered: free the Trainer for
                # the new SuperNode's first messages instead of finishing it.
                self.executor.abandon_task("its SuperNode exited")
            if not self._may_restart("SuperNode"):
                return 1
            try:
                node.start()
                logger.info("SuperNode restarted (pid %d)", node.process.pid)
            except Exception as exc:
                logger.error("SuperNode did not restart: %s", exc)
        return 0

    def request_stop(self) -> None:
        self._stop.set()

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        if self.executor is not None:
            self.executor.stop()
        if self.node is not None:
            self.node.stop()
        if self.services is not None:
            self.services.stop()


def run_up(config: Path) -> int:
    sup = DeviceSupervisor(config)

    def on_signal(_signum: int, _frame: object) -> None:
        sup.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        sup.start()
        return sup.watch()
    finally:
        sup.stop()
