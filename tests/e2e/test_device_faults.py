"""End to end: devices refuse what they must refuse, answer with the reason, and train next.

Real Mosquitto, SuperLink, registry, and devices that are each a real ``edgefl edge up``
(services + in-process executor + ``flower-supernode --isolation process``).

* A Flower App of the test (``fault_app``) sends every device one bad TRAIN message after
  another: no approval, a forged approval, an approval of another run, an unknown content
  key, weights that do not match the model card, a config the Trainer raises on; then a
  good one. Each bad one gets an error reply naming the reason, no FAB is ever unpacked
  on a device, and the good one trains; the operator's own run then trains too.
* During the runs no ``flwr-clientapp`` or ``flower-superexec`` process exists under any
  device: a device is its ``edgefl edge up`` process and one ``flower-supernode``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from edge.litert_model import LiteRTModel
from edge.run_approval import sign_approval, write_approval
from protos import signing
from tests.e2e.conftest import fleet_spec

pytestmark = pytest.mark.slow

FAULT_APP = Path(__file__).parent / "fault_app"
FORBIDDEN = ("flwr-clientapp", "flower-superexec")


class TreeWatch:
    """Samples each device's process tree every 0.2 s until stopped; remembers every name."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.seen: dict[int, set[str]] = {pid: set() for pid in pids}
        #: PYTHONOPTIMIZE of each SuperNode seen (2: no docstrings, less memory).
        self.optimize: set[str | None] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for pid in self.pids:
                try:
                    for child in psutil.Process(pid).children(recursive=True):
                        name = " ".join(child.cmdline()[:3])
                        self.seen[pid].add(name)
                        if "flower-supernode" in name:
                            self.optimize.add(child.environ().get("PYTHONOPTIMIZE"))
                except psutil.Error:
                    continue

    def __enter__(self) -> TreeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _submit(stack, app_dir: Path, run_config: str) -> str:
    res = stack.superlink.flwr(
        "run", str(app_dir), "edgefl", "--run-config", run_config, "--format", "json", timeout=120
    )
    doc = json.loads(res.stdout)
    assert doc.get("success"), doc
    return str(doc["run-id"])


def _wait_finished(stack, run_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = stack.superlink.flwr("list", "--run-id", run_id, "edgefl", "--format", "json")
        runs = json.loads(res.stdout).get("runs", [])
        status = str(runs[0].get("status", "")) if runs else ""
        if status.startswith("finished"):
            return status
        time.sleep(2)
    raise AssertionError(f"run {run_id} not finished after {timeout:.0f}s")


def test_bad_messages_get_clear_error_replies_and_the_device_trains_next(
    cloud_settings, stack_factory, fleet_factory, tmp_path: Path
) -> None:
    s = cloud_settings
    s.run = dataclasses.replace(s.run, num_rounds=1, min_nodes=2, local_epochs=1)
    stack = stack_factory(s)
    fleet = fleet_factory(fleet_spec(s, stack, scheme="iid"), 2)
    pids = [d.process.pid for d in fleet.devices]  # type: ignore[union-attr]

    weights = tmp_path / "weights.npz"
    np.savez(weights, **LiteRTModel.load(s.model.dir).get_weights())  # type: ignore[arg-type]
    key = signing.load_private_key(s.signing.private_key)
    other = tmp_path / "other-run.json"
    other.write_text(sign_approval(key, s.cloud.fleet, 12345).to_json())
    results = tmp_path / "results.jsonl"
    run_config = " ".join(
        [
            f'weights="{weights}"',
            f'data-dir="{s.data_dir}"',
            f'other-run-approval="{other}"',
            f'results-file="{results}"',
            "nodes=2",
        ]
    )

    with TreeWatch(pids) as watch:
        # The test plays the operator's supervisor: it submits and approves the fault run.
        run_id = _submit(stack, FAULT_APP, run_config)
        write_approval(s.data_dir, sign_approval(key, s.cloud.fleet, int(run_id)))
        assert _wait_finished(stack, run_id, timeout=400) == "finished:completed"

        lines = [json.loads(line) for line in results.read_text().splitlines()]
        replies: dict[str, list[dict]] = {}
        for line in lines:
            if "node" in line:
                replies.setdefault(line["step"], []).append(line)
            else:
                assert line["replies"] == line["sent"] == 2, line  # every device answered

        def reasons(step: str) -> list[str]:
            got = replies[step]
            assert len(got) == 2 and all("reason" in r for r in got), got
            return [r["reason"] for r in got]

        for reason in reasons("no-approval"):
            assert f"run {run_id} refused by the device" in reason
            assert "carries no approval" in reason
        for reason in reasons("forged-approval"):
            assert "does not verify" in reason
        for reason in reasons("other-run-approval"):
            assert f"the approval is for run 12345, the message belongs to run {run_id}" in reason
        for reason in reasons("unknown-content-key"):
            assert "unknown content keys payload" in reason
        for reason in reasons("weights-mismatch"):
            assert "WeightMismatch" in reason and "model card" in reason
        for reason in reasons("trainer-raises"):
            assert "InvalidInput" in reason and "epochs must be in 0..1000" in reason
        refused = {r["code"] for step in ("no-approval", "forged-approval") for r in replies[step]}
        assert refused == {7}  # Flower's INVALID_FAB: the run is not trusted
        assert {r["code"] for r in replies["weights-mismatch"]} == {2}
        good = replies["good"]
        assert sorted(r.get("device", "") for r in good) == ["dev-1", "dev-2"], good
        assert all(r["metrics"]["num-examples"] > 0 for r in good)

        # No FAB was ever unpacked on a device (nothing of any run's code is there).
        for device in fleet.devices:
            assert not list((device.data_dir / "supernode" / "flwr-home").glob("apps/*"))

        # The operator's run (signed by the cloud supervisor) trains on both devices.
        stack.submit_run()
        assert stack.wait_for_run(timeout=300) == "finished:completed"
        run = stack.registry.latest_run()
        first = next(r for r in stack.registry.list_rounds(run.id) if r.round == 1)
        assert sorted(first.replied) == ["dev-1", "dev-2"], (first.replied, first.failed)

    for pid, names in watch.seen.items():
        assert names, f"device {pid}: no child seen at all (the SuperNode should be one)"
        assert all("flower-supernode" in n for n in names), names
        assert not any(bad in n for n in names for bad in FORBIDDEN), names
    assert watch.optimize == {"2"}, f"the SuperNodes ran with PYTHONOPTIMIZE {watch.optimize}"
