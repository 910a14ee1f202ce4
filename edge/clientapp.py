"""Flower ClientApp: a thin adapter in front of the device's Trainer service.

Flower's SuperNode starts a new process for every message, so this module imports
only Flower, gRPC and our generated stubs, holds no state, and does the work by
calling the device's own ``edgefl.v1.Trainer`` over loopback. The SuperNode passes
the device's identity and the Trainer address as node config::

    flower-supernode ... --node-config 'device-id="pi-17" trainer-address="127.0.0.1:50051"'
"""

from __future__ import annotations

import logging

import grpc
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from protos import codec
from protos.edgefl.v1 import trainer_pb2, trainer_pb2_grpc

logger = logging.getLogger(__name__)

#: Seconds one Fit call may take before the adapter gives up (the round timeout on
#: the server is what really bounds a round).
FIT_DEADLINE_S = 600.0
#: Largest gRPC message between the adapter and the Trainer.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

app = ClientApp()


def arrays_to_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        {name: Array(np.ascontiguousarray(weights[name])) for name in sorted(weights)}
    )


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: record[name].numpy() for name in record}


def _trainer(context: Context) -> tuple[trainer_pb2_grpc.TrainerStub, grpc.Channel]:
    address = str(context.node_config.get("trainer-address", ""))
    if not address:
        raise RuntimeError(
            "node config lacks trainer-address (start the SuperNode with edgefl edge up)"
        )
    channel = grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    return trainer_pb2_grpc.TrainerStub(channel), channel


def _device_record(context: Context) -> ConfigRecord:
    return ConfigRecord({"device-id": str(context.node_config.get("device-id", ""))})


def _fit_config(config: ConfigRecord) -> dict[str, codec.ConfigScalar]:
    out: dict[str, codec.ConfigScalar] = {}
    mapping = {
        "local-epochs": ("epochs", int),
        "learning-rate": ("learning_rate", float),
        "proximal-mu": ("proximal_mu", float),
        "seed": ("seed", int),
    }
    for key, (name, kind) in mapping.items():
        if key in config:
            out[name] = kind(config[key])  # type: ignore[arg-type]
    return out


def _server_round(config: ConfigRecord) -> int:
    value = config.get("server-round", 0)
    return value if isinstance(value, int) else 0


@app.train()
def train(msg: Message, context: Context) -> Message:
    stub, channel = _trainer(context)
    try:
        config = msg.content.config_records["config"]
        request = trainer_pb2.FitRequest(
            weights=codec.tensors_to_proto(record_to_arrays(msg.content.array_records["arrays"])),
            config=codec.config_to_proto(_fit_config(config)),
            server_round=_server_round(config),
        )
        reply = stub.Fit(request, timeout=FIT_DEADLINE_S)
    finally:
        channel.close()
    weights = codec.tensors_from_proto(reply.weights)
    metrics = MetricRecord(
        {
            "num-examples": int(reply.num_examples),
            "train-loss": float(reply.metrics.get("loss", 0.0)),
            "train-accuracy": float(reply.metrics.get("accuracy", 0.0)),
            "train-seconds": float(reply.metrics.get("seconds", 0.0)),
        }
    )
    content = RecordDict(
        {"arrays": arrays_to_record(weights), "metrics": metrics, "device": _device_record(context)}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    stub, channel = _trainer(context)
    try:
        request = trainer_pb2.EvaluateRequest(
            weights=codec.tensors_to_proto(record_to_arrays(msg.content.array_records["arrays"])),
            server_round=_server_round(msg.content.config_records["config"]),
        )
        reply = stub.Evaluate(request, timeout=FIT_DEADLINE_S)
    finally:
        channel.close()
    metrics = MetricRecord(
        {
            "num-examples": int(reply.num_examples),
            "eval-loss": float(reply.loss),
            "eval-accuracy": float(reply.metrics.get("accuracy", 0.0)),
        }
    )
    return Message(
        content=RecordDict({"metrics": metrics, "device": _device_record(context)}), reply_to=msg
    )


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the aggregator which device this node is (used to name devices in the UI)."""
    return Message(content=RecordDict({"device": _device_record(context)}), reply_to=msg)
