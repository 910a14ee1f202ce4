"""Soak: inference under continuous load while new versions are pushed (issue 8).

What runs, all on this machine in one run:

* a real Mosquitto (:class:`cloud.broker.Broker` on a free port);
* a real device: ``edgefl edge serve`` in a subprocess with an ``[mqtt]`` section, so its
  MQTT agent downloads, verifies and installs every release while it serves;
* the real cloud side in this process: :class:`cloud.publisher.Publisher` (chunks and the
  Ed25519-signed manifest) and :class:`cloud.fleet_monitor.FleetMonitor` (the device's
  status reports and events);
* ``clients`` client threads, each with its own gRPC channel and our own stubs from
  ``protos.kserve`` (not tritonclient: its protos share the ``inference`` package with
  ours), each calling ModelInfer batch 1 with its own fixed input, back to back.

The device boots with version 1 (weights **A**, from its initial package). While the
clients make ``requests`` calls in total, ``versions`` new versions (2, 3, …) are
published, alternating weights **B** (even versions) and **A** (odd ones), so an output
tells the versions apart. Version ``k`` is published once the clients have completed
``k / (versions + 1)`` of the calls (and the previous version is served), which spreads
the pushes evenly over the load whatever the throughput. Before the soak, the same
clients make ``baseline`` calls with no push going on: the throughput and latency
floor of the same server on the same machine.

Checks (counted and reported; a benchmark asserts nothing):

* **errors**: every call that raised ``grpc.RpcError`` (or answered without an output).
* **older than reported** (the issue's wording): a call violates this when the
  ``model_version`` of its response is lower than the highest version the *device had
  reported as serving* before the call was sent. "Reported" means: a status report
  (its ``serving_version``) or a ``release_installed`` event, both published by the
  device's agent only after the swap, and received by the FleetMonitor in this process
  strictly before the client took the send timestamp (``time.perf_counter``, shared
  by every thread). Such a call reaches the server after the swap, so it must be
  answered by that version or a newer one.
* **older than already seen**: a call violates this when its response's
  ``model_version`` is lower than the highest ``model_version`` of any response (any
  client) received strictly before the call was sent.
* **wrong output**: a response whose output differs (max abs difference > ``ATOL``)
  from the output of the version it reports, computed in this process with
  ``LiteRTModel`` on the same input and the weights of that version. The two weight
  sets' outputs are checked to differ by far more than ``ATOL`` first.

Reported besides: throughput and latency during the soak next to the baseline, versions
published and versions seen in responses, publish → "device reports it serving"
seconds, install failures or rejections the device reported, and the RSS of every
long-running process (``edgefl edge serve``, its children if any, and mosquitto)
before the soak (after the baseline, serving version 1) and after it (every version
installed, 1 s of rest), with the peak sampled every 0.5 s in between: growth is
reported, not asserted.

Run ``python -m benchmarks.bench_soak [--quick] [--out DIR]``.
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from benchmarks.common import (
    REPO_ROOT,
    Report,
    Result,
    SamplerThread,
    benchmark_main,
    child_env,
    finish_report,
    mlp_model_dir,
    summarize,
)
from edge.process import ManagedProcess

logger = logging.getLogger(__name__)

MODEL_NAME = "digits"
FLEET = "soak"
DEVICE_ID = "soak-device"
ATOL = 1e-5
"""Largest absolute difference between a served output and the expected one."""
WAIT_S = 120.0
"""Longest wait for the device to start or to report a version served."""
CALL_TIMEOUT_S = 30.0
RSS_INTERVAL_S = 0.5


@dataclass(frozen=True)
class Sizes:
    """How much the soak does."""

    requests: int
    """ModelInfer calls during the soak, all clients together."""
    clients: int
    versions: int
    """New versions published during the soak."""
    baseline: int
    """Calls (all clients together) before the soak, with no push going on."""
    warmup: int
    """Unmeasured calls per client before the baseline."""


FULL = Sizes(requests=100_000, clients=4, versions=50, baseline=10_000, warmup=100)
QUICK = Sizes(requests=2_000, clients=4, versions=3, baseline=400, warmup=10)


# -- models -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weights:
    """The two weight sets, their packages and each client's expected outputs."""

    packages: tuple[bytes, bytes]
    """Package bytes of weights A (odd versions) and B (even versions)."""
    inputs: list[np.ndarray]
    """One ``[1, 64]`` float32 input per client."""
    expected: tuple[list[np.ndarray], list[np.ndarray]]
    """Expected output per client input, for A and for B."""
    separation: float
    """Smallest max-abs difference between A's and B's output over the inputs."""
    architecture_id: str

    def for_version(self, version: int) -> int:
        """0 (weights A) for odd versions, 1 (weights B) for even ones."""
        return 0 if version % 2 else 1


def build_weights(model_dir: Path, clients: int) -> Weights:
    """Weights A (the model's own), B (A plus seeded noise), packages and expectations."""
    from edge.litert_model import LiteRTModel
    from protos import codec

    model = LiteRTModel.load(model_dir)
    card = model.card
    tflite = (model_dir / "model.tflite").read_bytes()
    weights_a = model.get_weights()
    rng = np.random.default_rng(8)
    weights_b = {
        name: (w + rng.normal(0.0, 0.2, size=w.shape)).astype(np.float32)
        for name, w in weights_a.items()
    }
    packages = tuple(
        codec.package_to_bytes(
            codec.ModelPackage(
                architecture_id=card.architecture_id,
                tflite=tflite,
                card_json=card.to_json(),
                weights=w,
            )
        )
        for w in (weights_a, weights_b)
    )
    inputs = [
        np.random.default_rng(100 + i).random((1, *card.input_shape), dtype=np.float32)
        for i in range(clients)
    ]
    expected: list[list[np.ndarray]] = []
    for w in (weights_a, weights_b):
        model.set_weights(w)
        expected.append([np.asarray(model.infer(x), dtype=np.float32) for x in inputs])
    separation = min(
        float(np.max(np.abs(a - b))) for a, b in zip(expected[0], expected[1], strict=True)
    )
    if separation <= 100 * ATOL:
        raise RuntimeError(f"weights A and B give nearly the same outputs ({separation:.2e})")
    return Weights(
        packages=(packages[0], packages[1]),
        inputs=inputs,
        expected=(expected[0], expected[1]),
        separation=separation,
        architecture_id=card.architecture_id,
    )


# -- the device ---------------------------------------------------------------------------


def write_device_config(root: Path, broker_host: str, broker_port: int, pubkey: Path) -> Path:
    """``edge.toml`` of the soaked device: free gRPC port, MQTT agent, initial package A."""
    from edge import config as edge_config

    root.mkdir(parents=True, exist_ok=True)
    settings = edge_config.Settings(
        device=edge_config.DeviceSettings(id=DEVICE_ID, fleet=FLEET, data_dir=root / "data"),
        grpc=edge_config.GrpcSettings(port=0),
        mqtt=edge_config.MqttSettings(
            host=broker_host, port=broker_port, status_interval_s=2.0
        ),
        trust=edge_config.TrustSettings(signing_public_key=pubkey),
        model=edge_config.ModelSettings(name=MODEL_NAME, initial_package=root / "initial.pkg"),
    )
    return edge_config.write_settings(settings, root / "edge.toml")


def start_device(config: Path, log: Path) -> tuple[ManagedProcess, str]:
    """Start ``edgefl edge serve``; return it and its gRPC address once it is serving."""
    from edge.server import READY_LINE

    prefix = READY_LINE.split("{", 1)[0]
    edgefl = str(Path(sys.executable).parent / "edgefl")
    proc = ManagedProcess(
        "edgefl-edge-serve",
        [edgefl, "edge", "serve", "--config", str(config)],
        log_path=log,
        env=child_env(),
        cwd=REPO_ROOT,
    ).start()
    address: list[str] = []

    def ready() -> bool:
        for line in proc.log_tail(200).splitlines():
            if line.startswith(prefix):
                address[:] = [line[len(prefix) :].strip()]
                return True
        return False

    try:
        proc.wait_until(ready, timeout=WAIT_S, what="serving")
    except BaseException:
        proc.stop()
        raise
    return proc, address[0]


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and its descendants, MB."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


class RssWatch(SamplerThread):
    """Samples the tree RSS of some processes every ``interval`` seconds; keeps the peaks."""

    def __init__(self, pids: dict[str, int], interval: float = RSS_INTERVAL_S) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        super().__init__(name="rss-watch")

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                try:
                    self.samples[name].append((time.perf_counter() - t0, tree_rss_mb(pid)))
                except psutil.Error:
                    continue
            self._stop.wait(self.interval)

    def peak(self, name: str) -> float:
        return max((mb for _, mb in self.samples[name]), default=0.0)


# -- the clients --------------------------------------------------------------------------


@dataclass
class ClientLog:
    """What one client thread saw, call by call (parallel lists)."""

    sent: list[float] = field(default_factory=list)
    received: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    outputs: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    done: int = 0
    """Calls completed (answered or failed), read by the publisher thread."""


def make_stub(address: str) -> tuple[grpc.Channel, Callable[..., Any]]:
    """A channel and its ModelInfer callable (our own KServe stubs)."""
    from protos.kserve import grpc_predict_v2_pb2_grpc as kserve_grpc

    channel = grpc.insecure_channel(address)
    return channel, kserve_grpc.GRPCInferenceServiceStub(channel).ModelInfer


def make_request(x: np.ndarray) -> Any:
    """A batch-1 ModelInferRequest carrying ``x`` as raw FP32 bytes."""
    from protos.kserve import grpc_predict_v2_pb2 as kserve_pb2

    request = kserve_pb2.ModelInferRequest(model_name=MODEL_NAME)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "x", "FP32"
    tensor.shape.extend(x.shape)
    request.raw_input_contents.append(x.astype(np.float32).tobytes())
    return request


def run_clients(
    address: str, inputs: list[np.ndarray], total: int, warmup: int
) -> tuple[list[ClientLog], float, threading.Thread]:
    """Start one thread per input making ``total // len(inputs)`` calls after ``warmup``.

    Returns once every client finished its warm-up: the logs, the instant the measured
    calls started (perf_counter) and a thread that ends when every client has.
    """
    clients = len(inputs)
    per_client = total // clients
    logs = [ClientLog() for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        channel, infer = make_stub(address)
        request = make_request(inputs[i])
        log = logs[i]
        try:
            for _ in range(warmup):
                infer(request, timeout=CALL_TIMEOUT_S)
            barrier.wait()
            for _ in range(per_client):
                t_send = time.perf_counter()
                try:
                    reply = infer(request, timeout=CALL_TIMEOUT_S)
                except grpc.RpcError as exc:
                    log.errors.append(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
                    log.done += 1
                    continue
                t_recv = time.perf_counter()
                if not reply.raw_output_contents:
                    log.errors.append(f"no output in a reply from version {reply.model_version}")
                    log.done += 1
                    continue
                log.sent.append(t_send)
                log.received.append(t_recv)
                log.versions.append(int(reply.model_version))
                log.outputs.append(reply.raw_output_contents[0])
                log.done += 1
        finally:
            channel.close()

    threads = [
        threading.Thread(target=client, args=(i,), name=f"client-{i}", daemon=True)
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    barrier.wait(timeout=WAIT_S)
    started = time.perf_counter()

    def join() -> None:
        for t in threads:
            t.join()

    joiner = threading.Thread(target=join, name="clients-join", daemon=True)
    joiner.start()
    return logs, started, joiner


# -- checks -------------------------------------------------------------------------------


def floor_at(times: np.ndarray, versions: np.ndarray, at: np.ndarray) -> np.ndarray:
    """For each instant in ``at``: the highest version among events strictly before it.

    ``times``/``versions`` are events (any order); 0 where no event precedes.
    """
    order = np.argsort(times, kind="stable")
    t_sorted = times[order]
    running = np.maximum.accumulate(versions[order]) if len(order) else versions[order]
    idx = np.searchsorted(t_sorted, at, side="left") - 1
    out = np.zeros(len(at), dtype=np.int64)
    ok = idx >= 0
    out[ok] = running[idx[ok]]
    return out


@dataclass
class Checks:
    """Outcome of the checks over every logged call."""

    answered: int
    errors: int
    error_samples: list[str]
    older_than_reported: int
    older_than_seen: int
    wrong_output: int
    max_abs_diff: float
    versions_seen: list[int]
    latencies_ms: list[float]


def check_logs(
    logs: list[ClientLog], weights: Weights, reported: list[tuple[float, int]]
) -> Checks:
    """Apply the three checks of the module docstring to every answered call."""
    sent = np.concatenate([np.asarray(log.sent) for log in logs])
    received = np.concatenate([np.asarray(log.received) for log in logs])
    versions = np.concatenate([np.asarray(log.versions, dtype=np.int64) for log in logs])
    rep_t = np.asarray([t for t, _ in reported], dtype=np.float64)
    rep_v = np.asarray([v for _, v in reported], dtype=np.int64)
    older_reported = int(np.sum(versions < floor_at(rep_t, rep_v, sent)))
    older_seen = int(np.sum(versions < floor_at(received, versions, sent)))
    # Outputs: compare each distinct (client, version parity, bytes) once.
    wrong = 0
    max_diff = 0.0
    distinct: dict[tuple[int, int, bytes], int] = {}
    for i, log in enumerate(logs):
        for version, raw in zip(log.versions, log.outputs, strict=True):
            key = (i, weights.for_version(version), raw)
            distinct[key] = distinct.get(key, 0) + 1
    for (i, which, raw), count in distinct.items():
        got = np.frombuffer(raw, dtype=np.float32)
        want = weights.expected[which][i].reshape(-1)
        diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
        max_diff = max(max_diff, diff)
        if diff > ATOL:
            wrong += count
    errors = [e for log in logs for e in log.errors]
    return Checks(
        answered=len(versions),
        errors=len(errors),
        error_samples=errors[:10],
        older_than_reported=older_reported,
        older_than_seen=older_seen,
        wrong_output=wrong,
        max_abs_diff=max_diff,
        versions_seen=sorted({int(v) for v in versions}),
        latencies_ms=((received - sent) * 1000.0).tolist(),
    )


# -- the pushes ---------------------------------------------------------------------------


@dataclass
class Pushes:
    """What the publisher thread did."""

    published: list[int] = field(default_factory=list)
    started_at: list[float] = field(default_factory=list)
    """perf_counter instant each publish started."""
    publish_s: list[float] = field(default_factory=list)
    """Seconds of each ``publish_release`` call."""
    to_served_s: list[float] = field(default_factory=list)
    """Seconds from the start of publishing to the device reporting it serving."""
    error: BaseException | None = None


def push_versions(
    publisher: Any,
    monitor: Any,
    weights: Weights,
    versions: int,
    total: int,
    logs: list[ClientLog],
    clients_running: Callable[[], bool],
    pushes: Pushes,
) -> None:
    """Publish versions 2..versions+1, each once its share of the ``total`` calls is done."""
    try:
        for k in range(1, versions + 1):
            version = k + 1
            threshold = k * total // (versions + 1)
            while sum(log.done for log in logs) < threshold:
                if not clients_running():
                    raise RuntimeError(f"the clients stopped before version {version} was due")
                time.sleep(0.005)
            t0 = time.perf_counter()
            pushes.started_at.append(t0)
            publisher.publish_release(
                version=version,
                parent_version=version - 1,
                round=version - 1,
                package=weights.packages[weights.for_version(version)],
                architecture_id=weights.architecture_id,
                metrics={"accuracy": 0.9},
            )
            pushes.publish_s.append(time.perf_counter() - t0)
            pushes.published.append(version)
            monitor.wait_for_status(DEVICE_ID, lambda s, v=version: s.serving_version >= v, WAIT_S)
            pushes.to_served_s.append(time.perf_counter() - t0)
    except BaseException as exc:  # handed to the main thread
        pushes.error = exc


# -- the benchmark ------------------------------------------------------------------------


def _rows(
    sizes: Sizes,
    checks: Checks,
    baseline: Checks,
    soak_wall: float,
    base_wall: float,
    pushes: Pushes,
    t_end: float,
    failures: list[str],
    rss: dict[str, dict[str, float]],
) -> list[Result]:
    soak_tp = checks.answered / soak_wall
    base_tp = baseline.answered / base_wall
    lat = summarize(checks.latencies_ms)
    base_lat = summarize(baseline.latencies_ms)
    zero = "0"
    rows = [
        Result(
            "failed calls",
            float(checks.errors),
            None,
            "calls",
            target=zero,
            met=checks.errors == 0,
            note=f"of {sizes.requests:,} (baseline without pushes: {baseline.errors})",
        ),
        Result(
            "answers older than the version the device had reported serving",
            float(checks.older_than_reported),
            None,
            "calls",
            target=zero,
            met=checks.older_than_reported == 0,
            note="status or release_installed received by the cloud before the call was sent",
        ),
        Result(
            "answers older than a version any client had already received",
            float(checks.older_than_seen),
            None,
            "calls",
            target=zero,
            met=checks.older_than_seen == 0,
        ),
        Result(
            "answers whose output is not their version's output",
            float(checks.wrong_output),
            None,
            "calls",
            target=zero,
            met=checks.wrong_output == 0,
            note=f"max abs diff {checks.max_abs_diff:.2g}, tolerance {ATOL:g}",
        ),
        Result(
            "install failures or rejections reported by the device",
            float(len(failures)),
            None,
            "events",
            target=zero,
            met=not failures,
        ),
        Result(
            f"throughput, {sizes.clients} clients, while pushing",
            soak_tp,
            base_tp,
            "req/s",
            "same clients, no push",
            note="ratio < 1 = slower than without pushes",
        ),
        Result(
            "ModelInfer p50 while pushing",
            lat["p50"],
            base_lat["p50"],
            "ms",
            "same clients, no push",
        ),
        Result(
            "ModelInfer p99 while pushing",
            lat["p99"],
            base_lat["p99"],
            "ms",
            "same clients, no push",
            note=f"max {lat['max']:.0f} ms (no push: {base_lat['max']:.0f} ms)",
        ),
        Result(
            "new versions published during the load",
            float(sum(1 for t in pushes.started_at if t < t_end)),
            None,
            "versions",
            note=f"of {len(pushes.published)} published; versions seen in answers: {len(checks.versions_seen)} "
            f"({checks.versions_seen[0]}..{checks.versions_seen[-1]})",
        ),
        Result(
            "publish → device reports serving (median)",
            statistics.median(pushes.to_served_s),
            None,
            "s",
            note=f"max {max(pushes.to_served_s):.2f} s; publish call alone "
            f"{statistics.median(pushes.publish_s) * 1000:.0f} ms (median)",
        ),
    ]
    for name, figures in rss.items():
        rows.append(
            Result(
                f"RSS of {name} after the soak",
                figures["after"],
                figures["before"],
                "MB",
                "same process before the soak",
                note=f"growth {figures['after'] - figures['before']:+.1f} MB; "
                f"peak {figures['peak']:.1f} MB",
            )
        )
    return rows


def run(quick: bool = False, out_dir: Path | None = None) -> Report:
    """Run the soak and return the report (also written when ``out_dir`` is given)."""
    from cloud.broker import Broker
    from cloud.fleet_monitor import FleetMonitor
    from cloud.publisher import Publisher
    from edge.agent import EVENT_INSTALL_FAILED, EVENT_INSTALLED, EVENT_REJECTED
    from protos import codec, signing

    sizes = QUICK if quick else FULL
    began = time.perf_counter()
    weights = build_weights(mlp_model_dir(), sizes.clients)
    report = Report(
        name="soak",
        title="Soak: inference while new versions are pushed (issue 8)",
        quick=quick,
        params={
            "model": "digits MLP 64-64-10",
            "batch": 1,
            "requests": sizes.requests,
            "clients": sizes.clients,
            "new_versions": sizes.versions,
            "baseline_requests": sizes.baseline,
            "package_bytes": len(weights.packages[0]),
        },
    )
    reported: list[tuple[float, int]] = []
    failures: list[str] = []

    def on_status(status: codec.DeviceStatus) -> None:
        if status.device_id == DEVICE_ID:
            reported.append((time.perf_counter(), status.serving_version))

    def on_event(event: codec.DeviceEvent) -> None:
        now = time.perf_counter()
        if event.device_id != DEVICE_ID:
            return
        if event.kind == EVENT_INSTALLED:
            reported.append((now, event.version))
        elif event.kind in (EVENT_INSTALL_FAILED, EVENT_REJECTED):
            failures.append(f"{event.kind} v{event.version}: {event.detail}")

    with tempfile.TemporaryDirectory(prefix="edgefl-bench-soak-") as tmp_name:
        tmp = Path(tmp_name)
        key = signing.generate_private_key()
        pubkey = tmp / "fleet.pub"
        signing.write_public_key(key.public_key(), pubkey)
        device_root = tmp / "device"
        device_root.mkdir()
        (device_root / "initial.pkg").write_bytes(weights.packages[0])
        broker = Broker.on_free_port(tmp / "broker").start()
        device: ManagedProcess | None = None
        monitor = FleetMonitor(
            host=broker.host, port=broker.port, fleet=FLEET, on_status=on_status, on_event=on_event
        )
        try:
            monitor.start()
            config = write_device_config(device_root, broker.host, broker.port, pubkey)
            device, address = start_device(config, device_root / "serve.log")
            monitor.wait_for_status(DEVICE_ID, lambda s: s.serving_version == 1, WAIT_S)
            assert broker.process is not None
            pids = {"edgefl edge serve": device.pid, "mosquitto": broker.process.pid}

            # Baseline: same clients, nothing pushed.
            base_logs, base_t0, base_join = run_clients(
                address, weights.inputs, sizes.baseline, sizes.warmup
            )
            base_join.join()
            base_wall = time.perf_counter() - base_t0
            baseline = check_logs(base_logs, weights, list(reported))

            time.sleep(1.0)
            before = {name: tree_rss_mb(pid) for name, pid in pids.items()}
            pushes = Pushes()
            with (
                Publisher(
                    host=broker.host,
                    port=broker.port,
                    fleet=FLEET,
                    signing_key=key,
                    timeout_s=WAIT_S,
                ) as publisher,
                RssWatch(pids) as watch,
            ):
                logs, t0, joiner = run_clients(address, weights.inputs, sizes.requests, 0)
                total = sizes.requests // sizes.clients * sizes.clients
                pusher = threading.Thread(
                    target=push_versions,
                    args=(
                        publisher,
                        monitor,
                        weights,
                        sizes.versions,
                        total,
                        logs,
                        joiner.is_alive,
                        pushes,
                    ),
                    name="pusher",
                    daemon=True,
                )
                pusher.start()
                joiner.join()
                t_end = time.perf_counter()
                soak_wall = t_end - t0
                pusher.join(WAIT_S * 2)
                if pusher.is_alive():
                    raise RuntimeError("the publisher thread did not finish")
                if pushes.error is not None:
                    raise RuntimeError(f"publishing failed: {pushes.error}") from pushes.error
                time.sleep(1.0)
                after = {name: tree_rss_mb(pid) for name, pid in pids.items()}
            final = monitor.statuses()[DEVICE_ID].serving_version
            rss = {
                name: {"before": before[name], "after": after[name], "peak": watch.peak(name)}
                for name in pids
            }
            rss_series = {
                name: [
                    (round(t, 1), round(mb, 2)) for t, mb in samples[:: max(1, len(samples) // 200)]
                ]
                for name, samples in watch.samples.items()
            }
        finally:
            monitor.stop()
            if device is not None:
                device.stop()
            broker.stop()

    checks = check_logs(logs, weights, reported)
    report.results.extend(
        _rows(sizes, checks, baseline, soak_wall, base_wall, pushes, t_end, failures, rss)
    )
    report.notes.extend(
        [
            "One real device (`edgefl edge serve` with its MQTT agent) and a real Mosquitto; "
            "releases published with the real Publisher (chunks + Ed25519-signed manifest), "
            "status and events read by the real FleetMonitor, all on this machine.",
            f"{sizes.clients} client threads in the benchmark process, each with its own "
            "gRPC channel (our protos.kserve stubs), ModelInfer batch 1, back to back; "
            "they share the GIL and the machine's cores with the server and the broker.",
            "Versions alternate two weight sets (A odd, B even), so an output names its "
            f"version; A and B outputs differ by at least {weights.separation:.3f} "
            f"(max abs), the tolerance is {ATOL:g}.",
            "'Reported serving' = a status (serving_version) or release_installed event "
            "received by the cloud's FleetMonitor before the client's send timestamp; "
            "'already received' = a response any client had received before that "
            "timestamp (one perf_counter clock for every thread).",
            f"The device ended on version {final} (expected {sizes.versions + 1}); "
            f"errors: {checks.error_samples or 'none'}; device-reported failures: "
            f"{failures[:5] or 'none'}.",
            "RSS is of the whole process tree, before = after the baseline (serving "
            "version 1), after = every version installed plus 1 s of rest; peak sampled "
            f"every {RSS_INTERVAL_S} s. Growth is reported, not asserted.",
        ]
    )
    report.details = {
        "soak": {
            "answered": checks.answered,
            "wall_s": soak_wall,
            "latency_ms": summarize(checks.latencies_ms),
            "versions_seen": checks.versions_seen,
            "errors": checks.error_samples,
        },
        "baseline": {
            "answered": baseline.answered,
            "wall_s": base_wall,
            "latency_ms": summarize(baseline.latencies_ms),
            "errors": baseline.error_samples,
        },
        "pushes": {
            "published": pushes.published,
            "publish_s": pushes.publish_s,
            "to_served_s": pushes.to_served_s,
        },
        "final_version": final,
        "device_failures": failures,
        "reports_received": len(reported),
        "rss_mb": rss,
        "rss_series_mb": rss_series,
        "output_separation": weights.separation,
    }
    return finish_report(report, began, out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.bench_soak [--quick] [--out DIR]``."""
    return benchmark_main(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    sys.exit(main())
