"""ClientApp: trains the MLP in numpy on this node's partition, in the ClientApp process.

The node's partition is an ``.npz`` (``x``, ``y``) named by the node config key
``partition``; bench_rounds writes one per SuperNode from ``devices.datasets``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from bare_app.mlp import fit

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    data = np.load(str(context.node_config["partition"]))
    x, y = data["x"], data["y"]
    arrays = msg.content.array_records["arrays"]
    weights = {name: arrays[name].numpy().copy() for name in arrays}
    config = msg.content.config_records["config"]
    loss = fit(
        weights,
        x,
        y,
        epochs=int(config["local-epochs"]),  # type: ignore[arg-type]
        lr=float(config["learning-rate"]),  # type: ignore[arg-type]
        seed=int(config["server-round"]),  # type: ignore[arg-type]
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()}),
            "metrics": MetricRecord({"num-examples": int(x.shape[0]), "train-loss": loss}),
        }
    )
    return Message(content=content, reply_to=msg)
