"""Load generators for the inference benchmark: one client per process.

Clients that are threads of one Python process share its GIL, so with 4 of them a
measured call also waits for the other clients' Python work; that wait belongs to the
harness, not to the server being measured, and it varies from run to run. Here each
client is its own process (spawned, so no gRPC state is inherited across ``fork``),
as separate applications calling a device would be. The processes live for the whole
benchmark, keep their channels open between phases, and are driven over pipes:

1. the parent sends ``(kind, calls, warmup)`` to the clients taking part;
2. each makes ``warmup`` unmeasured calls and answers ``ready``;
3. once all are ready the parent sends ``go`` to each; each makes ``calls`` timed
   calls and sends back its latencies, the ``time.perf_counter()`` of its first
   and last call (``CLOCK_MONOTONIC``: one clock for every process on Linux), from
   which the phase's throughput is computed, and the CPU time it spent.

A target ("kind") is either ``("raw", address, method, payload)``, a unary call with
bytes in and out, or ``("triton", address, model, shape)``, a ``tritonclient.grpc``
``infer`` of a float32 array of ``shape`` (the request built per call, as a user's
code would).

This module imports neither ``protos.kserve`` nor anything of edgefl: tritonclient,
which the clients use, registers the same ``inference`` protobuf package.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Target = tuple[str, str, str, Any]
"""``("raw", address, method, payload)`` or ``("triton", address, model, shape)``."""

_STOP_TIMEOUT_S = 10.0


@dataclass
class LoadResult:
    """Latencies (ms) of every call and the throughput (calls/s) of one phase."""

    latencies_ms: list[float]
    wall_s: float
    errors: int = 0
    block_p50_ms: list[float] = field(default_factory=list)
    """The p50 of each block merged into this result, in order."""
    calls_made: int = 0
    """Every call made, warm-up included (what the CPU figures are divided by)."""
    client_cpu_s: float = 0.0
    """CPU time (user + system) the client processes spent, warm-up included."""
    server_cpu_s: float = 0.0
    """CPU time of the server process over the same calls (filled in by the caller)."""

    def cpu_per_call_us(self, which: str) -> float:
        """``"client"`` or ``"server"`` CPU per call in microseconds."""
        seconds = self.client_cpu_s if which == "client" else self.server_cpu_s
        return seconds / self.calls_made * 1e6 if self.calls_made else 0.0

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.wall_s if self.wall_s > 0 else 0.0

    def merge(self, other: LoadResult) -> LoadResult:
        return LoadResult(
            self.latencies_ms + other.latencies_ms,
            self.wall_s + other.wall_s,
            self.errors + other.errors,
            self.block_p50_ms + other.block_p50_ms,
            self.calls_made + other.calls_made,
            self.client_cpu_s + other.client_cpu_s,
            self.server_cpu_s + other.server_cpu_s,
        )

    def to_dict(self) -> dict[str, Any]:
        from benchmarks.common import summarize

        return {
            "calls": len(self.latencies_ms),
            "wall_s": self.wall_s,
            "throughput": self.throughput,
            "errors": self.errors,
            "latency_ms": summarize(self.latencies_ms) if self.latencies_ms else {},
            "block_p50_ms": self.block_p50_ms,
            "calls_made": self.calls_made,
            "client_cpu_us_per_call": self.cpu_per_call_us("client"),
            "server_cpu_us_per_call": self.cpu_per_call_us("server"),
        }


def _make_call(target: Target) -> Callable[[], object]:
    import grpc

    kind, address, what, arg = target
    if kind == "raw":
        stub = grpc.insecure_channel(address).unary_unary(what)
        return lambda: stub(arg)
    if kind == "triton":
        import numpy as np
        import tritonclient.grpc as tc

        client = tc.InferenceServerClient(url=address)
        x = np.random.default_rng(0).random(tuple(arg), dtype=np.float32)

        def call() -> object:
            inp = tc.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return client.infer(what, [inp])

        return call
    raise ValueError(f"unknown target kind {kind!r}")


def _client_main(conn: multiprocessing.connection.Connection, targets: dict[str, Target]) -> None:
    """One client process: answer phases until told to stop (``None``)."""
    import grpc

    calls: dict[str, Callable[[], object]] = {}
    while True:
        message = conn.recv()
        if message is None:
            return
        kind, n, warmup = message
        cpu_start = time.process_time()
        call = calls.get(kind)
        if call is None:
            call = calls[kind] = _make_call(targets[kind])
        errors = 0
        for _ in range(warmup):
            try:
                call()
            except grpc.RpcError:
                errors += 1
        conn.send("ready")
        if conn.recv() != "go":
            return
        latencies: list[float] = []
        clock = time.perf_counter
        first = clock()
        for _ in range(n):
            t = clock()
            try:
                call()
            except grpc.RpcError:
                errors += 1
                continue
            latencies.append((clock() - t) * 1000.0)
        last = clock()
        conn.send((latencies, first, last, errors, time.process_time() - cpu_start))


class ClientProcesses:
    """``count`` client processes, each able to call every target; a context manager."""

    def __init__(self, count: int, targets: Mapping[str, Target]) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self._targets = dict(targets)
        self._count = count
        self._procs: list[Any] = []
        self._conns: list[multiprocessing.connection.Connection] = []

    def __enter__(self) -> ClientProcesses:
        ctx = multiprocessing.get_context("spawn")
        try:
            for i in range(self._count):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_client_main,
                    args=(child, self._targets),
                    name=f"bench-client-{i}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def run(self, kind: str, clients: int, calls: int, warmup: int) -> LoadResult:
        """``clients`` processes each make ``warmup`` then ``calls`` timed calls to ``kind``."""
        if not 1 <= clients <= self._count:
            raise ValueError(f"clients must be in 1..{self._count}, got {clients}")
        if kind not in self._targets:
            raise KeyError(f"unknown target {kind!r}")
        conns = self._conns[:clients]
        for conn in conns:
            conn.send((kind, calls, warmup))
        for conn in conns:
            self._expect(conn, "ready")
        for conn in conns:
            conn.send("go")
        latencies: list[float] = []
        starts: list[float] = []
        ends: list[float] = []
        errors = 0
        cpu = 0.0
        for conn in conns:
            lat, first, last, errs, cpu_s = self._receive(conn)
            latencies.extend(lat)
            starts.append(first)
            ends.append(last)
            errors += errs
            cpu += cpu_s
        wall = max(ends) - min(starts)
        from benchmarks.common import percentile

        block_p50 = [percentile(latencies, 50)] if latencies else []
        return LoadResult(latencies, wall, errors, block_p50, clients * (calls + warmup), cpu)

    def _receive(self, conn: multiprocessing.connection.Connection) -> Any:
        if not conn.poll(120.0):
            raise RuntimeError("a benchmark client process did not answer within 120 s")
        try:
            return conn.recv()
        except (EOFError, OSError) as exc:
            raise RuntimeError("a benchmark client process died") from exc

    def _expect(self, conn: multiprocessing.connection.Connection, word: str) -> None:
        got = self._receive(conn)
        if got != word:
            raise RuntimeError(f"benchmark client answered {got!r}, expected {word!r}")

    def close(self) -> None:
        """Ask every client to stop; kill any that has not exited within 10 s."""
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for conn in self._conns:
            conn.close()
        self._procs.clear()
        self._conns.clear()
