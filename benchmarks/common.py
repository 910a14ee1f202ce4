"""What every benchmark shares: machine info, percentiles, result rows, JSON and Markdown.

A benchmark produces a :class:`Report`: a list of :class:`Result` rows, each putting
our figure next to the peer or physical floor measured in the same run on the same
machine, with their ratio (ours / floor) and, where an issue sets one, the target and
whether this run met it. :func:`write_report` stores ``out/<name>.json`` and
``out/<name>.md``; :mod:`benchmarks.run_all` gathers them into ``RESULTS.md``.

The model the benchmarks use is the digits MLP the test fixtures build, from the same
cache (``.pytest_cache/d/edgefl-models``): :func:`mlp_model_dir` builds it (with
TensorFlow, in a subprocess) only when the cache does not hold it.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / "benchmarks"
OUT_DIR = BENCH_DIR / "out"
"""Where each benchmark writes ``<name>.json`` and ``<name>.md``."""
MODEL_CACHE = REPO_ROOT / ".pytest_cache" / "d" / "edgefl-models"
"""Shared with the test fixtures (tests/fixtures/models.py): one build serves both."""

VERSIONED_PACKAGES = (
    "edgefl",
    "grpcio",
    "protobuf",
    "tritonclient",
    "ai-edge-litert",
    "paho-mqtt",
    "flwr",
    "numpy",
    "psutil",
)
"""Distributions whose versions every report records."""


# -- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linearly interpolated (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Count, mean, min, p50, p90, p99 and max of ``values``."""
    return {
        "n": float(len(values)),
        "mean": sum(values) / len(values),
        "min": min(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
    }


# -- machine ------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mosquitto_version() -> str | None:
    try:
        from cloud.broker import mosquitto_version

        return mosquitto_version()
    except Exception:  # absent or unreadable binary: the report says so
        return None


def package_versions(names: Iterable[str] = VERSIONED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, OS, Python and the versions of the components measured."""
    import psutil

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "mosquitto": _mosquitto_version(),
    }


def machine_line(machine: dict[str, Any]) -> str:
    """One Markdown line describing ``machine`` (as :func:`machine_info` returns it)."""
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("packages", {}).items() if v)
    if machine.get("mosquitto"):
        versions += f", mosquitto {machine['mosquitto']}"
    return (
        f"{machine['cpu_model']}, {machine['usable_cores']} usable of "
        f"{machine['logical_cores']} logical cores, {machine['ram_gb']} GB RAM, "
        f"load {machine['load_avg_1m']} at start; {machine['os']}; Python "
        f"{machine['python']}; {versions}"
    )


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One figure: ours next to the floor (or peer) it is measured against.

    ``ratio`` is ``ours / floor`` whatever the unit, so for throughputs a ratio below 1
    means we are slower. ``met`` is None when no target applies.
    """

    name: str
    """What was measured, e.g. ``ModelInfer p50, 1 client``."""
    ours: float
    """Our figure."""
    floor: float | None
    """The peer's or the physical floor's figure, from the same run (None if none)."""
    unit: str
    """Unit of ``ours`` and ``floor`` (ms, req/s, MB, s)."""
    floor_name: str = ""
    """What the floor is, e.g. ``gRPC echo``."""
    target: str = ""
    """The target the issue sets, in words (e.g. ``<= 1.5x floor``), or empty."""
    met: bool | None = None
    """Whether this run met ``target`` (None without a target)."""
    note: str = ""
    """Anything a reader needs to interpret the row."""

    @property
    def ratio(self) -> float | None:
        """``ours / floor`` (None without a usable floor)."""
        if self.floor is None or self.floor == 0:
            return None
        return self.ours / self.floor

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, ``ratio`` included."""
        out = dataclasses.asdict(self)
        out["ratio"] = self.ratio
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        """Inverse of :meth:`to_dict` (``ratio`` is recomputed)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def ratio_within(ours: float, floor: float | None, limit: float) -> bool | None:
    """``ours / floor <= limit``, or None when there is no floor."""
    if floor is None or floor <= 0:
        return None
    return ours / floor <= limit


@dataclass
class Report:
    """Everything one benchmark run produced."""

    name: str
    """File stem of the outputs (``inference`` → ``out/inference.json``)."""
    title: str
    """Heading in the Markdown report."""
    quick: bool
    """Whether the run used the tiny ``--quick`` sizes."""
    params: dict[str, Any]
    """Sizes and settings the run used."""
    results: list[Result] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    """Raw distributions and anything else worth keeping (not rendered)."""
    notes: list[str] = field(default_factory=list)
    """Sentences rendered under the table (method, caveats)."""
    machine: dict[str, Any] = field(default_factory=machine_info)
    started_at: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    )
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form of the report."""
        return {
            "name": self.name,
            "title": self.title,
            "quick": self.quick,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "machine": self.machine,
            "params": self.params,
            "results": [r.to_dict() for r in self.results],
            "notes": self.notes,
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=data["name"],
            title=data["title"],
            quick=data["quick"],
            params=data["params"],
            results=[Result.from_dict(r) for r in data["results"]],
            details=data.get("details", {}),
            notes=data.get("notes", []),
            machine=data["machine"],
            started_at=data["started_at"],
            duration_s=data.get("duration_s", 0.0),
        )

    def markdown(self, *, heading_level: int = 2, with_machine: bool = True) -> str:
        """The report as Markdown: heading, machine, parameters, the table, notes."""
        lines = [f"{'#' * heading_level} {self.title}", ""]
        mode = "quick (tiny sizes, figures not representative)" if self.quick else "full"
        lines.append(
            f"Run {self.started_at} ({mode}, {self.duration_s:.0f} s). Parameters: "
            + ", ".join(f"{k}={v}" for k, v in self.params.items())
            + "."
        )
        if with_machine:
            lines += ["", f"Machine: {machine_line(self.machine)}."]
        lines += ["", results_table(self.results)]
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"


def fmt(value: float | None) -> str:
    """A number with about three significant digits (``—`` for None)."""
    if value is None:
        return "—"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def results_table(results: Sequence[Result]) -> str:
    """The Markdown table of ``results``."""
    rows = [
        "| figure | ours | floor / peer | ratio | target | met | note |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for r in results:
        floor = "—" if r.floor is None else f"{fmt(r.floor)} {r.unit} ({r.floor_name})"
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}x"
        met = "—" if r.met is None else ("yes" if r.met else "**no**")
        rows.append(
            f"| {r.name} | {fmt(r.ours)} {r.unit} | {floor} | {ratio} | {r.target or '—'} "
            f"| {met} | {r.note} |"
        )
    return "\n".join(rows)


def write_report(report: Report, out_dir: Path = OUT_DIR) -> tuple[Path, Path]:
    """Write ``out_dir/<name>.json`` and ``out_dir/<name>.md``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{report.name}.json"
    md_path = out_dir / f"{report.name}.md"
    json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(report.markdown(), encoding="utf-8")
    return json_path, md_path


class SamplerThread(abc.ABC):
    """A daemon thread running ``_run`` from ``__enter__`` until ``__exit__`` sets ``_stop``
    and joins it: the life cycle of every benchmark's sampler (subclasses write ``_run``)."""

    def __init__(self, name: str | None = None) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @abc.abstractmethod
    def _run(self) -> None: ...

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def finish_report(report: Report, began: float, out_dir: Path | None) -> Report:
    """Stamp the wall time since ``began`` (``time.perf_counter()``) on ``report``, write it
    to ``out_dir`` unless that is ``None``, and return it: the end of every ``run``."""
    report.duration_s = time.perf_counter() - began
    if out_dir is not None:
        write_report(report, out_dir)
    return report


def load_report(path: Path) -> Report:
    """Read a report written by :func:`write_report`."""
    return Report.from_dict(json.loads(path.read_text(encoding="utf-8")))


# -- command line -------------------------------------------------------------------------


def arg_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick`` and ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks the harness, figures meaningless"
    )
    parser.add_argument(
        "--out", type=Path, default=OUT_DIR, help=f"output directory (default {OUT_DIR})"
    )
    return parser


def benchmark_main(
    description: str, run: Callable[[bool, Path | None], Report], argv: Sequence[str] | None
) -> int:
    """The ``main`` of a benchmark module: parse ``--quick``/``--out``, run, print the table."""
    args = arg_parser(description).parse_args(argv)
    from edge.logging_config import configure_logging

    configure_logging()
    print(run(args.quick, args.out).markdown())
    return 0


def child_env() -> dict[str, str]:
    """Environment for benchmark subprocesses: the repo importable, no TF/Flower chatter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# -- the model ----------------------------------------------------------------------------

MLP_BUILD_ARGS = (
    "--arch",
    "mlp",
    "--input-shape",
    "64",
    "--classes",
    "10",
    "--train-batch",
    "32",
    "--seed",
    "0",
)
"""The digits MLP the benchmarks and the tests use (tests/fixtures/models.py ``MLP_ARGS``)."""


def mlp_model_dir(cache: Path = MODEL_CACHE) -> Path:
    """Directory with the digits MLP's ``model.tflite`` and ``card.json``.

    Uses the test fixtures' cache key, so a model the tests built is reused; otherwise
    builds it with ``python -m cloud.authoring.build`` in a subprocess (TensorFlow never
    enters the benchmark process) and stores it in the cache.
    """
    from tests.fixtures.models import build_key

    args = list(MLP_BUILD_ARGS)
    target = cache / build_key(args)
    if (target / "model.tflite").is_file() and (target / "card.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    proc = subprocess.run(
        [sys.executable, "-m", "cloud.authoring.build", *args, "--out", str(staging)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"model build failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    try:
        staging.rename(target)
    except OSError:  # a concurrent build won
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_package(model_dir: Path) -> bytes:
    """The ModelPackage bytes (tflite, card, initial weights) of the model in ``model_dir``."""
    from edge.litert_model import LiteRTModel
    from edge.model_card import ModelCard
    from protos import codec

    card = ModelCard.load(model_dir / "card.json")
    weights = LiteRTModel.load(model_dir).get_weights()
    return codec.package_to_bytes(
        codec.ModelPackage(
            architecture_id=card.architecture_id,
            tflite=(model_dir / "model.tflite").read_bytes(),
            card_json=card.to_json(),
            weights=weights,
        )
    )


# -- the cloud ----------------------------------------------------------------------------


def loopback_cloud(work: Path, model_dir: Path, **run: Any) -> Any:
    """Settings of a fresh loopback cloud in ``work/cloud`` (fleet ``bench``, free fixed
    ports, so that it can be restarted) with the ``[run]`` keys in ``run`` set."""
    from cloud import config as cloud_config
    from cloud.supervisor import init_cloud
    from edge.process import free_port

    settings = cloud_config.load(init_cloud(work / "cloud", fleet="bench", model_dir=model_dir))
    settings.broker.port = free_port()
    settings.superlink.port = free_port()
    settings.web.port = free_port()
    settings.run = dataclasses.replace(settings.run, **run)
    return settings
