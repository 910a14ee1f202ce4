"""Every key of a Flower message that edgefl reads or writes, and every metric name.

The cloud's aggregator (:mod:`cloud.aggregator`) and the devices' ClientApp
(:mod:`edge.clientapp`) talk through Flower ``RecordDict`` messages; these names are
that contract, so both sides (and whatever reads the metrics after them: the registry,
the web API, the demo and the CLI) take them from here instead of spelling them again.

Message content (``RecordDict`` keys)::

    train     arrays (ArrayRecord), config (ConfigRecord)  → arrays, metrics, device
    evaluate  arrays, config                               → metrics, device
    query     config                                       → device

plus the run approval (:data:`APPROVAL`, see :mod:`edge.run_approval`) in every message.
"""

from __future__ import annotations

# -- message content ---------------------------------------------------------------------

ARRAYS = "arrays"
"""ArrayRecord: the global weights (to a device) or the new local weights (back)."""
CONFIG = "config"
"""ConfigRecord: the round's training configuration (:data:`CONFIG_KEYS`)."""
METRICS = "metrics"
"""MetricRecord of a reply (:data:`TRAIN_METRICS`, :data:`EVAL_METRICS`)."""
DEVICE = "device"
"""ConfigRecord of a reply naming the device (:data:`DEVICE_ID`)."""
APPROVAL = "edgefl-approval"
"""ConfigRecord: the fleet's signed approval of the run."""

MESSAGE_CONTENT: dict[str, frozenset[str]] = {
    "train": frozenset({ARRAYS, CONFIG}),
    "evaluate": frozenset({ARRAYS, CONFIG}),
    "query": frozenset({CONFIG}),
}
"""Content keys each message type must hold (besides the approval)."""

# -- the "device" record -----------------------------------------------------------------

DEVICE_ID = "device-id"
"""The device's id in the fleet."""

# -- the "config" record -----------------------------------------------------------------

SERVER_ROUND = "server-round"
"""The round the message belongs to."""
LOCAL_EPOCHS = "local-epochs"
"""Epochs to train locally."""
LEARNING_RATE = "learning-rate"
"""SGD learning rate."""
PROXIMAL_MU = "proximal-mu"
"""FedProx proximal coefficient."""
SEED = "seed"
"""Shuffle seed of local training."""
CONFIG_KEYS = frozenset({SERVER_ROUND, LOCAL_EPOCHS, LEARNING_RATE, PROXIMAL_MU, SEED})
"""Every key a config record may hold."""

# -- metric names ------------------------------------------------------------------------

NUM_EXAMPLES = "num-examples"
"""Samples a reply was computed on (the weight of its aggregation)."""
TRAIN_LOSS = "train-loss"
"""Mean training loss of a device's local epochs (aggregated: example-weighted mean)."""
TRAIN_ACCURACY = "train-accuracy"
"""Training accuracy of a device (aggregated: example-weighted mean)."""
TRAIN_SECONDS = "train-seconds"
"""Seconds a device spent training."""
EVAL_PREFIX = "eval-"
"""Prefix of evaluation metrics (a device's own, or the cloud's on held-out data)."""
EVAL_LOSS = EVAL_PREFIX + "loss"
"""Loss on evaluation data."""
EVAL_ACCURACY = EVAL_PREFIX + "accuracy"
"""Accuracy on evaluation data."""
TRAIN_METRICS = (NUM_EXAMPLES, TRAIN_LOSS, TRAIN_ACCURACY, TRAIN_SECONDS)
"""What a train reply's metrics hold."""
EVAL_METRICS = (NUM_EXAMPLES, EVAL_LOSS, EVAL_ACCURACY)
"""What an evaluate reply's metrics hold."""
