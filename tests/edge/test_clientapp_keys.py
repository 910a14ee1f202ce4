"""The ClientApp and the aggregator speak the keys of protos.wire_keys, and nothing else."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp.strategy import FedAvg

from devices.datasets import device_partitions, load_digits
from edge.clientapp import EdgeClientApp, arrays_to_record
from edge.config import load_settings
from edge.node import EdgeNode
from protos import wire_keys as keys
from tests.edge.helpers import device_config, make_package, model_weights

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def node(tmp_path: Path, mlp_model_dir: Path) -> EdgeNode:
    pkg = tmp_path / "initial.pkg"
    pkg.write_bytes(make_package(mlp_model_dir))
    node = EdgeNode(load_settings(device_config(tmp_path, initial_package=pkg), env={}))
    node.start()
    part = device_partitions(load_digits(layout="flat", seed=0), 5, scheme="iid", seed=0)[0]
    node.data.load_partition(part.x, part.y)
    return node


def _message(kind: str, **content: object) -> Message:
    """A message as the device receives it from its SuperNode."""
    metadata = Metadata(
        run_id=1,
        message_id=f"m-{kind}",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(RecordDict(content), metadata=metadata)  # type: ignore[arg-type]


def test_replies_hold_the_documented_keys_and_aggregate(node: EdgeNode, mlp_model_dir: Path) -> None:
    app = EdgeClientApp(node.trainer, "dev-1")
    weights = arrays_to_record(model_weights(mlp_model_dir))
    config = ConfigRecord({keys.SERVER_ROUND: 1, keys.LOCAL_EPOCHS: 1, keys.SEED: 2})
    train = app(_message(MessageType.TRAIN, arrays=weights, config=config), None)  # type: ignore[arg-type]
    assert set(train.content) == {keys.ARRAYS, keys.METRICS, keys.DEVICE}
    assert set(train.content[keys.METRICS]) == set(keys.TRAIN_METRICS)
    assert train.content[keys.DEVICE][keys.DEVICE_ID] == "dev-1"
    evaluate = app(
        _message(MessageType.EVALUATE, arrays=weights, config=config), None  # type: ignore[arg-type]
    )
    assert set(evaluate.content[keys.METRICS]) == set(keys.EVAL_METRICS)
    query = app(_message(MessageType.QUERY, config=ConfigRecord({})), None)  # type: ignore[arg-type]
    assert set(query.content) == {keys.DEVICE}
    # What the cloud's strategy makes of a train reply: the same metric names, weighted.
    _, metrics = FedAvg().aggregate_train(1, [train])
    assert metrics is not None and keys.TRAIN_LOSS in metrics and keys.TRAIN_ACCURACY in metrics


WIRE_VALUES = sorted(
    v for k, v in vars(keys).items() if k.isupper() and isinstance(v, str) and "-" in v
)
USERS = [
    "edge/clientapp.py",
    "cloud/aggregator.py",
    "cloud/demo.py",
    "cloud/commands.py",
    "cloud/web/schemas.py",
    "cloud/web/static/app.js",
]


@pytest.mark.parametrize("path", USERS)
def test_no_wire_key_is_spelled_again(path: str) -> None:
    text = (REPO_ROOT / path).read_text(encoding="utf-8")
    spelled = [v for v in WIRE_VALUES if re.search(rf"[\"']{re.escape(v)}[\"']", text)]
    assert spelled == [], f"{path} spells {spelled}; use protos.wire_keys"


def test_the_ui_reads_typed_fields_instead_of_guessing_names() -> None:
    js = (REPO_ROOT / "cloud/web/static/app.js").read_text(encoding="utf-8")
    for guess in ('"acc"', '"test"', '"eval"', '"train"', "eval_metrics", "aggregated_metrics"):
        assert guess not in js, guess
