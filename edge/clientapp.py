"""edgefl's ClientApp: what a device does with one Flower message, inside its own process.

The device's executor (:mod:`edge.executor`) takes each message from the SuperNode,
checks the fleet's approval of its run, and calls :class:`EdgeClientApp` with it in a
worker thread of the warm ``edgefl edge up`` process. The app calls the device's
:class:`~edge.trainer_service.LocalTrainer` directly: no gRPC hop, no process per
message, and no code from the run's FAB (the Flower App names ``edge.clientapp:app``
only so that ``flwr run`` accepts it; devices never load it from the FAB).

What each message type must hold (content keys; anything else is refused with
:class:`~edge.errors.TaskRefused` before the Trainer is touched):

======== ===================================== ======================================
type     content                               reply content
======== ===================================== ======================================
train    ``arrays`` (ArrayRecord, the global   ``arrays`` (new weights), ``metrics``
         weights), ``config`` (ConfigRecord)   (num-examples, train-loss,
                                               train-accuracy, train-seconds),
                                               ``device`` (device-id)
evaluate ``arrays``, ``config``                ``metrics`` (num-examples, eval-loss,
                                               eval-accuracy), ``device``
query    ``config``                            ``device``
======== ===================================== ======================================

Every message also carries the run approval (``edgefl-approval``, see
:mod:`edge.run_approval`), which the executor verifies first. Config keys:
``server-round``, ``local-epochs``, ``learning-rate``, ``proximal-mu``, ``seed``. Every
key and metric name is defined once, in :mod:`protos.wire_keys`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from edge.errors import TaskRefused
from edge.run_approval import APPROVAL_KEY
from edge.trainer_service import LocalTrainer
from protos import codec
from protos import wire_keys as keys

logger = logging.getLogger(__name__)

#: Flower config key → (Trainer config key, type). ``server-round`` is handled apart.
CONFIG_KEYS: dict[str, tuple[str, type]] = {
    keys.LOCAL_EPOCHS: ("epochs", int),
    keys.LEARNING_RATE: ("learning_rate", float),
    keys.PROXIMAL_MU: ("proximal_mu", float),
    keys.SEED: ("seed", int),
}
#: Content keys each message type must hold (besides the approval).
CONTENT_KEYS = keys.MESSAGE_CONTENT


def arrays_to_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        {name: Array(np.ascontiguousarray(weights[name])) for name in sorted(weights)}
    )


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: record[name].numpy() for name in record}


def _check_content(msg: Message) -> str:
    kind = msg.metadata.message_type.split(".", 1)[0]
    expected = CONTENT_KEYS.get(kind)
    if expected is None:
        raise TaskRefused(
            f"message type {msg.metadata.message_type!r} is not one this device handles "
            f"({', '.join(sorted(CONTENT_KEYS))})"
        )
    present = set(msg.content.keys()) - {APPROVAL_KEY}
    unknown, missing = sorted(present - expected), sorted(expected - present)
    if unknown or missing:
        problems = []
        if unknown:
            problems.append(f"unknown content keys {', '.join(unknown)}")
        if missing:
            problems.append(f"missing content keys {', '.join(missing)}")
        raise TaskRefused(
            f"{kind} message refused: {'; '.join(problems)} "
            f"(a {kind} message holds {', '.join(sorted(expected))})"
        )
    if keys.CONFIG in expected and not isinstance(msg.content[keys.CONFIG], ConfigRecord):
        raise TaskRefused(f"{kind} message refused: {keys.CONFIG!r} is not a ConfigRecord")
    if keys.ARRAYS in expected and not isinstance(msg.content[keys.ARRAYS], ArrayRecord):
        raise TaskRefused(f"{kind} message refused: {keys.ARRAYS!r} is not an ArrayRecord")
    return kind


def _fit_config(config: ConfigRecord) -> tuple[int, dict[str, codec.ConfigScalar]]:
    """(server round, the Trainer's config) from a message's config; TaskRefused on unknown keys."""
    unknown = sorted(set(config) - set(CONFIG_KEYS) - {keys.SERVER_ROUND})
    if unknown:
        raise TaskRefused(
            f"unknown config keys {', '.join(unknown)} "
            f"(known: {', '.join(sorted([*CONFIG_KEYS, keys.SERVER_ROUND]))})"
        )
    out: dict[str, codec.ConfigScalar] = {}
    for key, (name, kind) in CONFIG_KEYS.items():
        if key in config:
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TaskRefused(f"config {key} must be a number, got {value!r}")
            if kind is int and not isinstance(value, int):
                raise TaskRefused(f"config {key} must be an integer, got {value!r}")
            out[name] = kind(value)
    server_round = config.get(keys.SERVER_ROUND, 0)
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        raise TaskRefused(f"config {keys.SERVER_ROUND} must be an integer, got {server_round!r}")
    return server_round, out


class EdgeClientApp:
    """Answers train/evaluate/query messages with the device's own Trainer."""

    def __init__(self, trainer: LocalTrainer, device_id: str) -> None:
        self.trainer = trainer
        self.device_id = device_id

    def _device(self) -> ConfigRecord:
        return ConfigRecord({keys.DEVICE_ID: self.device_id})

    def __call__(
        self, msg: Message, context: Context, *, cancelled: Callable[[], bool] | None = None
    ) -> Message:
        """The reply to ``msg``; raises TaskRefused or the Trainer's errors (EdgeError)."""
        kind = _check_content(msg)
        if kind == "query":
            return Message(content=RecordDict({keys.DEVICE: self._device()}), reply_to=msg)
        server_round, config = _fit_config(msg.content.config_records[keys.CONFIG])
        weights = record_to_arrays(msg.content.array_records[keys.ARRAYS])
        if kind == "train":
            result = self.trainer.fit(weights, config, server_round, cancelled=cancelled)
            metrics = MetricRecord(
                {
                    keys.NUM_EXAMPLES: int(result.num_examples),
                    keys.TRAIN_LOSS: float(result.metrics.get("loss", 0.0)),
                    keys.TRAIN_ACCURACY: float(result.metrics.get("accuracy", 0.0)),
                    keys.TRAIN_SECONDS: float(result.metrics.get("seconds", 0.0)),
                }
            )
            content = RecordDict(
                {
                    keys.ARRAYS: arrays_to_record(result.weights),
                    keys.METRICS: metrics,
                    keys.DEVICE: self._device(),
                }
            )
            return Message(content=content, reply_to=msg)
        evaluation = self.trainer.evaluate(weights, config, server_round)
        metrics = MetricRecord(
            {
                keys.NUM_EXAMPLES: int(evaluation.num_examples),
                keys.EVAL_LOSS: float(evaluation.loss),
                keys.EVAL_ACCURACY: float(evaluation.metrics.get("accuracy", 0.0)),
            }
        )
        return Message(
            content=RecordDict({keys.METRICS: metrics, keys.DEVICE: self._device()}),
            reply_to=msg,
        )


#: The name the Flower App's ``clientapp`` component points at (``edge.clientapp:app``).
#: It is the class, not a Flower ``ClientApp``: a ``flwr-clientapp`` process that loads
#: it from a FAB fails to load it, so the per-message process path stays closed.
app = EdgeClientApp
