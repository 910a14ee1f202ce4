"""``edgefl.v1.Trainer``: local training and evaluation, isolated from serving.

:class:`LocalTrainer` is the domain object. It keeps its **own** LiteRT interpreter,
built from the model being served (same flatbuffer and card) but never one of the
serving interpreters, so training never disturbs predictions. One Fit or Evaluate runs
at a time (a lock); the others wait.

The local samples are split into a **train** part and a **held-out** part by
:mod:`edge.local_data_split` (``[data] holdout_fraction``, ``[data] min_holdout``).

Fit: the offered weights are checked against the card first (names, shapes, dtypes →
:class:`~edge.errors.WeightMismatch`, nothing touched), restored into the training
interpreter, trained on the **train** part only, and returned with metrics
(``num_examples`` counts the train part). A device with too few samples for a split
trains on all of them (logged).
Evaluate: the offered weights are evaluated on the **held-out** part only
(:class:`~edge.errors.NoHeldOutData` when the device has none).
Check (:meth:`LocalTrainer.check`, the shadow check of a staged rollout, not on the
wire): the weights answer one inference call per held-out sample; a call that raises or
returns a non-finite value is an *inference error* (and a wrong answer), the rest give
accuracy and loss.

Config keys (each optional, defaults from ``[training]`` and the card): ``epochs``
(int ≥ 0), ``batch_size`` (int, must equal the card's train batch), ``learning_rate``
(> 0), ``proximal_mu`` (≥ 0, FedProx), ``seed`` (int). Unknown keys are rejected so a
typo does not silently train with defaults.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
import numpy as np

from edge.config import DEFAULT_HOLDOUT_FRACTION, DEFAULT_MIN_HOLDOUT, TrainingSettings
from edge.errors import InvalidInput, ModelNotFound, NoLocalData, WeightMismatch
from edge.grpc_status import abort
from edge.litert_model import LiteRTModel
from edge.local_data import LocalData
from edge.local_data_split import Split, require_heldout, split_samples
from edge.serving import Serving, ServingModel
from protos import codec
from protos.codec import ConfigScalar
from protos.edgefl.v1 import trainer_pb2, trainer_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].full_name
#: Most epochs one Fit may ask for: a request cannot hold the trainer for hours.
MAX_EPOCHS = 1000

CONFIG_KEYS = ("epochs", "batch_size", "learning_rate", "proximal_mu", "seed")
#: Probabilities are clipped at this floor in the check's loss (as in LiteRTModel.evaluate).
_PROB_FLOOR = 1e-7


@dataclass(frozen=True)
class FitConfig:
    """Validated training parameters of one Fit."""

    epochs: int
    learning_rate: float
    proximal_mu: float
    seed: int


@dataclass(frozen=True)
class FitResult:
    """New weights, metrics (loss, accuracy, steps, seconds, examples) and example count."""

    weights: dict[str, np.ndarray]
    metrics: dict[str, float]
    num_examples: int


@dataclass(frozen=True)
class EvaluateResult:
    """Loss, metrics (accuracy, seconds) and example count of one evaluation."""

    loss: float
    metrics: dict[str, float]
    num_examples: int


@dataclass(frozen=True)
class CheckResult:
    """One version's shadow check on the held-out part."""

    loss: float
    """Mean cross-entropy over the calls without an error (NaN when every call erred)."""
    accuracy: float
    """Share of held-out samples answered correctly (an erring call is a wrong answer)."""
    examples: int
    """Held-out samples, one inference call each."""
    inference_errors: int
    """Calls that raised or returned NaN or infinite values."""
    train_examples: int
    """The other local samples: those Fit trains on."""

    @property
    def error_rate(self) -> float:
        return self.inference_errors / self.examples


class LocalTrainer:
    """Trains and evaluates on local data with a private interpreter."""

    def __init__(
        self,
        serving: Serving,
        data: LocalData,
        settings: TrainingSettings,
        *,
        holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
        min_holdout: int = DEFAULT_MIN_HOLDOUT,
        on_fit: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        """``on_fit(server_round, metrics)`` runs after every successful Fit; the split
        of the local samples follows ``holdout_fraction`` and ``min_holdout``."""
        self._serving = serving
        self._data = data
        self._settings = settings
        self.holdout_fraction = holdout_fraction
        self.min_holdout = min_holdout
        self._on_fit = on_fit
        self._lock = threading.Lock()
        self._model: LiteRTModel | None = None
        self._model_key: tuple[str, str] | None = None
        self._busy = threading.Event()

    @property
    def busy(self) -> bool:
        """Whether a Fit or Evaluate is running."""
        return self._busy.is_set()

    def _interpreter(self, serving: ServingModel) -> LiteRTModel:
        key = (serving.card.architecture_id, codec.sha256_hex(serving.package.tflite))
        if self._model is None or self._model_key != key:
            logger.info("building the training interpreter for %s", key[0])
            self._model = LiteRTModel(
                serving.package.tflite,
                serving.card,
                num_threads=self._serving.num_threads,
                delegate=self._serving.delegate,
            )
            self._model_key = key
        return self._model

    def parse_config(
        self, config: Mapping[str, ConfigScalar], card_batch: int, card_lr: float
    ) -> FitConfig:
        """Validate a request's config against the known keys and the card."""
        problems: list[str] = []
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            problems.append(
                f"unknown config keys: {', '.join(unknown)} (known: {', '.join(CONFIG_KEYS)})"
            )

        def integer(key: str, default: int) -> int:
            value = config.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"config {key} must be an integer, got {value!r}")
                return default
            return value

        def number(key: str, default: float) -> float:
            value = config.get(key, default)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                problems.append(f"config {key} must be a finite number, got {value!r}")
                return default
            return float(value)

        epochs = integer("epochs", self._settings.epochs)
        batch = integer("batch_size", self._settings.batch or card_batch)
        lr = number("learning_rate", self._settings.learning_rate or card_lr)
        mu = number("proximal_mu", self._settings.proximal_mu)
        seed = integer("seed", self._settings.seed)
        if not 0 <= epochs <= MAX_EPOCHS:
            problems.append(f"config epochs must be in 0..{MAX_EPOCHS}, got {epochs}")
        if batch != card_batch:
            problems.append(
                f"config batch_size {batch} differs from the model's train batch {card_batch}"
            )
        if lr <= 0:
            problems.append(f"config learning_rate must be > 0, got {lr}")
        if mu < 0:
            problems.append(f"config proximal_mu must be >= 0, got {mu}")
        if seed < 0:
            problems.append(f"config seed must be >= 0, got {seed}")
        if problems:
            raise InvalidInput("; ".join(problems))
        return FitConfig(epochs=epochs, learning_rate=lr, proximal_mu=mu, seed=seed)

    def _prepare(
        self, weights: Mapping[str, np.ndarray]
    ) -> tuple[ServingModel, LiteRTModel, np.ndarray, np.ndarray]:
        serving = self._serving.require()
        model = self._interpreter(serving)
        problems = model.check_weights(weights)
        if problems:
            raise WeightMismatch(problems)
        x, y = self._data.snapshot()
        if len(y) == 0:
            raise NoLocalData("no local samples stored; append samples first")
        return serving, model, x, y

    def split(self, x: np.ndarray, y: np.ndarray) -> Split:
        """The train/held-out split of ``(x, y)`` under this trainer's settings."""
        return split_samples(x, y, self.holdout_fraction, self.min_holdout)

    def _heldout(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        held = require_heldout(self.split(x, y), len(y), self.min_holdout)
        return x[held], y[held]

    def fit(
        self,
        weights: Mapping[str, np.ndarray],
        config: Mapping[str, ConfigScalar],
        server_round: int = 0,
        *,
        cancelled: Callable[[], bool] | None = None,
    ) -> FitResult:
        """Train ``weights`` on local data; raises InvalidInput/WeightMismatch/NoLocalData/ModelNotLoaded.

        ``cancelled()`` is asked between training steps; a true answer stops with
        :class:`~edge.errors.TrainingCancelled`. The training interpreter then holds
        half-trained weights, which the next Fit or Evaluate overwrites first; the
        serving models, the model store and the local samples are never touched.
        """
        with self._lock:
            self._busy.set()
            try:
                serving, model, x, y = self._prepare(weights)
                cfg = self.parse_config(
                    config, serving.card.train_batch, serving.card.optimizer.learning_rate
                )
                part = self.split(x, y)
                if part.has_heldout:
                    x, y = x[part.train], y[part.train]
                else:
                    logger.warning(
                        "fit round %d: %d samples are too few for a held-out split "
                        "(2 x [data] min_holdout = %d); training on all of them",
                        server_round,
                        len(y),
                        2 * self.min_holdout,
                    )
                model.set_weights(weights)
                metrics = model.fit(
                    x,
                    y,
                    epochs=cfg.epochs,
                    lr=cfg.learning_rate,
                    mu=cfg.proximal_mu,
                    seed=cfg.seed,
                    cancelled=cancelled,
                )
                new_weights = model.get_weights()
            finally:
                self._busy.clear()
        logger.info(
            "fit round %d: %d examples, loss %.4f, accuracy %.3f",
            server_round,
            len(y),
            metrics["loss"],
            metrics["accuracy"],
        )
        if self._on_fit is not None:
            self._on_fit(server_round, metrics)
        return FitResult(weights=new_weights, metrics=metrics, num_examples=len(y))

    def evaluate(
        self,
        weights: Mapping[str, np.ndarray],
        config: Mapping[str, ConfigScalar],
        server_round: int = 0,
    ) -> EvaluateResult:
        """Evaluate ``weights`` on the held-out part (NoHeldOutData without one)."""
        with self._lock:
            self._busy.set()
            try:
                serving, model, x, y = self._prepare(weights)
                self.parse_config(
                    config, serving.card.train_batch, serving.card.optimizer.learning_rate
                )
                x, y = self._heldout(x, y)
                started = time.perf_counter()
                model.set_weights(weights)
                result = model.evaluate(x, y)
                seconds = time.perf_counter() - started
            finally:
                self._busy.clear()
        return EvaluateResult(
            loss=result["loss"],
            metrics={"accuracy": result["accuracy"], "seconds": seconds},
            num_examples=len(y),
        )

    def check(self, weights: Mapping[str, np.ndarray]) -> CheckResult:
        """The shadow check of ``weights`` on the held-out part (see the module docstring).

        Raises WeightMismatch/NoLocalData/NoHeldOutData/ModelNotLoaded, never for what
        one inference call does: that is counted.
        """
        with self._lock:
            self._busy.set()
            try:
                _, model, x, y = self._prepare(weights)
                total = len(y)
                x, y = self._heldout(x, y)
                model.set_weights(weights)
                errors = correct = 0
                loss_sum = 0.0
                for i in range(len(y)):
                    try:
                        probs = model.infer(x[i : i + 1])[0]
                    except Exception as exc:  # counted: the check's subject
                        logger.debug("check: inference call %d raised: %s", i, exc)
                        errors += 1
                        continue
                    if not np.isfinite(probs).all():
                        errors += 1
                        continue
                    label = int(y[i])
                    correct += int(int(probs.argmax()) == label)
                    loss_sum += -math.log(min(1.0, max(_PROB_FLOOR, float(probs[label]))))
            finally:
                self._busy.clear()
        n = len(y)
        answered = n - errors
        return CheckResult(
            loss=loss_sum / answered if answered else float("nan"),
            accuracy=correct / n,
            examples=n,
            inference_errors=errors,
            train_examples=total - n,
        )


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    """Thin gRPC layer over :class:`LocalTrainer`."""

    def __init__(self, trainer: LocalTrainer, model_name: str) -> None:
        self._trainer = trainer
        self._model_name = model_name

    def _check_name(self, name: str) -> None:
        if name and name != self._model_name:
            raise ModelNotFound(
                f"model {name!r} not found; this device trains {self._model_name!r}"
            )

    def Fit(
        self, request: trainer_pb2.FitRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.FitResponse:
        try:
            self._check_name(request.model_name)
            weights = codec.tensors_from_proto(request.weights)
            config = codec.config_from_proto(request.config)
            result = self._trainer.fit(weights, config, request.server_round)
            return trainer_pb2.FitResponse(
                weights=codec.tensors_to_proto(result.weights),
                metrics=result.metrics,
                num_examples=result.num_examples,
            )
        except Exception as exc:
            abort(context, exc, "Trainer.Fit")

    def Evaluate(
        self, request: trainer_pb2.EvaluateRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.EvaluateResponse:
        try:
            self._check_name(request.model_name)
            weights = codec.tensors_from_proto(request.weights)
            config = codec.config_from_proto(request.config)
            result = self._trainer.evaluate(weights, config, request.server_round)
            return trainer_pb2.EvaluateResponse(
                loss=result.loss, metrics=result.metrics, num_examples=result.num_examples
            )
        except Exception as exc:
            abort(context, exc, "Trainer.Evaluate")
