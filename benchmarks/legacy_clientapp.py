"""The old device design's ClientApp, kept for the benchmark only (bench_device).

Flower's SuperExec starts a fresh ``flwr-clientapp`` process for every message; this
ClientApp then calls the device's ``edgefl.v1.Trainer`` over gRPC at the node config's
``trainer-address`` (a ``unix:`` path or ``host:port``). That is how a device worked
before the in-process executor (``edge.executor``); devices no longer run it.
"""

from __future__ import annotations

import grpc
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edge.clientapp import arrays_to_record, record_to_arrays
from protos import codec
from protos.edgefl.v1 import trainer_pb2, trainer_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
app = ClientApp()


def _device(context: Context) -> ConfigRecord:
    return ConfigRecord({"device-id": str(context.node_config.get("device-id", ""))})


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content.config_records["config"]
    fit: dict[str, codec.ConfigScalar] = {}
    for key, name, kind in (
        ("local-epochs", "epochs", int),
        ("learning-rate", "learning_rate", float),
        ("proximal-mu", "proximal_mu", float),
        ("seed", "seed", int),
    ):
        if key in config:
            fit[name] = kind(config[key])  # type: ignore[arg-type]
    server_round = config.get("server-round", 0)
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    with grpc.insecure_channel(str(context.node_config["trainer-address"]), options) as channel:
        reply = trainer_pb2_grpc.TrainerStub(channel).Fit(
            trainer_pb2.FitRequest(
                weights=codec.tensors_to_proto(record_to_arrays(msg.content["arrays"])),  # type: ignore[arg-type]
                config=codec.config_to_proto(fit),
                server_round=server_round if isinstance(server_round, int) else 0,
            ),
            timeout=600,
        )
    metrics = MetricRecord(
        {
            "num-examples": int(reply.num_examples),
            "train-loss": float(reply.metrics.get("loss", 0.0)),
            "train-accuracy": float(reply.metrics.get("accuracy", 0.0)),
            "train-seconds": float(reply.metrics.get("seconds", 0.0)),
        }
    )
    content = RecordDict(
        {
            "arrays": arrays_to_record(codec.tensors_from_proto(reply.weights)),
            "metrics": metrics,
            "device": _device(context),
        }
    )
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(content=RecordDict({"device": _device(context)}), reply_to=msg)
