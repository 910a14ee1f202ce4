"""Fault injection helpers for the e2e tests: when a device trains, its SuperNode, kills."""

from __future__ import annotations

import time
import urllib.error

import psutil

from devices.emulate import EmulatedDevice
from tests.prom import scrape


def up_pid(device: EmulatedDevice) -> int:
    """PID of the device's ``edgefl edge up`` process."""
    assert device.process is not None and device.process.pid is not None, device.name
    return int(device.process.pid)


def is_training(device: EmulatedDevice) -> bool:
    """Whether the device itself says a local training runs (its ``/metrics``).

    False while the device is down or restarting (no endpoint, or an old port).
    """
    try:
        port = int((device.data_dir / "metrics.port").read_text())
        _, metrics = scrape(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except (OSError, ValueError, urllib.error.URLError):
        return False
    return metrics.value("edgefl_device_training") == 1


def wait_training(device: EmulatedDevice, timeout: float = 180.0) -> None:
    """Until the device's own metrics say it trains (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_training(device):
            return
        time.sleep(0.05)
    raise AssertionError(f"{device.name} never started training in {timeout:.0f}s")


def supernode_of(device: EmulatedDevice) -> psutil.Process:
    """The device's ``flower-supernode`` child."""
    for child in psutil.Process(up_pid(device)).children(recursive=True):
        try:
            if "flower-supernode" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no flower-supernode under {device.name}")


def wait_new_supernode(device: EmulatedDevice, old_pid: int, timeout: float = 60.0) -> int:
    """Until ``edge up`` runs a SuperNode other than ``old_pid``; its PID."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            node = supernode_of(device)
            if node.pid != old_pid:
                return int(node.pid)
        except (AssertionError, psutil.NoSuchProcess):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{device.name}: edge up did not restart its SuperNode")


def tree_pids(device: EmulatedDevice) -> set[int]:
    """PIDs of the device's ``edge up`` and everything under it."""
    root = psutil.Process(up_pid(device))
    return {root.pid, *(p.pid for p in root.children(recursive=True))}


def wait_gone(pids: set[int], timeout: float = 30.0) -> set[int]:
    """Wait until none of ``pids`` runs (zombies count as gone); returns the ones left."""
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left and time.monotonic() < deadline:
        left = {p for p in left if _running(p)}
        if left:
            time.sleep(0.2)
    return left


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
