"""ServerApp: Flower's own ``FedAvg.start`` loop, timestamping the end of every round.

``evaluate_fn`` runs before round 1 and after every round; it appends the wall time
(and the global model's test accuracy, a sanity check that training happens) to the
JSON-lines file named by the run config key ``times-file``. Consecutive timestamps
give the round durations.
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from bare_app.mlp import WEIGHT_NAMES, accuracy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    min_nodes = int(cfg["min-nodes"])  # type: ignore[arg-type]
    data = np.load(str(cfg["initial-weights"]))
    initial = ArrayRecord({name: Array(np.ascontiguousarray(data[name])) for name in WEIGHT_NAMES})
    test_x, test_y = data["test_x"], data["test_y"]
    times_file = str(cfg["times-file"])

    def on_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        now = time.time()
        weights = {name: arrays[name].numpy() for name in arrays}
        acc = accuracy(weights, test_x, test_y)
        with open(times_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"round": server_round, "time": now, "accuracy": acc}) + "\n")
        return MetricRecord({"accuracy": acc})

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=min_nodes,
    )
    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(cfg["num-rounds"]),  # type: ignore[arg-type]
        timeout=float(cfg["round-timeout"]),  # type: ignore[arg-type]
        train_config=ConfigRecord(
            {
                "local-epochs": int(cfg["local-epochs"]),  # type: ignore[arg-type]
                "learning-rate": float(cfg["learning-rate"]),  # type: ignore[arg-type]
            }
        ),
        evaluate_fn=on_round,
    )
