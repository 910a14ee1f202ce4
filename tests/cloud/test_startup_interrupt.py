"""Ctrl-C at any moment of ``cloud up``'s start-up stops everything started so far.

A loop over the start-up phases (:data:`cloud.supervisor.START_PHASES`, announced by
the stack's ``on_phase`` hook) plus the moments while a child is coming up (a watcher
thread sees the new process and raises SIGINT then). Each time a real SIGINT ends
``serve`` with exit code 130, no process of the cloud is left, and the data dir is free.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from cloud import config as cloud_config
from cloud.cloud_lock import running_cloud
from cloud.commands import EXIT_INTERRUPTED, serve
from cloud.supervisor import START_PHASES, CloudStack, init_cloud

pytestmark = pytest.mark.slow

#: The longest a watcher waits for the child it is looking for before interrupting anyway.
WATCH_S = 120.0


def _ours(data_dir: Path) -> list[psutil.Process]:
    """Live processes that belong to the cloud on ``data_dir`` (by command line or env)."""
    mark = str(data_dir)
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            text = " ".join(proc.info["cmdline"] or [])
            if mark in text or any(mark in v for v in proc.environ().values()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _child_named(name: str) -> Callable[[], bool]:
    me = psutil.Process()

    def seen() -> bool:
        try:
            return any(name in " ".join(c.cmdline()) for c in me.children(recursive=True))
        except psutil.Error:
            return False

    return seen


def _interrupt_when(condition: Callable[[], bool], done: threading.Event) -> None:
    def watch() -> None:
        deadline = time.monotonic() + WATCH_S
        while not condition() and time.monotonic() < deadline and not done.is_set():
            time.sleep(0.01)
        if not done.is_set():
            signal.raise_signal(signal.SIGINT)

    threading.Thread(target=watch, daemon=True).start()


# (phase whose start arms the interrupt, None = at once, or the child whose appearance fires
# it). Every phase boundary once both long-starting children run would repeat the same
# state, so the loop takes the boundaries where what runs changes, and the moments between.
POINTS: list[tuple[str, str | None]] = [
    ("lock", None),
    ("broker", "mosquitto"),
    ("broker-ready", None),
    ("superlink", "flower-superlink"),
    ("superlink", "flower-superexec"),
    ("proxy", "nginx"),
    ("monitor", None),
    ("supervising", None),
]
assert {phase for phase, _ in POINTS} <= set(START_PHASES)


def test_interrupting_start_up_anywhere_leaves_nothing_behind(
    tmp_path: Path, mlp_model_dir: Path
) -> None:
    conf = init_cloud(tmp_path / "cloud", fleet="intr", model_dir=mlp_model_dir)
    settings = cloud_config.load(conf)
    args = argparse.Namespace(no_run=True, exit_when_done=False, rounds=None)
    for phase, child in POINTS:
        done = threading.Event()

        def hook(
            name: str, phase: str = phase, child: str | None = child, done: threading.Event = done
        ) -> None:
            if name != phase:
                return
            if child is None:
                signal.raise_signal(signal.SIGINT)
            else:
                _interrupt_when(_child_named(child), done)

        try:
            code = serve(CloudStack(settings, on_phase=hook), args)
        finally:
            done.set()
        where = f"{phase}/{child or 'at once'}"
        assert code == EXIT_INTERRUPTED, where
        left = _ours(settings.data_dir)
        assert not left, f"{where}: left running: {[p.cmdline() for p in left]}"
        assert running_cloud(settings.data_dir) is None, where
