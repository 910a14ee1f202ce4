"""``edgefl edge up``: everything one device runs, supervised.

Two children, both stopped by PID on exit:

1. ``edgefl edge serve`` — the gRPC services (inference, trainer, local data, health,
   reflection) and the MQTT agent, in one process;
2. ``flower-supernode`` — Flower's node, whose ClientApp calls the Trainer above on
   loopback. It is started once the services are up, with ``device-id`` and
   ``trainer-address`` in its node config.

A child that exits is restarted with backoff (at most ``MAX_RESTARTS`` times within
``RESTART_WINDOW_S``), so a crash of one part does not take the device offline.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
import threading
import time
from pathlib import Path

from edge.flower_node import SuperNode
from edge.process import ManagedProcess, ProcessError

logger = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW_S = 300.0
SERVE_READY_TIMEOUT_S = 60.0
_SERVING = re.compile(r"edgefl edge: serving on (\S+):(\d+)")


class DeviceSupervisor:
    def __init__(self, config: Path) -> None:
        from edge.config import load_settings

        self.config = config.resolve()
        self.settings = load_settings(self.config)
        self.data_dir = Path(self.settings.device.data_dir)
        self.serve: ManagedProcess | None = None
        self.node: SuperNode | None = None
        self.trainer_address = ""
        self._stop = threading.Event()
        self._restarts: list[float] = []

    def _start_serve(self) -> None:
        log = self.data_dir / "logs" / "serve.log"
        offset = log.stat().st_size if log.exists() else 0
        self.serve = ManagedProcess(
            "edgefl edge serve",
            [sys.executable, "-m", "edge.cli", "edge", "serve", "--config", str(self.config)],
            log_path=log,
        ).start()

        def ready() -> bool:
            try:
                with open(log, "rb") as fh:
                    fh.seek(offset)
                    match = _SERVING.search(fh.read().decode(errors="replace"))
            except OSError:
                return False
            if match:
                self.trainer_address = f"{match.group(1)}:{match.group(2)}"
            return bool(match)

        self.serve.wait_until(ready, timeout=SERVE_READY_TIMEOUT_S, what="serving")
        logger.info("device %s: services on %s", self.settings.device.id, self.trainer_address)

    def _start_node(self) -> None:
        flower = getattr(self.settings, "flower", None)
        if flower is None or not flower.superlink:
            logger.warning(
                "no [flower] superlink configured: this device serves but does not train in rounds"
            )
            return
        options: dict[str, object] = {}
        if flower.port:
            options["port"] = flower.port
        self.node = SuperNode(
            superlink=flower.superlink,
            data_dir=self.data_dir / "supernode",
            node_config={
                "device-id": self.settings.device.id,
                "trainer-address": self.trainer_address,
            },
            root_certificates=flower.root_certificates,
            auth_private_key=flower.auth_private_key,
            **options,  # type: ignore[arg-type]
        )
        self.node.start()
        logger.info(
            "device %s: SuperNode connected towards %s", self.settings.device.id, flower.superlink
        )

    def start(self) -> DeviceSupervisor:
        try:
            self._start_serve()
            self._start_node()
        except BaseException:
            self.stop()
            raise
        print(
            f"edgefl edge up: device {self.settings.device.id} serving on {self.trainer_address}",
            flush=True,
        )
        return self

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
        time.sleep(min(2 ** len(self._restarts) * 0.5, 10.0))
        return True

    def watch(self) -> int:
        """Block until SIGTERM/SIGINT (or a child that cannot be kept alive)."""
        while not self._stop.wait(1.0):
            if self.serve is not None and not self.serve.alive():
                logger.warning(
                    "edge services exited (code %s):\n%s",
                    self.serve.returncode(),
                    self.serve.log_tail(10),
                )
                if not self._may_restart("edge services"):
                    return 1
                try:
                    self._start_serve()
                except ProcessError as exc:
                    logger.error("%s", exc)
            if (
                self.node is not None
                and self.node.process is not None
                and not self.node.process.alive()
            ):
                logger.warning("SuperNode exited (code %s)", self.node.process.returncode())
                if not self._may_restart("SuperNode"):
                    return 1
                try:
                    self.node.start()
                except Exception as exc:
                    logger.error("%s", exc)
        return 0

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
        if self.serve is not None:
            self.serve.stop(timeout=15)


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
