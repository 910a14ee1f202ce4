"""Trainable TensorFlow modules that convert to LiteRT with builtin ops only.

Each module exposes four ``tf.function`` signatures, the model contract shared with
the device runtime (:mod:`edge.litert_model`):

* ``infer(x) -> {"probs"}``: softmax probabilities, dynamic batch.
* ``train(x, y, lr, mu) -> {"loss", "correct"}``: one hand-written SGD step on a fixed
  batch, with an optional FedProx proximal term ``mu * (w - anchor)``.
* ``parameters() -> {name: weight}``.
* ``restore(**weights) -> {"ok"}``: sets the weights *and* the FedProx anchors.

The graph avoids every op whose gradient has no TFLite builtin kernel: ReLU is
``tf.maximum(z, 0)``, the loss is log-softmax written out, the convolution is im2col
(pad + slice + concat) followed by a matmul, and max pooling is reshape + reduce_max on
tensors of at most four dimensions. Initialisation uses numpy with a seed, so a build
is deterministic.
"""

from __future__ import annotations

import abc
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from edge.model_card import WeightSpec

logger = logging.getLogger(__name__)

ARCHITECTURES = ("mlp", "cnn")


def _float32(name: str, shape: tuple[int, ...]) -> WeightSpec:
    """The spec of one trainable float32 weight (the card's record, edge.model_card)."""
    return WeightSpec(name, "float32", shape)


def _glorot(
    rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int
) -> np.ndarray:
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def _log_softmax(logits: tf.Tensor) -> tf.Tensor:
    return logits - tf.reduce_logsumexp(logits, axis=-1, keepdims=True)


class TrainableModel(tf.Module, abc.ABC):
    """Base class: weights, anchors and the four signatures.

    Subclasses define ``weight_specs`` / ``initial_values`` and ``logits(x)``.
    """

    arch: str = ""

    def __init__(
        self,
        input_shape: Sequence[int],
        classes: int,
        train_batch: int,
        seed: int,
    ) -> None:
        super().__init__(name=f"edgefl_{self.arch}")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.classes = int(classes)
        self.train_batch = int(train_batch)
        self.seed = int(seed)
        rng = np.random.default_rng(seed)
        values = self.initial_values(rng)
        self.specs: list[WeightSpec] = self.weight_specs()
        self.weights: list[tf.Variable] = []
        self.anchors: list[tf.Variable] = []
        for spec in self.specs:
            value = values[spec.name]
            if tuple(value.shape) != spec.shape:
                raise AssertionError(f"{spec.name}: init shape {value.shape} != {spec.shape}")
            self.weights.append(tf.Variable(value, name=spec.name, trainable=True))
            self.anchors.append(tf.Variable(value, name=f"{spec.name}_anchor", trainable=False))

    # -- to be provided by subclasses -------------------------------------------------
    @abc.abstractmethod
    def weight_specs(self) -> list[WeightSpec]:
        """Return the weights of this architecture in a stable order."""

    @abc.abstractmethod
    def initial_values(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Return seeded initial values for every weight."""

    @abc.abstractmethod
    def logits(self, x: tf.Tensor) -> tf.Tensor:
        """Forward pass up to the (pre-softmax) logits."""

    # -- signatures -------------------------------------------------------------------
    def _w(self, name: str) -> tf.Variable:
        for spec, var in zip(self.specs, self.weights, strict=True):
            if spec.name == name:
                return var
        raise KeyError(name)

    def signatures(self) -> dict[str, Any]:
        """Return the concrete functions to export, keyed by signature name."""
        x_infer = tf.TensorSpec([None, *self.input_shape], tf.float32, name="x")
        x_train = tf.TensorSpec([self.train_batch, *self.input_shape], tf.float32, name="x")
        y_train = tf.TensorSpec([self.train_batch], tf.int32, name="y")

        @tf.function(input_signature=[x_infer])
        def infer(x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"probs": tf.nn.softmax(self.logits(x), axis=-1)}

        @tf.function(
            input_signature=[
                x_train,
                y_train,
                tf.TensorSpec([], tf.float32, name="lr"),
                tf.TensorSpec([], tf.float32, name="mu"),
            ]
        )
        def train(x: tf.Tensor, y: tf.Tensor, lr: tf.Tensor, mu: tf.Tensor) -> dict[str, tf.Tensor]:
            with tf.GradientTape() as tape:
                logits = self.logits(x)
                onehot = tf.one_hot(y, self.classes, dtype=tf.float32)
                per_example = -tf.reduce_sum(onehot * _log_softmax(logits), axis=-1)
                loss = tf.reduce_sum(per_example) / float(self.train_batch)
            grads = tape.gradient(loss, self.weights)
            for var, anchor, grad in zip(self.weights, self.anchors, grads, strict=True):
                var.assign_sub(lr * (grad + mu * (var - anchor)))
            predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
            correct = tf.reduce_sum(tf.cast(tf.equal(predicted, y), tf.float32))
            return {"loss": loss, "correct": correct}

        @tf.function(input_signature=[])
        def parameters() -> dict[str, tf.Tensor]:
            return {
                spec.name: tf.identity(var)
                for spec, var in zip(self.specs, self.weights, strict=True)
            }

        restore_inputs = [tf.TensorSpec(s.shape, tf.float32, name=s.name) for s in self.specs]

        def _restore(*values: tf.Tensor) -> dict[str, tf.Tensor]:
            for var, anchor, value in zip(self.weights, self.anchors, values, strict=True):
                var.assign(value)
                anchor.assign(value)
            return {"ok": tf.constant(1, tf.int32)}

        restore: Any = tf.function(_restore, input_signature=restore_inputs)
        return {
            "infer": infer.get_concrete_function(),
            "train": train.get_concrete_function(),
            "parameters": parameters.get_concrete_function(),
            "restore": restore.get_concrete_function(),
        }


def _dense(x: tf.Tensor, kernel: tf.Variable, bias: tf.Variable) -> tf.Tensor:
    return tf.matmul(x, kernel) + bias


def _relu(x: tf.Tensor) -> tf.Tensor:
    # tf.nn.relu's gradient is ReluGrad, which has no TFLite builtin; Maximum's has.
    return tf.maximum(x, 0.0)


class MLP(TrainableModel):
    """Flatten → dense(hidden) → ReLU → ... → dense(classes)."""

    arch = "mlp"

    def __init__(
        self,
        input_shape: Sequence[int],
        classes: int,
        train_batch: int = 32,
        seed: int = 0,
        hidden: Sequence[int] = (64,),
    ) -> None:
        self.hidden = tuple(int(h) for h in hidden)
        self.features = int(np.prod(input_shape))
        super().__init__(input_shape, classes, train_batch, seed)

    def _layer_sizes(self) -> list[tuple[int, int]]:
        sizes = [self.features, *self.hidden, self.classes]
        return list(itertools.pairwise(sizes))

    def weight_specs(self) -> list[WeightSpec]:
        specs: list[WeightSpec] = []
        for i, (n_in, n_out) in enumerate(self._layer_sizes()):
            specs.append(_float32(f"dense{i}_kernel", (n_in, n_out)))
            specs.append(_float32(f"dense{i}_bias", (n_out,)))
        return specs

    def initial_values(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = {}
        for i, (n_in, n_out) in enumerate(self._layer_sizes()):
            values[f"dense{i}_kernel"] = _glorot(rng, (n_in, n_out), n_in, n_out)
            values[f"dense{i}_bias"] = np.zeros((n_out,), np.float32)
        return values

    def logits(self, x: tf.Tensor) -> tf.Tensor:
        h = tf.reshape(x, [-1, self.features])
        layers = self._layer_sizes()
        for i in range(len(layers)):
            h = _dense(h, self._w(f"dense{i}_kernel"), self._w(f"dense{i}_bias"))
            if i < len(layers) - 1:
                h = _relu(h)
        return h


class CNN(TrainableModel):
    """conv3x3(SAME) → ReLU → maxpool 2x2 → dense(hidden) → ReLU → dense(classes).

    The convolution is written as im2col + matmul so that its filter gradient is a
    plain matmul (``Conv2DBackpropFilter`` has no TFLite builtin). Input gradients are
    never needed because the convolution is the first layer.
    """

    arch = "cnn"

    def __init__(
        self,
        input_shape: Sequence[int],
        classes: int,
        train_batch: int = 32,
        seed: int = 0,
        filters: int = 16,
        hidden: int = 64,
        kernel_size: int = 3,
    ) -> None:
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs an input shape H,W,C; got {tuple(input_shape)}")
        height, width, _ = (int(d) for d in input_shape)
        if height % 2 or width % 2:
            raise ValueError(f"cnn needs even height and width; got {tuple(input_shape)}")
        if kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd")
        self.filters = int(filters)
        self.hidden = int(hidden)
        self.kernel_size = int(kernel_size)
        super().__init__(input_shape, classes, train_batch, seed)

    @property
    def _flat(self) -> int:
        height, width, _ = self.input_shape
        return (height // 2) * (width // 2) * self.filters

    def weight_specs(self) -> list[WeightSpec]:
        k, channels = self.kernel_size, self.input_shape[2]
        return [
            _float32("conv0_kernel", (k, k, channels, self.filters)),
            _float32("conv0_bias", (self.filters,)),
            _float32("dense0_kernel", (self._flat, self.hidden)),
            _float32("dense0_bias", (self.hidden,)),
            _float32("dense1_kernel", (self.hidden, self.classes)),
            _float32("dense1_bias", (self.classes,)),
        ]

    def initial_values(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        k, channels = self.kernel_size, self.input_shape[2]
        return {
            "conv0_kernel": _glorot(
                rng, (k, k, channels, self.filters), k * k * channels, k * k * self.filters
            ),
            "conv0_bias": np.zeros((self.filters,), np.float32),
            "dense0_kernel": _glorot(rng, (self._flat, self.hidden), self._flat, self.hidden),
            "dense0_bias": np.zeros((self.hidden,), np.float32),
            "dense1_kernel": _glorot(rng, (self.hidden, self.classes), self.hidden, self.classes),
            "dense1_bias": np.zeros((self.classes,), np.float32),
        }

    def _im2col(self, x: tf.Tensor) -> tf.Tensor:
        """[B, H, W, C] → [B*H*W, k*k*C] patches for a SAME, stride-1 convolution."""
        height, width, channels = self.input_shape
        k = self.kernel_size
        pad = k // 2
        padded = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        shifted = [
            padded[:, dy : dy + height, dx : dx + width, :] for dy in range(k) for dx in range(k)
        ]
        patches = tf.concat(shifted, axis=-1)  # [B, H, W, k*k*C], order (dy, dx, c)
        return tf.reshape(patches, [-1, k * k * channels])

    def _maxpool2(self, h: tf.Tensor) -> tf.Tensor:
        """2x2/2 max pooling with reshape + reduce_max (no MaxPoolGrad, ≤4-D tensors)."""
        height, width, _ = self.input_shape
        f = self.filters
        rows = tf.reshape(h, [-1, 2, width, f])  # pairs of rows
        rows = tf.reduce_max(rows, axis=1)  # [B*H/2, W, F]
        cols = tf.reshape(rows, [-1, 2, f])  # pairs of columns
        cols = tf.reduce_max(cols, axis=1)  # [B*H/2*W/2, F]
        return tf.reshape(cols, [-1, (height // 2) * (width // 2) * f])

    def logits(self, x: tf.Tensor) -> tf.Tensor:
        height, width, _ = self.input_shape
        k, channels = self.kernel_size, self.input_shape[2]
        kernel = tf.reshape(self._w("conv0_kernel"), [k * k * channels, self.filters])
        conv = tf.matmul(self._im2col(x), kernel) + self._w("conv0_bias")
        conv = _relu(conv)
        flat = self._maxpool2(tf.reshape(conv, [-1, height, width, self.filters]))
        h = _relu(_dense(flat, self._w("dense0_kernel"), self._w("dense0_bias")))
        return _dense(h, self._w("dense1_kernel"), self._w("dense1_bias"))


def make_model(
    arch: str,
    input_shape: Sequence[int],
    classes: int,
    *,
    train_batch: int = 32,
    seed: int = 0,
) -> TrainableModel:
    """Instantiate the module for ``arch`` ("mlp" or "cnn")."""
    if arch == "mlp":
        return MLP(input_shape, classes, train_batch=train_batch, seed=seed)
    if arch == "cnn":
        return CNN(input_shape, classes, train_batch=train_batch, seed=seed)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
