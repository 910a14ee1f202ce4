"""Device runtime (issue 16): memory, receive→reply time and start-up, new design next to the old.

Both designs run the same federation in the same run on the same machine: a real
CloudStack (Mosquitto, SuperLink, registry, UI) and N devices on IID digits partitions,
R rounds of FedAvg.

* **New** (what devices run): each device is one ``edgefl edge up`` process (services,
  MQTT agent, the in-process executor calling the Trainer) plus ``flower-supernode
  --isolation process``.
* **Old** (the design before issue 16, kept in ``benchmarks/legacy_*`` for this
  measurement only): ``edgefl edge serve`` plus ``flower-supernode`` whose SuperExec
  starts a fresh ``flwr-clientapp`` process per message, which calls the Trainer over
  gRPC (``benchmarks/legacy_clientapp.py``).

A sampler thread reads every process of every device every 50 ms (the device's root
processes and all their descendants, so every short-lived ClientApp process is seen)
and sums their RSS per device; it also reads each SuperNode's log as it is written and
timestamps the lines ``Received successfully`` and ``Sent successfully``: their
difference is the time the device spends between receiving a message and replying.
Start-up to first reply: devices are started after the run was submitted; from
starting the device's first process to its SuperNode's first ``Sent successfully``.

``python -m benchmarks.bench_device [--quick] [--out DIR]``
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BENCH_DIR,
    REPO_ROOT,
    Report,
    Result,
    SamplerThread,
    benchmark_main,
    finish_report,
    loopback_cloud,
    machine_info,
    mlp_model_dir,
    ratio_within,
)

LEGACY_APP_DIR = BENCH_DIR / "legacy_flower_app"
SAMPLE_EVERY_S = 0.05
NODES_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 1200.0
ROUND_TIMEOUT_S = 300.0
SEED = 0
_READY = re.compile(r"edgefl edge: serving on (\S+):(\d+)")


@dataclass(frozen=True)
class Sizes:
    devices: int
    rounds: int
    local_epochs: int


FULL = Sizes(devices=2, rounds=5, local_epochs=2)
QUICK = Sizes(devices=1, rounds=2, local_epochs=1)  # a harness check: every row, few rounds


@dataclass
class DeviceTrace:
    """What the sampler saw of one device."""

    name: str
    roots: Callable[[], list[int]]
    log: Path
    started_at: float = 0.0
    peak_rss: int = 0
    samples: int = 0
    names: set[str] = field(default_factory=set)
    received: list[float] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)
    _offset: int = 0


class Sampler(SamplerThread):
    """Every 50 ms: RSS summed over each device's process tree, and new SuperNode log lines."""

    def __init__(self, devices: list[DeviceTrace]) -> None:
        self.devices = devices
        super().__init__()
        self.overruns = 0

    def _rss(self, device: DeviceTrace) -> int:
        import psutil

        total = 0
        seen: set[int] = set()
        for pid in device.roots():
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                if proc.pid in seen:
                    continue
                seen.add(proc.pid)
                try:
                    total += proc.memory_info().rss
                    device.names.add(
                        Path(proc.cmdline()[1] if len(proc.cmdline()) > 1 else proc.name()).name
                    )
                except (psutil.Error, IndexError):
                    continue
        return total

    def _read_log(self, device: DeviceTrace, now: float) -> None:
        try:
            with open(device.log, "rb") as fh:
                fh.seek(device._offset)
                chunk = fh.read()
        except OSError:
            return
        complete = chunk.rfind(b"\n") + 1
        device._offset += complete
        for line in chunk[:complete].decode(errors="replace").splitlines():
            if "Received successfully" in line:
                device.received.append(now)
            elif "Sent successfully" in line:
                device.sent.append(now)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            for device in self.devices:
                rss = self._rss(device)
                device.peak_rss = max(device.peak_rss, rss)
                device.samples += 1
                self._read_log(device, time.monotonic())
            spent = time.monotonic() - began
            if spent > SAMPLE_EVERY_S:
                self.overruns += 1
            self._stop.wait(max(0.0, SAMPLE_EVERY_S - spent))


@dataclass
class Design:
    """What one design's federation produced."""

    peak_rss_mb: list[float]
    reply_s: list[float]
    """Receive→reply per message, every device, in order (message 1 is the QUERY)."""
    startup_s: list[float]
    round_s: list[float]
    short_rounds: list[int]
    """Rounds in which not every device replied (reported, not hidden)."""
    processes: list[str]
    samples: int
    overruns: int


def _cloud(work: Path, sizes: Sizes, model_dir: Path) -> Any:
    return loopback_cloud(
        work,
        model_dir,
        num_rounds=sizes.rounds,
        strategy="fedavg",
        fraction_train=1.0,
        min_nodes=sizes.devices,
        wait_for_nodes_s=NODES_TIMEOUT_S,
        round_timeout_s=ROUND_TIMEOUT_S,
        local_epochs=sizes.local_epochs,
        seed=SEED,
    )


def run_design(design: str, sizes: Sizes, model_dir: Path, work: Path) -> Design:
    """Run one federation with devices of ``design`` ("new" or "old"); stop it all."""
    from cloud.supervisor import CloudStack
    from devices.emulate import EmulatedFleet, stack_fleet_spec
    from edge.flower_node import SuperNode
    from edge.process import ManagedProcess

    settings = _cloud(work, sizes, model_dir)
    stack = CloudStack(settings)
    fleet: EmulatedFleet | None = None
    legacy: list[ManagedProcess | SuperNode] = []
    traces: list[DeviceTrace] = []
    try:
        stack.start()
        spec = stack_fleet_spec(
            settings,
            stack,
            superlink=stack.superlink.address,  # type: ignore[union-attr]
            scheme="iid",
            seed=SEED,
        )
        fleet = EmulatedFleet(spec, work / "devices", sizes.devices)
        fleet.prepare()
        stack.submit_run(app_dir=LEGACY_APP_DIR if design == "old" else None)
        for device in fleet.devices:
            data_dir = device.config.parent / "data"
            if design == "new":
                trace = DeviceTrace(
                    device.name,
                    roots=lambda d=device: [d.process.pid] if d.process else [],  # type: ignore[misc]
                    log=data_dir / "supernode" / "supernode.log",
                )
                traces.append(trace)
                sampler_target = trace
                sampler_target.started_at = time.monotonic()
                device.start()
            else:
                serve_log = device.config.parent / "logs" / "serve.log"
                serve = ManagedProcess(
                    f"legacy serve {device.name}",
                    [
                        sys.executable,
                        "-m",
                        "edge.cli",
                        "edge",
                        "serve",
                        "--config",
                        str(device.config),
                    ],
                    log_path=serve_log,
                )
                node = SuperNode(
                    superlink=stack.superlink.address,  # type: ignore[union-attr]
                    data_dir=data_dir / "supernode",
                    node_config={"device-id": device.name, "trainer-address": ""},
                )
                trace = DeviceTrace(
                    device.name,
                    roots=lambda s=serve, n=node: [  # type: ignore[misc]
                        p.pid for p in (s.proc, n.process.proc if n.process else None) if p
                    ],
                    log=data_dir / "supernode" / "supernode.log",
                )
                traces.append(trace)
                trace.started_at = time.monotonic()
                serve.start()
                legacy.append(serve)
                match: list[re.Match[str]] = []

                def ready(log: Path = serve_log, found: list[re.Match[str]] = match) -> bool:
                    m = _READY.search(log.read_text(errors="replace")) if log.exists() else None
                    if m:
                        found.append(m)
                    return m is not None

                serve.wait_until(ready, timeout=120, what="serving")
                node.node_config["trainer-address"] = device_trainer_address(data_dir, match[0])
                legacy.append(node)
                node.start_with_retries()
        with Sampler(traces) as sampler:
            status = stack.wait_for_run(timeout=RUN_TIMEOUT_S)
            time.sleep(1.0)
        if status != "finished:completed":
            raise RuntimeError(f"{design} run ended {status}")
        run = stack.registry.latest_run()
        rounds = sorted(
            (r for r in stack.registry.list_rounds(run.id) if r.round >= 1),  # type: ignore[union-attr]
            key=lambda r: r.round,
        )
        short = [r.round for r in rounds if len(r.replied) != sizes.devices]
        if len(rounds) != sizes.rounds:
            raise RuntimeError(f"{design}: rounds {[r.round for r in rounds]}")
    finally:
        if fleet is not None:
            fleet.stop()
        for part in reversed(legacy):
            part.stop()
        stack.stop()
    reply_s: list[float] = []
    startup: list[float] = []
    for trace in traces:
        pairs = list(zip(trace.received, trace.sent, strict=False))
        reply_s += [b - a for a, b in pairs]
        if trace.sent:
            startup.append(trace.sent[0] - trace.started_at)
    return Design(
        peak_rss_mb=[t.peak_rss / 2**20 for t in traces],
        reply_s=reply_s,
        startup_s=startup,
        round_s=[float(r.duration) for r in rounds if r.duration is not None],
        short_rounds=short,
        processes=sorted({n for t in traces for n in t.names}),
        samples=min(t.samples for t in traces),
        overruns=sampler.overruns,
    )


def device_trainer_address(data_dir: Path, ready: re.Match[str]) -> str:
    """Where the old ClientApp reaches the Trainer: the local socket if there is one."""
    sock = data_dir / "run" / "local.sock"
    if sock.exists():
        return f"unix:{sock}"
    return f"{ready.group(1)}:{ready.group(2)}"


def _train_replies(design: Design, sizes: Sizes) -> list[float]:
    """Receive→reply of the TRAIN messages: every device's messages after its QUERY."""
    per_device = len(design.reply_s) // max(1, sizes.devices)
    out: list[float] = []
    for i in range(sizes.devices):
        out += design.reply_s[i * per_device + 1 : (i + 1) * per_device]
    return out


def build_report(
    sizes: Sizes, quick: bool, new: Design, old: Design, machine: dict[str, Any]
) -> Report:
    report = Report(
        name="device",
        title="Device runtime: one warm process next to the per-message ClientApp design (issue 16)",
        quick=quick,
        machine=machine,
        params={
            "devices": sizes.devices,
            "rounds": sizes.rounds,
            "local_epochs": sizes.local_epochs,
            "sample_every_s": SAMPLE_EVERY_S,
            "model": "digits MLP 64-64-10, batch 32",
        },
    )
    floor = "old design, same run (edge serve + SuperNode + SuperExec + flwr-clientapp)"
    peak_new, peak_old = max(new.peak_rss_mb), max(old.peak_rss_mb)
    train_new, train_old = _train_replies(new, sizes), _train_replies(old, sizes)
    report.results += [
        Result(
            "device peak RSS while training (all processes of one device)",
            peak_new,
            peak_old,
            "MB",
            floor,
            target="<= 250 MB and <= 0.5x old",
            met=peak_new <= 250 and bool(ratio_within(peak_new, peak_old, 0.5)),
            note=f"max over {sizes.devices} device(s), {sizes.rounds} rounds, sampled every 50 ms",
        ),
        Result(
            "receive → reply per TRAIN message, p50",
            statistics.median(train_new),
            statistics.median(train_old),
            "s",
            "fresh ClientApp process per message (old design)",
            note=f"{len(train_new)} vs {len(train_old)} messages; includes local training",
        ),
        Result(
            "receive → reply per TRAIN message, max",
            max(train_new),
            max(train_old),
            "s",
            "fresh ClientApp process per message (old design)",
        ),
        Result(
            "start-up to first reply (fresh device, median)",
            statistics.median(new.startup_s),
            statistics.median(old.startup_s),
            "s",
            floor,
            note="first process started → first reply sent by its SuperNode (the QUERY)",
        ),
        Result(
            f"round time p50, {sizes.devices} device(s)",
            statistics.median(new.round_s),
            statistics.median(old.round_s),
            "s",
            floor,
        ),
    ]
    report.details = {
        "new": dataclasses.asdict(new),
        "old": dataclasses.asdict(old),
    }
    report.notes += [
        "Processes seen under a device, new design: "
        + ", ".join(new.processes)
        + "; old: "
        + ", ".join(old.processes)
        + ".",
        "Receive→reply per TRAIN message, new: "
        + ", ".join(f"{s:.2f}" for s in train_new)
        + " s; old: "
        + ", ".join(f"{s:.2f}" for s in train_old)
        + " s (timestamps of the SuperNode's log lines, read every 50 ms).",
        "Peak RSS per device, new: "
        + ", ".join(f"{m:.0f}" for m in new.peak_rss_mb)
        + " MB; old: "
        + ", ".join(f"{m:.0f}" for m in old.peak_rss_mb)
        + " MB. RSS counts shared pages (libraries) once per process, as the issue asks; "
        f"{new.samples} / {old.samples} samples per device, {new.overruns} / {old.overruns} "
        "sampling passes took longer than 50 ms (machine shared with other work).",
        f"Rounds without a reply from every device: new {new.short_rounds or 'none'}, "
        f"old {old.short_rounds or 'none'}.",
        "The old design runs first, then the new one, each with its own cloud, on the same "
        "machine; the machine is shared (2 cores), so times are indicative.",
        "The new design's SuperNode runs with PYTHONOPTIMIZE=2 as `edgefl edge up` starts it "
        "(no docstrings: about 4.5 MB less); the old design's processes run as it started "
        "them, without it.",
    ]
    return report


def run(quick: bool = False, out_dir: Path | None = None) -> Report:
    sizes = QUICK if quick else FULL
    began = time.perf_counter()
    machine = machine_info()
    model_dir = mlp_model_dir()
    # The old design's flwr-clientapp processes import benchmarks.legacy_clientapp.
    os.environ["PYTHONPATH"] = str(REPO_ROOT) + (
        os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""
    )
    with tempfile.TemporaryDirectory(prefix="edgefl-bench-device-") as tmp_name:
        tmp = Path(tmp_name)
        old = run_design("old", sizes, model_dir, tmp / "old")
        new = run_design("new", sizes, model_dir, tmp / "new")
    report = build_report(sizes, quick, new, old, machine)
    return finish_report(report, began, out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.bench_device [--quick] [--out DIR]``."""
    return benchmark_main(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    sys.exit(main())
