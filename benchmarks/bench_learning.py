"""Learning quality and wall time of a whole federation (issues 4 and 7).

Runs the real demo — Mosquitto, SuperLink, registry, UI and N emulated devices each a
full ``edgefl edge up`` — on Dirichlet(alpha) non-IID partitions of digits, and
reads the accuracy of every global version on the held-out test split. Next to it,
the same LiteRT model trained **centrally** on the union of the devices' data for the
same number of epochs: the accuracy federated learning would ideally approach.

``python -m benchmarks.bench_learning [--quick] [--out DIR]``
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    REPO_ROOT,
    Report,
    Result,
    benchmark_main,
    child_env,
    finish_report,
    mlp_model_dir,
)


@dataclass(frozen=True)
class Sizes:
    devices: int
    rounds: int
    local_epochs: int
    alpha: float


FULL = Sizes(devices=5, rounds=10, local_epochs=5, alpha=0.5)
QUICK = Sizes(devices=2, rounds=2, local_epochs=1, alpha=0.5)
ACCURACY_AIM = 0.93
WALL_TARGET_S = 300.0


def centralized_accuracy(model_dir: Path, epochs: int, lr: float, seed: int = 0) -> float:
    from devices.datasets import load_digits
    from edge.litert_model import LiteRTModel

    model = LiteRTModel.load(model_dir)
    data = load_digits(layout="flat", seed=seed)
    model.fit(data.train.x, data.train.y, epochs=epochs, lr=lr, seed=seed)
    return float(model.evaluate(data.test.x, data.test.y)["accuracy"])


def run(quick: bool = False, out_dir: Path | None = None) -> Report:
    sizes = QUICK if quick else FULL
    began = time.perf_counter()
    model_dir = mlp_model_dir()
    report = Report(
        name="learning",
        title="Learning quality and demo wall time (issues 4 and 7)",
        quick=quick,
        params={
            "devices": sizes.devices,
            "rounds": sizes.rounds,
            "local_epochs": sizes.local_epochs,
            "partitions": f"Dirichlet alpha={sizes.alpha}, seed 0",
            "strategy": "fedavg",
        },
    )
    with tempfile.TemporaryDirectory(prefix="edgefl-bench-learning-") as tmp_name:
        work = Path(tmp_name) / "demo"
        argv = [
            sys.executable,
            "-m",
            "edge.cli",
            "demo",
            "--dir",
            str(work),
            "--devices",
            str(sizes.devices),
            "--rounds",
            str(sizes.rounds),
            "--alpha",
            str(sizes.alpha),
            "--model-dir",
            str(model_dir),
            "--exit-when-done",
        ]
        env = child_env()
        env["EDGEFL_RUN_LOCAL_EPOCHS"] = str(sizes.local_epochs)
        t0 = time.perf_counter()
        proc = subprocess.run(
            argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(
                f"demo failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        summary = json.loads((work / "demo-summary.json").read_text())
    per_round = {int(k): v for k, v in summary["accuracy_per_round"].items() if v is not None}
    final_round = max(per_round)
    lr = 0.2
    central = centralized_accuracy(model_dir, sizes.rounds * sizes.local_epochs, lr)
    report.results.append(
        Result(
            f"test accuracy after round {final_round} (federated, non-IID)",
            per_round[final_round],
            central,
            "accuracy",
            f"same model trained centrally, {sizes.rounds * sizes.local_epochs} epochs",
            target=f">= {ACCURACY_AIM} by round 10",
            met=None if quick else per_round[final_round] >= ACCURACY_AIM,
        )
    )
    report.results.append(
        Result(
            f"demo wall time, {sizes.devices} devices x {sizes.rounds} rounds",
            wall,
            None,
            "s",
            target=f"< {WALL_TARGET_S:.0f} s" if not quick else "",
            met=None if quick else wall < WALL_TARGET_S,
            note="includes starting broker, SuperLink, UI and every device, and stopping them",
        )
    )
    report.details = {"accuracy_per_round": per_round, "demo_summary": summary}
    report.notes.append(
        "Accuracy per round: "
        + ", ".join(f"r{r}={a:.3f}" for r, a in sorted(per_round.items()))
        + " (round 0 is the untrained initial model)."
    )
    return finish_report(report, began, out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.bench_learning [--quick] [--out DIR]``."""
    return benchmark_main(__doc__.splitlines()[0], run, argv)


if __name__ == "__main__":
    sys.exit(main())
