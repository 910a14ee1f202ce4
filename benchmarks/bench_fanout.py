"""Fan-out: seconds from publishing a release to every device serving it (issue 4).

What runs, all on this machine in one run, through one real Mosquitto
(:class:`cloud.broker.Broker` on a free port):

* **ours**: N light devices — real :class:`edge.agent.Agent` instances, each with its own
  in-memory node (:class:`MemoryNode`, implementing ``ReleaseInstaller``: it parses the
  package as a device would, but does not load LiteRT nor write to disk) — in a couple of
  worker processes. The cloud side is the real :class:`cloud.publisher.Publisher` (chunks,
  signed manifest, both QoS 1 retained) and the real :class:`cloud.fleet_monitor.FleetMonitor`.
  Measured: from the start of ``publish_release`` to the moment the monitor has seen
  every device report the new version as served.
* **floor**: bare paho. N plain subscribers (same worker layout) receive the same
  chunk bytes published with QoS 1 by a bare paho client and each answers with a
  one-message acknowledgement once it has every chunk; measured from the first publish
  to the last acknowledgement. This is the same path (publish → broker → N devices →
  broker → cloud) without signatures, digests, manifests or status reports.

Each size is measured ``reps`` times (a new version each time); the median and the
maximum are reported. For every release the run also records the broker's and the cloud
process's CPU seconds (``psutil``) and the bytes the broker sent (its
``$SYS/broker/bytes/sent`` counter, published every second here), for ours and the floor.

Run ``python -m benchmarks.bench_fanout [--quick] [--fleets 10,100,1000] [--workers N]``;
``--worker`` is the device side.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil

from benchmarks.common import (
    REPO_ROOT,
    Report,
    Result,
    arg_parser,
    child_env,
    finish_report,
    mlp_model_dir,
    model_package,
    summarize,
)
from edge.process import ManagedProcess
from protos import codec

logger = logging.getLogger(__name__)

READY = "READY"
WAIT_S = 120.0
"""Longest wait for a fleet to converge or a worker to get ready."""


@dataclass(frozen=True)
class Sizes:
    """Fleet sizes, repetitions and worker processes per size."""

    fleets: tuple[int, ...]
    reps: int
    workers: int


FULL = Sizes(fleets=(10, 100, 1000), reps=5, workers=10)
QUICK = Sizes(fleets=(3,), reps=2, workers=1)
SYS_INTERVAL_S = 1
"""Seconds between the broker's ``$SYS`` statistics updates in this benchmark."""
BYTES_SENT_TOPIC = "$SYS/broker/bytes/sent"


class BrokerMeter:
    """The broker's CPU seconds (psutil) and its ``$SYS`` bytes-sent counter."""

    def __init__(self, broker: Any) -> None:
        self._proc = psutil.Process(broker.process.pid)
        self._cond = threading.Condition()
        self._bytes_sent = -1
        self._updates = 0
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sys-meter", protocol=mqtt.MQTTv5
        )
        self._client.on_connect = lambda c, *_a: c.subscribe(BYTES_SENT_TOPIC, qos=0)
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._bytes_sent = int(msg.payload)
            self._updates += 1
            self._cond.notify_all()

    def cpu_s(self) -> float:
        times = self._proc.cpu_times()
        return float(times.user + times.system)

    def bytes_sent(self) -> int:
        """The counter after its next update (so it counts everything sent until now)."""
        with self._cond:
            seen = self._updates
            if not self._cond.wait_for(lambda: self._updates >= seen + 2, 5 * SYS_INTERVAL_S):
                raise RuntimeError("the broker did not publish $SYS/broker/bytes/sent")
            return self._bytes_sent

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _own_cpu_s() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


@dataclass
class Costs:
    """Per-release resource use, one entry per release."""

    broker_cpu_s: list[float]
    cloud_cpu_s: list[float]
    broker_bytes: list[float]

    @classmethod
    def empty(cls) -> Costs:
        return cls([], [], [])

    def add(self, meter: BrokerMeter, before: tuple[float, float, int]) -> None:
        """Record one release measured from ``before`` (see :func:`_costs_now`)."""
        sent = meter.bytes_sent()
        self.broker_cpu_s.append(meter.cpu_s() - before[0])
        self.cloud_cpu_s.append(_own_cpu_s() - before[1])
        self.broker_bytes.append(float(sent - before[2]))

    def to_dict(self) -> dict[str, list[float]]:
        return dataclasses.asdict(self)


def _costs_now(meter: BrokerMeter) -> tuple[float, float, int]:
    sent = meter.bytes_sent()
    return meter.cpu_s(), _own_cpu_s(), sent


# -- the device side (worker processes) -------------------------------------------------


class MemoryNode:
    """A light device for the agent: versions and state in memory, packages parsed."""

    def __init__(self, device_id: str, fleet: str) -> None:
        self.device_id = device_id
        self.fleet = fleet
        self._version = 0
        self._state: dict[str, Any] = {}
        self._lock = threading.Lock()

    def serving_version(self) -> int:
        """The version installed last (0 = none)."""
        return self._version

    def install_release(self, version: int, data: bytes, sha256: str) -> None:
        """Parse the package (a real device refuses an unparsable one) and serve it."""
        codec.package_from_bytes(data)
        with self._lock:
            self._version = version

    def status(self) -> codec.DeviceStatus:
        """A SERVING status with the current version."""
        return codec.DeviceStatus(
            device_id=self.device_id,
            fleet=self.fleet,
            serving_version=self._version,
            state="SERVING" if self._version else "DEGRADED",
            timestamp_ms=int(time.time() * 1000),
        )

    def read_state(self) -> dict[str, Any]:
        """The agent's state."""
        with self._lock:
            return dict(self._state)

    def write_state(self, state: dict[str, Any]) -> None:
        """Replace the agent's state."""
        with self._lock:
            self._state = dict(state)


def _floor_topic(fleet: str, rep: int, index: int) -> str:
    return f"bench/{fleet}/data/{rep}/{index}"


def _ack_topic(fleet: str, device: str) -> str:
    return f"bench/{fleet}/ack/{device}"


class FloorSubscriber:
    """A bare paho subscriber that acknowledges each complete set of chunks."""

    def __init__(self, device_id: str, fleet: str, host: str, port: int, chunks: int) -> None:
        self.device_id = device_id
        self.fleet = fleet
        self.chunks = chunks
        self.subscribed = threading.Event()
        self._received: dict[int, set[int]] = {}
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, *_a: object) -> None:
        client.subscribe(f"bench/{self.fleet}/data/#", qos=1)

    def _on_message(self, client: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        _, _, _, rep, index = msg.topic.split("/")
        got = self._received.setdefault(int(rep), set())
        got.add(int(index))
        if len(got) == self.chunks:
            client.publish(_ack_topic(self.fleet, self.device_id), rep.encode(), qos=1)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def worker(args: argparse.Namespace) -> int:
    """Run ``args.count`` devices (agents or floor subscribers) until SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ids = [f"{args.fleet}-dev-{i}" for i in range(args.first, args.first + args.count)]
    stoppers: list[Callable[[], None]] = []
    if args.worker == "agents":
        from edge.agent import Agent, AgentSettings

        agents = [
            Agent(
                AgentSettings(
                    device_id=device,
                    fleet=args.fleet,
                    host=args.host,
                    port=args.port,
                    signing_public_key=args.pubkey,
                    status_interval_s=3600.0,
                ),
                MemoryNode(device, args.fleet),
            ).start()
            for device in ids
        ]
        for agent in agents:
            if not agent.wait_connected(WAIT_S):
                print(f"agent {agent.settings.device_id} not connected", flush=True)
                return 1
        stoppers = [agent.stop for agent in agents]
    else:
        subs = [FloorSubscriber(d, args.fleet, args.host, args.port, args.chunks) for d in ids]
        for sub in subs:
            if not sub.subscribed.wait(WAIT_S):
                print(f"subscriber {sub.device_id} not subscribed", flush=True)
                return 1
        stoppers = [sub.stop for sub in subs]
    print(READY, flush=True)
    stop.wait()
    threads = [threading.Thread(target=s) for s in stoppers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return 0


# -- the cloud side (this process) -------------------------------------------------------


def _start_workers(
    kind: str, n: int, sizes: Sizes, common: list[str], logs: Path
) -> list[ManagedProcess]:
    procs: list[ManagedProcess] = []
    per = -(-n // sizes.workers)
    try:
        for w, first in enumerate(range(0, n, per)):
            argv = [
                sys.executable,
                "-m",
                "benchmarks.bench_fanout",
                "--worker",
                kind,
                "--first",
                str(first),
                "--count",
                str(min(per, n - first)),
                *common,
            ]
            proc = ManagedProcess(
                f"{kind}-worker-{w}",
                argv,
                log_path=logs / f"{kind}-{n}-{w}.log",
                env=child_env(),
                cwd=REPO_ROOT,
            ).start()
            procs.append(proc)
        for proc in procs:
            proc.wait_until(
                lambda p=proc: READY in p.log_tail(10_000),  # type: ignore[misc]
                timeout=WAIT_S,
                what="ready",
            )
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs


def _measure_ours(
    broker: Any,
    meter: BrokerMeter,
    key: Any,
    pubkey: Path,
    n: int,
    sizes: Sizes,
    package: bytes,
    logs: Path,
) -> dict[str, Any]:
    from cloud.fleet_monitor import FleetMonitor
    from cloud.publisher import Publisher

    fleet = f"fan{n}"
    ids = [f"{fleet}-dev-{i}" for i in range(n)]
    arrivals: dict[str, float] = {}
    awaited = [0]
    lock = threading.Lock()

    def on_status(status: codec.DeviceStatus) -> None:
        now = time.perf_counter()
        with lock:
            if status.serving_version == awaited[0] and status.device_id not in arrivals:
                arrivals[status.device_id] = now

    monitor = FleetMonitor(host=broker.host, port=broker.port, fleet=fleet, on_status=on_status)
    monitor.start()
    common = ["--fleet", fleet, "--host", broker.host, "--port", str(broker.port)]
    procs = _start_workers("agents", n, sizes, [*common, "--pubkey", str(pubkey)], logs)
    totals: list[float] = []
    publish_s: list[float] = []
    per_device: list[float] = []
    costs = Costs.empty()
    try:
        monitor.wait_for_fleet_version(0, ids, WAIT_S)
        with Publisher(
            host=broker.host, port=broker.port, fleet=fleet, signing_key=key, timeout_s=WAIT_S
        ) as publisher:
            for version in range(1, sizes.reps + 1):
                with lock:
                    arrivals.clear()
                    awaited[0] = version
                before = _costs_now(meter)
                t0 = time.perf_counter()
                manifest = publisher.publish_release(
                    version=version,
                    parent_version=version - 1,
                    round=version,
                    package=package,
                    architecture_id="bench",
                    metrics={"accuracy": 0.9},
                )
                t_published = time.perf_counter()
                monitor.wait_for_fleet_version(version, ids, WAIT_S)
                t1 = time.perf_counter()
                totals.append(t1 - t0)
                publish_s.append(t_published - t0)
                with lock:
                    per_device.extend(t - t0 for t in arrivals.values())
                costs.add(meter, before)
    finally:
        for proc in procs:
            proc.stop()
        monitor.stop()
    return {
        "total_s": totals,
        "publish_call_s": publish_s,
        "per_device_s": summarize(per_device),
        "chunks": manifest.chunk_count,
        **costs.to_dict(),
    }


def _measure_floor(
    broker: Any, meter: BrokerMeter, n: int, sizes: Sizes, chunks: list[bytes], logs: Path
) -> dict[str, Any]:
    fleet = f"floor{n}"
    acks: dict[int, dict[str, float]] = {}
    cond = threading.Condition()
    subscribed = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        device = msg.topic.rsplit("/", 1)[1]
        with cond:
            acks.setdefault(int(msg.payload), {}).setdefault(device, now)
            cond.notify_all()

    cloud = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-floor-{n}", protocol=mqtt.MQTTv5
    )
    cloud.on_message = on_message
    cloud.on_connect = lambda c, *_a: c.subscribe(f"bench/{fleet}/ack/#", qos=1)
    cloud.on_subscribe = lambda *_a: subscribed.set()
    cloud.connect(broker.host, broker.port)
    cloud.loop_start()
    common = ["--fleet", fleet, "--host", broker.host, "--port", str(broker.port)]
    totals: list[float] = []
    per_device: list[float] = []
    costs = Costs.empty()
    procs: list[ManagedProcess] = []
    try:
        if not subscribed.wait(WAIT_S):
            raise RuntimeError("floor: the cloud client did not subscribe")
        procs = _start_workers("floor", n, sizes, [*common, "--chunks", str(len(chunks))], logs)
        for rep in range(1, sizes.reps + 1):
            before = _costs_now(meter)
            t0 = time.perf_counter()
            for i, chunk in enumerate(chunks):
                cloud.publish(_floor_topic(fleet, rep, i), chunk, qos=1)
            deadline = t0 + WAIT_S
            with cond:
                while len(acks.get(rep, {})) < n:
                    if not cond.wait(deadline - time.perf_counter()):
                        raise RuntimeError(f"floor: {len(acks.get(rep, {}))} of {n} acks")
                times = list(acks[rep].values())
            totals.append(max(times) - t0)
            per_device.extend(t - t0 for t in times)
            costs.add(meter, before)
    finally:
        for proc in procs:
            proc.stop()
        cloud.disconnect()
        cloud.loop_stop()
    return {"total_s": totals, "per_device_s": summarize(per_device), **costs.to_dict()}


def _rows(n: int, sizes: Sizes, ours: dict[str, Any], floor: dict[str, Any]) -> list[Result]:
    med = statistics.median
    floor_name = "bare paho publish → N subscribers → ack"
    return [
        Result(
            f"publish → all {n} devices serving, median of {sizes.reps}",
            med(ours["total_s"]),
            med(floor["total_s"]),
            "s",
            floor_name,
            note=f"publish call alone {med(ours['publish_call_s']) * 1000:.0f} ms",
        ),
        Result(
            f"publish → all {n} devices serving, max of {sizes.reps}",
            max(ours["total_s"]),
            max(floor["total_s"]),
            "s",
            floor_name,
        ),
        Result(
            f"publish → one device serving, p50 over devices ({n} devices)",
            ours["per_device_s"]["p50"],
            floor["per_device_s"]["p50"],
            "s",
            "bare paho, per subscriber",
        ),
        Result(
            f"broker CPU per release ({n} devices)",
            med(ours["broker_cpu_s"]),
            # CPU time is counted in clock ticks: a bare release to a few subscribers can
            # measure 0, which is no floor to compare against.
            med(floor["broker_cpu_s"]) or None,
            "s",
            "broker CPU, bare paho release",
        ),
        Result(
            f"cloud CPU per release ({n} devices)",
            med(ours["cloud_cpu_s"]),
            med(floor["cloud_cpu_s"]) or None,
            "s",
            "bare paho publisher + ack listener",
            note="Publisher + FleetMonitor + this harness's bookkeeping",
        ),
        Result(
            f"bytes sent by the broker per release ({n} devices)",
            med(ours["broker_bytes"]) / 2**20,
            med(floor["broker_bytes"]) / 2**20,
            "MiB",
            "bare paho release",
            note=f"{med(ours['broker_bytes']) / n / 1024:.1f} KiB per device",
        ),
    ]


def run(quick: bool = False, out_dir: Path | None = None, sizes: Sizes | None = None) -> Report:
    """Measure every fleet size and return the report (also written with ``out_dir``)."""
    from cloud.broker import Broker
    from protos import signing

    if sizes is None:
        sizes = QUICK if quick else FULL
    began = time.perf_counter()
    package = model_package(mlp_model_dir())
    from cloud.publisher import DEFAULT_CHUNK_SIZE

    chunks = codec.split_chunks(package, DEFAULT_CHUNK_SIZE)
    report = Report(
        name="fanout",
        title="Release fan-out over MQTT (issue 4)",
        quick=quick,
        params={
            "fleet_sizes": list(sizes.fleets),
            "reps_per_size": sizes.reps,
            "worker_processes": sizes.workers,
            "package_bytes": len(package),
            "chunk_bytes": DEFAULT_CHUNK_SIZE,
            "chunks": len(chunks),
        },
    )
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgefl-bench-fanout-") as tmp_name:
        tmp = Path(tmp_name)
        key = signing.generate_private_key()
        pubkey = tmp / "fleet.pub"
        signing.write_public_key(key.public_key(), pubkey)
        broker = Broker.on_free_port(tmp / "broker", sys_interval=SYS_INTERVAL_S).start()
        meter = BrokerMeter(broker)
        try:
            for n in sizes.fleets:
                ours = _measure_ours(broker, meter, key, pubkey, n, sizes, package, tmp)
                floor = _measure_floor(broker, meter, n, sizes, chunks, tmp)
                details[str(n)] = {"ours": ours, "floor": floor}
                report.results.extend(_rows(n, sizes, ours, floor))
        finally:
            meter.stop()
            broker.stop()
    report.notes.extend(
        [
            "Ours = real Publisher (chunks, then the Ed25519-signed manifest, QoS 1, retained; "
            "waits for every PUBACK), real Agents (signature, sequence, per-chunk and "
            "artifact SHA-256 checks, package parsed, status report), observed by the real "
            "FleetMonitor. Devices are in-memory (no LiteRT load, no disk write).",
            "Floor = the same chunk bytes published QoS 1 by a bare paho client to N bare "
            "paho subscribers, each acknowledging with one QoS 1 message once it has "
            "every chunk.",
            f"Devices run in {sizes.workers} worker process(es) per fleet size (fewer for "
            "fleets smaller than that); broker, cloud and devices share the machine's cores.",
            "CPU per release: the broker process, and the cloud process (Publisher and "
            "FleetMonitor for ours, the bare paho client for the floor), from psutil; broker "
            "bytes: the change of $SYS/broker/bytes/sent across the release (sys_interval "
            f"{SYS_INTERVAL_S} s), medians over the releases.",
            "No target is set by the issue for fan-out; the ratio shows our overhead "
            "over the broker's own delivery.",
        ]
    )
    report.details = details
    return finish_report(report, began, out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.bench_fanout [--quick] [--out DIR]``."""
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=("agents", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--fleet", help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pubkey", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--chunks", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--fleets", help="comma-separated fleet sizes, e.g. 10,100,1000")
    parser.add_argument("--workers", type=int, help="device worker processes per fleet")
    parser.add_argument("--reps", type=int, help="releases measured per fleet size")
    args = parser.parse_args(argv)
    from edge.logging_config import configure_logging

    configure_logging()
    if args.worker:
        return worker(args)
    base = QUICK if args.quick else FULL
    sizes = Sizes(
        fleets=tuple(int(n) for n in args.fleets.split(",")) if args.fleets else base.fleets,
        reps=args.reps or base.reps,
        workers=args.workers or base.workers,
    )
    report = run(args.quick, args.out, sizes)
    print(report.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
