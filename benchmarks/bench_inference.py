"""Inference on a device: ModelInfer latency, throughput, RSS and start time (issue 3).

What runs, all on this machine in one run:

* **ours**: ``edgefl edge serve`` in a subprocess (the real server, digits MLP), called
  with **tritonclient**'s gRPC client, batch 1, by 1 and by 4 concurrent clients
  (separate processes, one client each: :mod:`benchmarks.load_clients`). The same
  calls are also made with a request serialized once and sent as raw bytes, which
  takes tritonclient's own Python overhead out.
* **transport floor**: a trivial gRPC echo service in a subprocess (``grpc.server`` with
  a generic handler and identity serializers, same thread pool size as ours), called
  through a raw unary channel with a payload the size of the ModelInfer request.
* **compute floor**: bare ``LiteRTModel.infer`` on one batch-1 example in this process,
  same model.
* **RSS** of the serve process idle (after start) and under load (peak while 4 clients
  hammer it), next to the echo process; **start time** from ``Popen`` to the gRPC
  health status SERVING of ``inference.GRPCInferenceService`` (a fresh data dir each
  time, so it includes installing the initial package), next to the echo process's
  start to its first answered call.

Every load phase is split into blocks, and the blocks of all phases are interleaved
(the order reversed every other block), so a change in the shared machine's load hits
ours and the floor alike; the per-block ratios are reported to show the spread.

Targets (issue 3): p50 within 1.5x the echo floor, RSS under 80 MB, start under 1.5 s.

This process imports tritonclient, whose protos share the ``inference`` package with
ours: it must never import ``protos.kserve`` (nor ``edge.server``). Run
``python -m benchmarks.bench_inference [--quick]``. The echo service is
:mod:`benchmarks.echo_server`.
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    model_package,
    ratio_within,
    summarize,
)
from benchmarks.echo_server import METHOD as ECHO_METHOD
from benchmarks.load_clients import ClientProcesses, LoadResult, Target
from edge.process import ManagedProcess, free_port

logger = logging.getLogger(__name__)

MODEL_NAME = "digits"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
HEALTH_METHOD = "/grpc.health.v1.Health/Check"
INFERENCE_SERVICE = "inference.GRPCInferenceService"
SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}

P50_TARGET = 1.5
RSS_TARGET_MB = 80.0
START_TARGET_S = 1.5


@dataclass(frozen=True)
class Sizes:
    """How much each phase measures."""

    warmup: int
    sequential: int
    per_client: int
    clients: int
    bare: int
    starts: int
    blocks: int
    """Each phase is split into this many blocks, interleaved with the other phases,
    so that a change in the shared machine's load hits ours and the floor alike."""


FULL = Sizes(warmup=20, sequential=4800, per_client=4800, clients=4, bare=5000, starts=3, blocks=12)
QUICK = Sizes(warmup=5, sequential=40, per_client=20, clients=4, bare=100, starts=1, blocks=2)


# -- client-side helpers ------------------------------------------------------------------


def _health_request(service: str) -> bytes:
    name = service.encode()
    return b"\x0a" + bytes([len(name)]) + name  # HealthCheckRequest{service}; names < 128 bytes


def _raw_unary(channel: grpc.Channel, method: str) -> Callable[..., bytes]:
    # No serializers: requests and responses are bytes as they travel.
    return channel.unary_unary(method)


def _serving(address: str, timeout: float = 0.25) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = _raw_unary(channel, HEALTH_METHOD)(
                _health_request(INFERENCE_SERVICE), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply == SERVING)


def _echo_answers(address: str, timeout: float = 0.25) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            return bool(_raw_unary(channel, ECHO_METHOD)(b"ping", timeout=timeout) == b"ping")
        except grpc.RpcError:
            return False


def _time_start(
    name: str, argv: list[str], ready: Callable[[], bool], log: Path, timeout: float = 60.0
) -> tuple[ManagedProcess, float]:
    """Start ``argv``; poll ``ready`` every 5 ms; return the process and seconds to ready."""
    proc = ManagedProcess(name, argv, log_path=log, env=child_env(), cwd=REPO_ROOT)
    t0 = time.perf_counter()
    proc.start()
    try:
        deadline = t0 + timeout
        while not ready():
            if not proc.alive():
                raise RuntimeError(f"{name} exited ({proc.returncode()}):\n{proc.log_tail()}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout:.0f} s:\n{proc.log_tail()}")
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
    except BaseException:
        proc.stop()
        raise
    return proc, elapsed


class RssSampler(SamplerThread):
    """Samples a process's RSS every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self._proc = psutil.Process(pid)
        self._interval = interval
        super().__init__()
        self.samples: list[int] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._proc.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(self._interval)

    @property
    def peak_mb(self) -> float:
        return max(self.samples) / 2**20 if self.samples else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


# -- the benchmark ------------------------------------------------------------------------


def _write_config(root: Path, port: int, package: Path) -> Path:
    from edge import config as edge_config

    settings = edge_config.Settings(
        device=edge_config.DeviceSettings(id="bench-device", data_dir=root / "data"),
        grpc=edge_config.GrpcSettings(port=port, drain_delay_s=0.1, grace_s=1.0),
        model=edge_config.ModelSettings(name=MODEL_NAME, initial_package=package),
    )
    return edge_config.write_settings(settings, root / "edge.toml")


def _bare_infer(model_dir: Path, x: np.ndarray, sizes: Sizes) -> LoadResult:
    from edge.litert_model import LiteRTModel

    model = LiteRTModel.load(model_dir)
    for _ in range(sizes.warmup):
        model.infer(x)
    lat = []
    t0 = time.perf_counter()
    for _ in range(sizes.bare):
        t = time.perf_counter()
        model.infer(x)
        lat.append((time.perf_counter() - t) * 1000.0)
    return LoadResult(lat, time.perf_counter() - t0)


def run(quick: bool = False, out_dir: Path | None = None) -> Report:
    """Measure everything and return the report (also written when ``out_dir`` is given)."""
    import tritonclient.grpc as tc
    from tritonclient.grpc import service_pb2

    sizes = QUICK if quick else FULL
    began = time.perf_counter()
    report = Report(
        name="inference",
        title="Inference on a device (issue 3)",
        quick=quick,
        params={
            "model": "digits MLP 64-64-10",
            "batch": 1,
            "sequential_calls": sizes.sequential,
            "concurrent_clients": sizes.clients,
            "calls_per_client": sizes.per_client,
            "warmup_per_client": sizes.warmup,
            "bare_calls": sizes.bare,
            "starts": sizes.starts,
            "interleaved_blocks": sizes.blocks,
        },
    )
    model_dir = mlp_model_dir()
    x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name=MODEL_NAME)
    inp = request.inputs.add()
    inp.name, inp.datatype = "x", "FP32"
    inp.shape.extend(x.shape)
    request.raw_input_contents.append(x.tobytes())
    request_bytes = request.SerializeToString()
    echo_payload = bytes(len(request_bytes))

    edgefl = str(Path(sys.executable).parent / "edgefl")
    procs: list[ManagedProcess] = []
    with tempfile.TemporaryDirectory(prefix="edgefl-bench-infer-") as tmp_name:
        tmp = Path(tmp_name)
        package = tmp / "digits.pkg"
        package.write_bytes(model_package(model_dir))
        try:
            # -- start times (the last start of each is kept running for the load) ------
            ours_starts: list[float] = []
            echo_starts: list[float] = []
            server: ManagedProcess | None = None
            echo: ManagedProcess | None = None
            for i in range(sizes.starts):
                if server is not None:
                    server.stop()
                    echo.stop()  # type: ignore[union-attr]
                root = tmp / f"device-{i}"
                root.mkdir()
                port = free_port()
                address = f"127.0.0.1:{port}"
                config = _write_config(root, port, package)
                server, seconds = _time_start(
                    "edgefl-edge-serve",
                    [edgefl, "edge", "serve", "--config", str(config)],
                    lambda a=address: _serving(a),  # type: ignore[misc]
                    root / "serve.log",
                )
                procs.append(server)
                ours_starts.append(seconds)
                echo_port = free_port()
                echo_address = f"127.0.0.1:{echo_port}"
                echo, seconds = _time_start(
                    "echo-server",
                    [sys.executable, "-m", "benchmarks.echo_server", str(echo_port)],
                    lambda a=echo_address: _echo_answers(a),  # type: ignore[misc]
                    root / "echo.log",
                )
                procs.append(echo)
                echo_starts.append(seconds)
            assert server is not None and echo is not None
            time.sleep(1.0)
            rss_idle = rss_mb(server.pid)
            echo_rss_idle = rss_mb(echo.pid)

            # -- load phases -------------------------------------------------------------
            targets: dict[str, Target] = {
                "triton": ("triton", address, MODEL_NAME, list(x.shape)),
                "raw": ("raw", address, INFER_METHOD, request_bytes),
                "echo": ("raw", echo_address, ECHO_METHOD, echo_payload),
            }
            c = sizes.clients
            phases: dict[str, LoadResult] = {}
            n1 = sizes.sequential // sizes.blocks
            nc = sizes.per_client // sizes.blocks
            order = [(kind, clients, n) for kind in targets for clients, n in ((1, n1), (c, nc))]
            ours_peak = echo_peak = 0.0
            # Sanity: the served model answers with probabilities.
            inp = tc.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            probs = tc.InferenceServerClient(url=address).infer(MODEL_NAME, [inp]).as_numpy("probs")
            if probs is None or probs.shape != (1, 10):
                raise RuntimeError(f"unexpected ModelInfer answer: {probs!r}")
            with ClientProcesses(c, targets) as load:
                for block in range(sizes.blocks):
                    for kind, clients, n in order if block % 2 == 0 else order[::-1]:
                        key = f"{kind}_{clients}"
                        pid = echo.pid if kind == "echo" else server.pid
                        cpu_before = cpu_seconds(pid)
                        with RssSampler(pid) as sampler:
                            got = load.run(kind, clients, n, sizes.warmup)
                        got.server_cpu_s = cpu_seconds(pid) - cpu_before
                        if clients > 1 and kind == "echo":
                            echo_peak = max(echo_peak, sampler.peak_mb)
                        elif clients > 1:
                            ours_peak = max(ours_peak, sampler.peak_mb)
                        phases[key] = phases[key].merge(got) if key in phases else got
            rss_load = max(ours_peak, rss_mb(server.pid))
            echo_rss_load = max(echo_peak, rss_mb(echo.pid))
        finally:
            for proc in reversed(procs):
                proc.stop()
        bare = _bare_infer(model_dir, x, sizes)

    p50 = {k: statistics.median(v.latencies_ms) for k, v in phases.items()}
    p99 = {k: summarize(v.latencies_ms)["p99"] for k, v in phases.items()}
    bare_p50 = statistics.median(bare.latencies_ms)
    echo_name = "gRPC echo, raw bytes"
    target_p50 = f"<= {P50_TARGET}x floor"
    rows = [
        Result(
            "ModelInfer p50, 1 client (tritonclient)",
            p50["triton_1"],
            p50["echo_1"],
            "ms",
            echo_name,
            target_p50,
            ratio_within(p50["triton_1"], p50["echo_1"], P50_TARGET),
        ),
        Result(
            "ModelInfer p99, 1 client (tritonclient)",
            p99["triton_1"],
            p99["echo_1"],
            "ms",
            echo_name,
        ),
        Result(
            "ModelInfer p50, 1 client (raw request bytes)",
            p50["raw_1"],
            p50["echo_1"],
            "ms",
            echo_name,
            target_p50,
            ratio_within(p50["raw_1"], p50["echo_1"], P50_TARGET),
            note="request serialized once: server-side cost only",
        ),
        Result(
            "ModelInfer p99, 1 client (raw request bytes)",
            p99["raw_1"],
            p99["echo_1"],
            "ms",
            echo_name,
        ),
        Result(
            f"ModelInfer p50, {c} clients (tritonclient)",
            p50[f"triton_{c}"],
            p50[f"echo_{c}"],
            "ms",
            echo_name,
            target_p50,
            ratio_within(p50[f"triton_{c}"], p50[f"echo_{c}"], P50_TARGET),
        ),
        Result(
            f"ModelInfer p99, {c} clients (tritonclient)",
            p99[f"triton_{c}"],
            p99[f"echo_{c}"],
            "ms",
            echo_name,
        ),
        Result(
            f"ModelInfer p50, {c} clients (raw request bytes)",
            p50[f"raw_{c}"],
            p50[f"echo_{c}"],
            "ms",
            echo_name,
            target_p50,
            ratio_within(p50[f"raw_{c}"], p50[f"echo_{c}"], P50_TARGET),
        ),
        Result(
            "throughput, 1 client (tritonclient)",
            phases["triton_1"].throughput,
            phases["echo_1"].throughput,
            "req/s",
            echo_name,
            note="ratio < 1 = slower than the floor",
        ),
        Result(
            f"throughput, {c} clients (tritonclient)",
            phases[f"triton_{c}"].throughput,
            phases[f"echo_{c}"].throughput,
            "req/s",
            echo_name,
            note="client processes share the machine's cores with the server",
        ),
        Result(
            f"throughput, {c} clients (raw request bytes)",
            phases[f"raw_{c}"].throughput,
            phases[f"echo_{c}"].throughput,
            "req/s",
            echo_name,
        ),
        Result(
            "server CPU per call, 1 client (raw request bytes)",
            phases["raw_1"].cpu_per_call_us("server"),
            phases["echo_1"].cpu_per_call_us("server"),
            "µs",
            "echo server process",
            note="user + system CPU of the server process / calls; steadier than latency",
        ),
        Result(
            f"server CPU per call, {c} clients (raw request bytes)",
            phases[f"raw_{c}"].cpu_per_call_us("server"),
            phases[f"echo_{c}"].cpu_per_call_us("server"),
            "µs",
            "echo server process",
        ),
        Result(
            f"client CPU per call, {c} clients (tritonclient)",
            phases[f"triton_{c}"].cpu_per_call_us("client"),
            phases[f"raw_{c}"].cpu_per_call_us("client"),
            "µs",
            "same calls sent as raw request bytes",
            note="what the client library adds; it competes with the server for the cores",
        ),
        Result(
            "bare LiteRTModel.infer p50 vs ModelInfer p50 (1 client, tritonclient)",
            p50["triton_1"],
            bare_p50,
            "ms",
            "in-process infer, same model",
            note="how much of a call is the model itself",
        ),
        Result(
            "RSS of edgefl edge serve, idle",
            rss_idle,
            echo_rss_idle,
            "MB",
            "echo server process",
            f"< {RSS_TARGET_MB:.0f} MB",
            rss_idle < RSS_TARGET_MB,
        ),
        Result(
            f"RSS of edgefl edge serve, under load ({c} clients, peak)",
            rss_load,
            echo_rss_load,
            "MB",
            "echo server process",
            f"< {RSS_TARGET_MB:.0f} MB",
            rss_load < RSS_TARGET_MB,
        ),
        Result(
            "start to health SERVING (median)",
            statistics.median(ours_starts),
            statistics.median(echo_starts),
            "s",
            "echo server: start to first answer",
            f"< {START_TARGET_S} s",
            statistics.median(ours_starts) < START_TARGET_S,
            note=f"fresh data dir each start; max {max(ours_starts):.2f} s over {len(ours_starts)}",
        ),
    ]
    report.results.extend(rows)

    def spread(ours_key: str, floor_key: str) -> str:
        ratios = sorted(
            a / b
            for a, b in zip(
                phases[ours_key].block_p50_ms, phases[floor_key].block_p50_ms, strict=True
            )
            if b > 0
        )
        if not ratios:
            return "n/a"
        return (
            f"min {ratios[0]:.2f}x, median {statistics.median(ratios):.2f}x, max {ratios[-1]:.2f}x"
        )

    errors = {k: v.errors for k, v in phases.items() if v.errors}
    report.notes.extend(
        [
            "Floors run in the same run on the same machine: the echo server is a bare "
            "grpcio server with a generic handler and identity serializers, called with "
            f"a {len(echo_payload)}-byte payload (the size of the serialized ModelInfer "
            "request); the bare infer is LiteRTModel.infer on one example in the "
            "benchmark process.",
            "`tritonclient` rows include the client library's Python overhead (building "
            "the request protobuf per call); `raw request bytes` rows send a request "
            "serialized once, like the echo floor does.",
            f"Bare LiteRTModel.infer batch 1: p50 {bare_p50 * 1000:.0f} µs, "
            f"{bare.throughput:,.0f} calls/s.",
            f"Each phase runs in {sizes.blocks} block(s) interleaved with the other phases "
            "(ours, raw, echo; 1 and 4 clients; order reversed every other block), so "
            "drifting load on the shared host hits ours and the floor alike. "
            f"Per-block p50 ratio tritonclient/echo: {spread('triton_1', 'echo_1')} with "
            f"1 client, {spread(f'triton_{c}', f'echo_{c}')} with {c} clients; raw/echo: "
            f"{spread('raw_1', 'echo_1')} and {spread(f'raw_{c}', f'echo_{c}')}.",
            "Each client is its own process (spawned once, channels kept open between "
            "blocks), so clients do not wait on each other's GIL; clients and servers "
            "share the machine's cores, and the host is shared with other work, so load "
            "at start is recorded with the machine.",
            f"Errors during load: {errors or 'none'}.",
        ]
    )
    report.details = {
        "phases": {k: v.to_dict() for k, v in phases.items()},
        "bare_infer": bare.to_dict(),
        "start_s": {"ours": ours_starts, "echo": echo_starts},
        "rss_mb": {
            "ours_idle": rss_idle,
            "ours_load_peak": rss_load,
            "echo_idle": echo_rss_idle,
            "echo_load_peak": echo_rss_load,
        },
        "request_bytes": len(request_bytes),
    }
    return finish_report(report, began, out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.bench_inference [--quick] [--out DIR]``."""
    return benchmark_main(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    sys.exit(main())
