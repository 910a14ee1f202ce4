"""Telemetry at fleet scale: 10,000 devices' statuses into the real cloud (issue 18).

What runs, all on this machine, through one real Mosquitto (:class:`cloud.broker.Broker`
with the cloud's configuration):

* **devices**: light simulated devices (:class:`LightDevice`), plain paho clients speaking
  the agent's protocol: client id = device id, MQTT 5, a persistent session, the retained
  OFFLINE Last Will, a subscription to the fleet's release manifest, and a retained QoS 1
  :class:`~protos.codec.DeviceStatus` on their status topic every ``interval`` seconds
  (the agent's default, 5 s), first reports spread over one interval. Many devices share
  one worker process and one thread: paho's sockets are driven by a ``selectors`` loop.
* **cloud** (one process, as ``edgefl cloud up`` runs it): the real
  :class:`cloud.fleet_monitor.FleetMonitor` writing batches into the real
  :class:`cloud.registry.Registry` (SQLite file, WAL) and the real web app under uvicorn.
  It prints its counters every second: statuses written, monitor backlog, write batches.
* **this process** asks ``/api/overview`` and ``/api/devices?limit=100`` while the load
  runs, samples the cloud process's RSS and the broker's ``$SYS`` counters, and reads
  the registry file at the end for the age of every device's status.

Reported: statuses/s ingested next to what the devices sent in the same window, whether
a backlog grew (the monitor's queue, the broker's store, and the gap between sent and
received, where Mosquitto queues a slow subscriber's QoS 0 messages unseen by ``$SYS``),
the age of every device's status in the registry at the end, the registry's write
latency per batch and per status, API latency p50/p99 under load next to ``/healthz``
(the web stack without the registry), cloud RSS, and the CPU of the cloud, the broker,
the device workers and everything else on the (shared) machine. Run ``python -m benchmarks.bench_telemetry [--quick] [--devices N]``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import random
import selectors
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
    percentile,
)
from edge.agent import DEFAULT_STATUS_INTERVAL_S
from edge.process import ManagedProcess
from protos import codec, topics

logger = logging.getLogger(__name__)

FLEET = "tele"
READY = "READY"
STATS = "STATS "


@dataclass(frozen=True)
class Sizes:
    """How many devices, how often they report, how long the load is measured."""

    devices: int
    interval_s: float
    workers: int
    warmup_s: float
    measure_s: float


FULL = Sizes(
    devices=10_000, interval_s=DEFAULT_STATUS_INTERVAL_S, workers=4, warmup_s=30, measure_s=90
)
QUICK = Sizes(devices=40, interval_s=1.0, workers=1, warmup_s=3, measure_s=6)


# -- devices (worker processes) ----------------------------------------------------------


class LightDevice:
    """One simulated device: a paho client whose socket the worker's selector drives."""

    def __init__(self, device_id: str, host: str, port: int) -> None:
        self.device_id = device_id
        self.topic = topics.device_status(FLEET, device_id)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5
        )
        self.client.will_set(self.topic, self._status("OFFLINE"), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.connected = False
        self.host = host
        self.port = port
        self.sent = 0

    def _on_connect(self, client: mqtt.Client, _u: object, _f: Any, rc: Any, _p: object) -> None:
        self.connected = not rc.is_failure
        if self.connected:
            client.subscribe(topics.release_manifest(FLEET), qos=1)

    def _status(self, state: str) -> bytes:
        return codec.status_to_bytes(
            codec.DeviceStatus(
                device_id=self.device_id,
                fleet=FLEET,
                serving_version=1,
                state=state,
                timestamp_ms=int(time.time() * 1000),
                sample_count=1797,
                cpu_percent=random.uniform(2, 30),
                rss_bytes=95 * 2**20,
                disk_free_bytes=8 * 2**30,
                memory_available_bytes=2 * 2**30,
                profile="rpi4",
                last_metrics={"accuracy": 0.95, "loss": 0.17},
                edgefl_version="bench",
            )
        )

    def connect(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(self.host, self.port, keepalive=60, clean_start=False, properties=props)

    def report(self) -> None:
        if self.connected:
            self.client.publish(self.topic, self._status("SERVING"), qos=1, retain=True)
            self.sent += 1


def device_worker(args: argparse.Namespace) -> int:
    """Run ``args.count`` light devices in one thread until SIGTERM."""
    # Real devices bring their own CPUs: here they get only what the cloud, the broker
    # and everything else on the machine leave idle (SCHED_IDLE; nice 10 still let four
    # workers take ~1.1 of the 2 cores while the cloud got ~0.3).
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    devices = [
        LightDevice(f"{FLEET}-{i:05d}", args.host, args.port)
        for i in range(args.first, args.first + args.count)
    ]
    sel = selectors.DefaultSelector()
    by_fd: dict[int, LightDevice] = {}

    def pump(timeout: float) -> None:
        for key, _ in sel.select(timeout):
            dev = by_fd[key.fd]
            if dev.client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                sel.unregister(key.fd)
                dev.connected = False
        for dev in devices:
            if dev.client.want_write():
                dev.client.loop_write()

    for i, dev in enumerate(devices):
        dev.connect()
        sock = dev.client.socket()
        by_fd[sock.fileno()] = dev
        sel.register(sock, selectors.EVENT_READ)
        if i % 50 == 49:
            pump(0.0)
            time.sleep(0.05)  # about 1,000 connections a second per worker
    deadline = time.monotonic() + 60
    while not all(d.connected for d in devices) and time.monotonic() < deadline:
        pump(0.1)
    missing = [d.device_id for d in devices if not d.connected]
    if missing:
        print(f"{len(missing)} devices not connected, e.g. {missing[:3]}", flush=True)
        return 1
    print(READY, flush=True)
    start = time.monotonic()
    due = [(start + random.uniform(0, args.interval), d) for d in devices]
    due.sort(key=lambda t: t[0])
    next_misc = start
    next_print = start + 1.0
    while not stop.is_set():
        now = time.monotonic()
        fired = 0
        while due and due[0][0] <= now:
            at, dev = due.pop(0)
            dev.report()
            due.append((at + args.interval, dev))
            fired += 1
        if fired:
            due.sort(key=lambda t: t[0])
        if now >= next_misc:
            for dev in devices:
                dev.client.loop_misc()
            next_misc = now + 1.0
        if now >= next_print:
            print(
                f"{STATS}{json.dumps({'t': time.time(), 'sent': sum(d.sent for d in devices), 'outq': sum(len(d.client._out_packet) for d in devices), 'outmsgs': sum(len(d.client._out_messages) for d in devices), 'conn': sum(d.connected for d in devices)})}",
                flush=True,
            )
            next_print = now + 1.0
        wait = min(0.05, max(0.0, (due[0][0] - time.monotonic()) if due else 0.05))
        pump(wait)
    for dev in devices:
        dev.client.disconnect()
        if dev.client.want_write():
            dev.client.loop_write()
    return 0


# -- the cloud (one process) -------------------------------------------------------------


def cloud_worker(args: argparse.Namespace) -> int:
    """Monitor → registry batches, and the web app; counters on stdout every second."""
    from cloud.fleet_monitor import FleetMonitor
    from cloud.registry import Registry, sqlite_url
    from cloud.web import WebServer, create_app

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    registry = Registry(sqlite_url(args.db))
    lock = threading.Lock()
    written = [0]
    batches: list[tuple[int, float]] = []

    def on_statuses(statuses: list[codec.DeviceStatus]) -> None:
        t0 = time.perf_counter()
        registry.upsert_device_statuses(statuses)
        took = time.perf_counter() - t0
        with lock:
            written[0] += len(statuses)
            batches.append((len(statuses), took))

    monitor = FleetMonitor(
        host=args.host,
        port=args.port,
        fleet=FLEET,
        on_status_batch=on_statuses,
        on_event_batch=registry.record_events,
    ).start()
    web = WebServer(create_app(registry, fleet=FLEET, operator_token=None))
    print(f"URL {web.start()}", flush=True)
    print(READY, flush=True)
    while not stop.wait(1.0):
        with lock:
            line = {
                "t": time.time(),
                "written": written[0],
                "received": monitor.received,
                "superseded": monitor.superseded,
                "processed": monitor.statuses_handled + monitor.superseded,
                "backlog": monitor.backlog,
                "batches": batches[:],
            }
            batches.clear()
        print(f"{STATS}{json.dumps(line)}", flush=True)
    web.stop()
    monitor.stop()
    registry.close()
    return 0


# -- this process: orchestration and measurement -------------------------------------------


def _stats(proc: ManagedProcess) -> list[dict[str, Any]]:
    text = proc.log_path.read_text(errors="replace")
    return [json.loads(line[len(STATS) :]) for line in text.splitlines() if line.startswith(STATS)]


def _start(name: str, argv: list[str], logs: Path) -> ManagedProcess:
    return ManagedProcess(
        name,
        [sys.executable, "-m", "benchmarks.bench_telemetry", *argv],
        log_path=logs / f"{name}.log",
        env=child_env(),
        cwd=REPO_ROOT,
    ).start()


def _sent_at(workers: Sequence[ManagedProcess]) -> tuple[Callable[[float], float], float, float]:
    """``sent(t)``: statuses all device workers had sent at wall time ``t``, interpolated
    between each worker's counter lines, and the span ``(first, last)`` it covers.

    The workers run with SCHED_IDLE and print their counters when they get the CPU, up to
    seconds late; their last line next to the cloud's latest made the gap between sent and
    received swing by ±1,000 messages from one second to the next.
    """
    series = [[(s["t"], s["sent"]) for s in _stats(w)] for w in workers]
    first = max(points[0][0] for points in series)
    last = min(points[-1][0] for points in series)

    def sent(t: float) -> float:
        total = 0.0
        for points in series:
            i = bisect.bisect_left(points, (t, -1))
            if i == 0:
                total += points[0][1]
            elif i == len(points):
                total += points[-1][1]
            else:
                (t0, n0), (t1, n1) = points[i - 1], points[i]
                total += n0 + (n1 - n0) * (t - t0) / (t1 - t0) if t1 > t0 else n1
        return total

    return sent, first, last


def _status_ages(db: Path) -> list[float]:
    """Seconds since each device's status in the registry was taken (device clock = ours)."""
    import sqlite3

    now_ms = time.time() * 1000
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT timestamp_ms FROM devices").fetchall()
    finally:
        conn.close()
    return sorted((now_ms - ts) / 1000 for (ts,) in rows)


def _wait_ready(proc: ManagedProcess, timeout: float) -> None:
    proc.wait_until(lambda: READY in proc.log_tail(50), timeout=timeout, what="ready")


class SysMeter:
    """Samples the broker's ``$SYS`` counters (store size, publishes in, out and dropped)."""

    STORED = "$SYS/broker/store/messages/count"
    DROPPED = "$SYS/broker/publish/messages/dropped"
    SENT = "$SYS/broker/publish/messages/sent"

    def __init__(self, host: str, port: int) -> None:
        self.latest: dict[str, int] = {}
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sys-meter", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, *_a: c.subscribe("$SYS/#", 0)
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.payload.isdigit():  # $SYS also has version strings and load averages
            self.latest[msg.topic] = int(msg.payload)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Prober:
    """Asks the web API in a loop and records each answer's latency (seconds)."""

    PATHS = ("/api/overview", "/api/devices?limit=100", "/healthz")

    def __init__(self, base_url: str) -> None:
        import httpx

        self._client = httpx.Client(base_url=base_url, timeout=30.0)
        self.latencies: dict[str, list[float]] = {p: [] for p in self.PATHS}
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Prober:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in self.PATHS:
                t0 = time.perf_counter()
                try:
                    ok = self._client.get(path).status_code == 200
                except Exception:
                    ok = False
                if ok:
                    self.latencies[path].append(time.perf_counter() - t0)
                else:
                    self.failures += 1
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._client.close()


def _slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against their index (units per sample)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x = (n - 1) / 2
    mean_y = sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den


def run(quick: bool = False, out_dir: Path | None = None, sizes: Sizes | None = None) -> Report:
    """Drive the load, measure, return the report (also written with ``out_dir``)."""
    from cloud.broker import Broker

    sizes = sizes or (QUICK if quick else FULL)
    began = time.perf_counter()
    report = Report(
        name="telemetry",
        title="Telemetry from a large fleet into the cloud (issue 18)",
        quick=quick,
        params={
            "devices": sizes.devices,
            "status_interval_s": sizes.interval_s,
            "device_workers": sizes.workers,
            "warmup_s": sizes.warmup_s,
            "measured_s": sizes.measure_s,
        },
    )
    with tempfile.TemporaryDirectory(prefix="edgefl-bench-telemetry-") as tmp_name:
        tmp = Path(tmp_name)
        broker = Broker.on_free_port(tmp / "broker", sys_interval=1).start()
        procs: list[ManagedProcess] = []
        try:
            common = ["--host", broker.host, "--port", str(broker.port)]
            cloud = _start(
                "cloud", ["--worker", "cloud", *common, "--db", str(tmp / "reg.db")], tmp
            )
            procs.append(cloud)
            _wait_ready(cloud, 60)
            url = next(
                line.split(" ", 1)[1]
                for line in cloud.log_path.read_text().splitlines()
                if line.startswith("URL ")
            )
            per = -(-sizes.devices // sizes.workers)
            workers = []
            for w, first in enumerate(range(0, sizes.devices, per)):
                workers.append(
                    _start(
                        f"devices-{w}",
                        [
                            "--worker",
                            "devices",
                            *common,
                            "--first",
                            str(first),
                            "--count",
                            str(min(per, sizes.devices - first)),
                            "--interval",
                            str(sizes.interval_s),
                        ],
                        tmp,
                    )
                )
            procs.extend(workers)
            for proc in workers:
                _wait_ready(proc, 180)
            time.sleep(sizes.warmup_s)
            meter = SysMeter(broker.host, broker.port)
            prober = Prober(url).start()
            time.sleep(1.5)  # a first $SYS sample
            cloud_ps = psutil.Process(cloud.pid)
            skip = len(_stats(cloud))
            cpu0 = cloud_ps.cpu_times()
            broker_ps = psutil.Process(broker.process.pid)  # type: ignore[union-attr]
            bcpu0 = broker_ps.cpu_times()
            device_ps = [psutil.Process(w.pid) for w in workers]
            dcpu0 = sum(sum(p.cpu_times()[:2]) for p in device_ps)
            machine0 = psutil.cpu_times()
            sys0 = dict(meter.latest)
            rss: list[float] = []
            broker_rss: list[float] = []
            stored: list[float] = []
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < sizes.measure_s:
                rss.append(cloud_ps.memory_info().rss / 2**20)
                broker_rss.append(broker_ps.memory_info().rss / 2**20)
                if SysMeter.STORED in meter.latest:
                    stored.append(float(meter.latest[SysMeter.STORED]))
                time.sleep(1.0)
            elapsed = time.perf_counter() - t0
            window_end = time.time()
            ages_s = _status_ages(tmp / "reg.db")
            prober.stop()
            sys1 = dict(meter.latest)
            meter.stop()
            cpu1 = cloud_ps.cpu_times()
            bcpu1 = broker_ps.cpu_times()
            dcpu1 = sum(sum(p.cpu_times()[:2]) for p in device_ps)
            machine1 = psutil.cpu_times()
            load_end = os.getloadavg()[0]
            time.sleep(1.5)  # every device worker's counters past the window's end
            sent_at, sent_first, sent_last = _sent_at(workers)
            window = [
                s
                for s in _stats(cloud)[skip:]
                if sent_first <= s["t"] <= min(sent_last, window_end)
            ]
            broker_log = broker.log_path.read_text(errors="replace")
        finally:
            for proc in reversed(procs):
                proc.stop()
            broker.stop()
    if len(window) < 2:
        raise RuntimeError("the cloud printed too few counters during the measurement")
    seconds = window[-1]["t"] - window[0]["t"]
    written = (window[-1]["written"] - window[0]["written"]) / seconds
    received = (window[-1]["received"] - window[0]["received"]) / seconds
    processed = (window[-1]["processed"] - window[0]["processed"]) / seconds
    superseded = (window[-1]["superseded"] - window[0]["superseded"]) / seconds
    # Sent and received at the same instants (each cloud counter line's time).
    sent_rate = (sent_at(window[-1]["t"]) - sent_at(window[0]["t"])) / seconds
    gap = [sent_at(s["t"]) - s["received"] for s in window]
    sys_rates = {
        t.rsplit("/", 1)[-1]: (sys1.get(t, 0) - sys0.get(t, 0)) / elapsed
        for t in (SysMeter.DROPPED, SysMeter.SENT)
    }
    drop_warnings = broker_log.count("Outgoing messages are being dropped")
    offered = sizes.devices / sizes.interval_s
    backlog = [float(s["backlog"]) for s in window]
    growth = _slope(backlog)
    gap_growth = _slope(gap)
    batch_s = [took for s in window for _, took in s["batches"]]
    batch_n = [n for s in window for n, _ in s["batches"]]
    per_status_ms = 1000 * sum(batch_s) / max(1, sum(batch_n))
    cloud_cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed
    broker_cpu = (bcpu1.user + bcpu1.system - bcpu0.user - bcpu0.system) / elapsed
    devices_cpu = (dcpu1 - dcpu0) / elapsed
    busy = sum(machine1[:3]) - sum(machine0[:3])  # user, nice, system
    machine_cpu = busy / elapsed
    others_cpu = max(0.0, machine_cpu - cloud_cpu - broker_cpu - devices_cpu)
    stored_growth = _slope(stored)
    broker_rss_growth = 60 * _slope(broker_rss)
    max_age = ages_s[-1] if ages_s else float("inf")
    no_growth = (
        growth < 0.01 * sent_rate
        and max(backlog[-5:]) < offered * sizes.interval_s
        and gap_growth < 0.01 * sent_rate
        and stored_growth < 0.01 * sent_rate
    )
    lat = prober.latencies
    n = sizes.devices
    ms = 1000.0
    report.results.extend(
        [
            Result(
                f"statuses/s ingested ({n} devices every {sizes.interval_s:g} s)",
                processed,
                sent_rate,
                "statuses/s",
                "sent by the devices, same window",
                target=f"{n} devices at the default interval, no growing backlog",
                met=no_growth and processed >= 0.95 * sent_rate and len(ages_s) == n,
                note=f"received {received:.0f}/s by the monitor; "
                f"{written:.0f}/s written to the registry, {superseded:.0f}/s superseded "
                f"by a newer status of the same device in the same batch; "
                f"sent - received slope {gap_growth:+.1f} msg/s (the broker's queue for the "
                f"monitor); monitor backlog slope {growth:+.1f} msg/s, max {max(backlog):.0f}; "
                f"broker store slope {stored_growth:+.1f} msg/s, "
                f"RSS {broker_rss_growth:+.2f} MB/min; offered {offered:,.0f}/s",
            ),
            Result(
                "age of each device's status in the registry at the end, p50",
                percentile(ages_s, 50),
                sizes.interval_s,
                "s",
                "the status interval",
                note=f"{len(ages_s)} of {n} devices in the registry",
            ),
            Result(
                "age of each device's status in the registry at the end, max",
                max_age,
                sizes.interval_s,
                "s",
                "the status interval",
            ),
            Result(
                "registry write per batch, p50",
                ms * percentile(batch_s, 50),
                None,
                "ms",
                note=f"mean batch {statistics.mean(batch_n):.0f} statuses; "
                f"{per_status_ms:.3f} ms per status",
            ),
            Result("registry write per batch, p99", ms * percentile(batch_s, 99), None, "ms"),
        ]
    )
    for path in ("/api/overview", "/api/devices?limit=100"):
        for q in (50, 99):
            report.results.append(
                Result(
                    f"GET {path} p{q} under load",
                    ms * percentile(lat[path], q),
                    ms * percentile(lat["/healthz"], q),
                    "ms",
                    f"GET /healthz p{q}, same moment",
                    note=f"{len(lat[path])} requests",
                )
            )
    report.results.extend(
        [
            Result("cloud RSS, max under load", max(rss), None, "MB", note=f"{n} devices known"),
            Result(
                "cloud CPU under load",
                cloud_cpu,
                None,
                "cores",
                note="monitor + registry + web app process",
            ),
            Result("broker CPU under load", broker_cpu, None, "cores"),
            Result(
                "device workers CPU under load",
                devices_cpu,
                None,
                "cores",
                note=f"{sizes.workers} processes, SCHED_IDLE",
            ),
            Result(
                "CPU of everything else on the machine, same window",
                others_cpu,
                float(psutil.cpu_count() or 0),
                "cores",
                "cores on the machine",
                note=f"all busy cores {machine_cpu:.2f}; load average {load_end:.1f} at the end",
            ),
        ]
    )
    report.notes.extend(
        [
            "Devices are light simulated devices (plain paho clients speaking the agent's "
            "status protocol: client id, MQTT 5 persistent session, retained OFFLINE Last "
            "Will, manifest subscription, a retained QoS 1 DeviceStatus every interval) in "
            f"{sizes.workers} worker process(es), one thread each.",
            "The cloud process runs the real FleetMonitor (acknowledges at once, decodes on "
            "its worker thread), the real Registry on SQLite (one transaction per batch of "
            "statuses) and the real web app under uvicorn.",
            "Ingested = statuses the monitor took off its queue (decoded and written, or "
            "superseded by a newer status of the same device in the same batch: the "
            "monitor coalesces when it is behind), next to what the devices counted as sent "
            "in the same window.",
            "Backlog, three places, sampled every second: the monitor's own queue; the "
            "broker's $SYS/broker/store/messages/count (retained + queued QoS 1); and "
            "devices' sent minus the monitor's received, which is where a slow subscriber's "
            "QoS 0 statuses wait (Mosquitto queues them per client, up to "
            "max_queued_messages, counted in neither $SYS figure; its RSS grows with them), "
            "taken at each of the cloud's counter lines with the devices' sent counters "
            "interpolated to the same instant (device workers print theirs late when idle). "
            "'No growing backlog' = each slope below 1% of the sent rate and the monitor's "
            "last five samples below one interval's worth of statuses. Device workers run "
            "with SCHED_IDLE (real devices bring their own CPUs).",
            "Age: at the end of the window, now minus the device timestamp of each "
            "device's status in the registry (the devices stamp statuses with the same "
            "clock); with no backlog it stays under about one interval.",
            f"API failures during the load: {prober.failures}.",
            "Broker, cloud, devices and this prober share the machine's cores.",
        ]
    )
    report.details = {
        "backlog": backlog,
        "batches_s": batch_s,
        "batch_sizes": batch_n,
        "rss_mb": rss,
        "broker_stored": stored,
        "broker_rss_mb": broker_rss,
        "monitor_received_per_s": received,
        "broker_per_s": sys_rates,
        "broker_drop_warnings": drop_warnings,
        "sent_minus_received": gap,
        "status_age_s": ages_s,
        "latency_s": lat,
    }
    return finish_report(report, began, out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.bench_telemetry [--quick] [--devices N] [--out DIR]``."""
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, help="simulated devices")
    parser.add_argument("--interval", type=float, help="seconds between a device's statuses")
    parser.add_argument("--workers", type=int, help="device worker processes")
    parser.add_argument("--measure", type=float, help="seconds of measured load")
    parser.add_argument("--worker", choices=("devices", "cloud"), help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from edge.logging_config import configure_logging

    configure_logging()
    if args.worker == "devices":
        return device_worker(args)
    if args.worker == "cloud":
        return cloud_worker(args)
    base = QUICK if args.quick else FULL
    sizes = Sizes(
        devices=args.devices or base.devices,
        interval_s=args.interval or base.interval_s,
        workers=args.workers or base.workers,
        warmup_s=base.warmup_s,
        measure_s=args.measure or base.measure_s,
    )
    print(run(args.quick, args.out, sizes).markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
