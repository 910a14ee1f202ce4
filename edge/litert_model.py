"""Device-side model: a LiteRT interpreter driven through the four model signatures.

The ``.tflite`` file built by :mod:`cloud.authoring.build` carries the signatures
``infer``, ``train``, ``parameters`` and ``restore``; :class:`LiteRTModel` wraps them
with shape/dtype checks, named weights as described by the :class:`ModelCard`, and
``fit``/``evaluate`` loops. Only numpy and ``ai_edge_litert`` are imported: never
TensorFlow, which a device does not have.

**Not thread-safe.** A LiteRT interpreter gives silently wrong results (or crashes)
when two calls overlap, so a :class:`LiteRTModel` must be used by one thread at a time.
Callers serialise access (the services layer owns the locks) or keep one instance per
thread (:meth:`LiteRTModel.clone`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from edge.errors import EdgeError, TrainingCancelled
from edge.model_card import ModelCard

logger = logging.getLogger(__name__)

MODEL_FILE = "model.tflite"
CARD_FILE = "card.json"
_TRAIN_INPUTS = frozenset({"x", "y", "lr", "mu"})
_TRAIN_OUTPUTS = frozenset({"loss", "correct"})
_PROB_FLOOR = 1e-7


class ModelContractError(EdgeError, ValueError):
    """The ``.tflite`` file does not implement the model contract its card describes."""


class WeightMismatchError(EdgeError, ValueError):
    """Weights offered to :meth:`LiteRTModel.set_weights` do not match the card.

    ``problems`` lists every missing, unexpected, mis-shaped or mis-typed weight.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("weights do not match the model card: " + "; ".join(self.problems))


_WRAPPER_CALLS = ("ResizeInputTensor", "AllocateTensors", "SetTensor", "Invoke", "GetTensor")


@dataclass(frozen=True)
class _RunnerInternals:
    """What a signature runner drives: its interpreter wrapper, subgraph and tensors."""

    wrapper: Any
    subgraph: int
    inputs: dict[str, int]
    outputs: dict[str, int]


def _runner_internals(runner: Any) -> _RunnerInternals | None:
    """The internals of ``runner`` when it exposes them (``ai-edge-litert`` 2.x, the
    pinned runtime, does), else None: the caller then uses the runner's own call."""
    wrapper: Any = getattr(runner, "_interpreter_wrapper", None)
    if not all(callable(getattr(wrapper, name, None)) for name in _WRAPPER_CALLS):
        return None
    try:
        return _RunnerInternals(
            wrapper=wrapper,
            subgraph=int(runner._subgraph_index),
            inputs={str(name): int(i) for name, i in dict(runner._inputs).items()},
            outputs={str(name): int(i) for name, i in dict(runner._outputs).items()},
        )
    except (AttributeError, TypeError, KeyError, ValueError):
        return None


class _InferCall:
    """The ``infer`` signature, called with as little Python per call as possible.

    ``SignatureRunner.__call__`` resizes the input and re-plans the subgraph's tensors
    on every call and returns a dict; on a device answering one example per request
    that is most of the time spent outside the model itself. When the runner exposes
    the interpreter wrapper it drives (true of ``ai-edge-litert`` 2.x, the pinned
    runtime), this resizes and re-plans only when the batch size changes, and
    otherwise only copies the input in, invokes and copies the output out. Any other
    runtime gets the runner's own call: slower, same results.

    Every ``infer`` call of a :class:`LiteRTModel` goes through one instance, so the
    remembered batch size is always that of the subgraph's input tensor.
    """

    def __init__(self, runner: Any, input_name: str, output_name: str) -> None:
        self._runner = runner
        self._input_name = input_name
        self._output_name = output_name
        self._batch = -1
        internals = _runner_internals(runner)
        self.direct = (
            internals is not None
            and input_name in internals.inputs
            and output_name in internals.outputs
        )
        if internals is not None and self.direct:
            self._wrapper = internals.wrapper
            self._subgraph = internals.subgraph
            self._input_index = internals.inputs[input_name]
            self._output_index = internals.outputs[output_name]

    def __call__(self, xs: np.ndarray) -> np.ndarray:
        """Probabilities for ``xs`` (contiguous float32 ``[batch, *input_shape]``), a new array."""
        if not self.direct:
            out = self._runner(**{self._input_name: xs})
            return np.array(out[self._output_name], dtype=np.float32, copy=True)
        wrapper, subgraph = self._wrapper, self._subgraph
        batch = xs.shape[0]
        if batch != self._batch:
            self._batch = -1  # unknown until the resize has fully succeeded
            wrapper.ResizeInputTensor(
                self._input_index, np.array(xs.shape, dtype=np.int32), False, subgraph
            )
            wrapper.AllocateTensors(subgraph)
            self._batch = batch
        wrapper.SetTensor(self._input_index, xs, subgraph)
        wrapper.Invoke(subgraph)
        probs: np.ndarray = wrapper.GetTensor(self._output_index, subgraph)  # a copy
        return probs if probs.dtype == np.float32 else probs.astype(np.float32)


class _SignatureCall:
    """A fixed-shape signature (``train``, ``parameters``, ``restore``), called safely.

    ``SignatureRunner.__call__`` resizes every input before each call, scalars
    included: it passes ``np.array(value.shape)``, which is empty for a 0-d input.
    LiteRT 2.3.0's aarch64 wheel turns an empty shape into a ``memset`` of ``-4``
    bytes inside ``ResizeInputTensor`` and the process dies with SIGSEGV (seen under
    qemu-user 10, core dump read with gdb: the train signature's ``lr`` and ``mu``
    are scalars, so training crashed on arm64 while inference, which has no scalar
    input, worked). The x86-64 build survives the same call.

    This call resizes an input only when the given shape differs from the tensor's
    current one, never to or from a 0-d shape (a :class:`ValueError` instead), and
    re-plans the subgraph only after a resize. The train signature's inputs have fixed
    shapes, so in practice nothing is ever resized. Without a usable wrapper (another
    runtime) it falls back to the runner's own call.
    """

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self._allocated = False
        details: dict[str, dict[str, Any]] = runner.get_input_details()
        self._shapes = {
            name: tuple(int(d) for d in detail["shape"]) for name, detail in details.items()
        }
        internals = _runner_internals(runner)
        self.direct = internals is not None and set(internals.inputs) == set(self._shapes)
        if internals is not None and self.direct:
            self._wrapper = internals.wrapper
            self._subgraph = internals.subgraph
            self._inputs = internals.inputs
            self._outputs = list(internals.outputs.items())

    def __call__(self, **values: np.ndarray) -> dict[str, np.ndarray]:
        """The signature's outputs by name (copies) for ``values`` by input name."""
        if set(values) != set(self._shapes):
            raise ValueError(f"signature inputs are {sorted(self._shapes)}, got {sorted(values)}")
        if not self.direct:
            out: dict[str, np.ndarray] = self._runner(**values)
            return out
        wrapper, subgraph = self._wrapper, self._subgraph
        for name, value in values.items():
            shape = tuple(value.shape)
            if shape == self._shapes[name]:
                continue
            if not shape or not self._shapes[name]:
                raise ValueError(
                    f"input {name!r} has shape {list(self._shapes[name])}, got {list(shape)}"
                )
            self._allocated = False  # unknown until the resize and re-plan both succeed
            wrapper.ResizeInputTensor(
                self._inputs[name], np.array(shape, dtype=np.int32), False, subgraph
            )
            self._shapes[name] = shape
        if not self._allocated:
            wrapper.AllocateTensors(subgraph)
            self._allocated = True
        for name, value in values.items():
            wrapper.SetTensor(self._inputs[name], value, subgraph)
        wrapper.Invoke(subgraph)
        return {name: wrapper.GetTensor(index, subgraph) for name, index in self._outputs}


class LiteRTModel:
    """A trainable LiteRT model: inference, SGD steps and named weights.

    Not thread-safe: see the module docstring.
    """

    card: ModelCard

    def __init__(
        self, tflite: bytes, card: ModelCard, *, num_threads: int = 1, delegate: str = "xnnpack"
    ) -> None:
        """Create the interpreter and signature runners; check them against ``card``.

        ``delegate`` is ``"xnnpack"`` (LiteRT's default CPU delegate) or ``"none"``
        (the built-in reference kernels only; see ``edge.config.LITERT_DELEGATES``).
        Raises :class:`ModelContractError` when a signature, tensor name or shape that
        the card promises is missing from the model, ``ValueError`` for another delegate.
        """
        options: dict[str, Any] = {}
        if delegate == "none":
            options["experimental_op_resolver_type"] = (
                OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            )
        elif delegate != "xnnpack":
            raise ValueError(f"unknown LiteRT delegate {delegate!r}; use 'xnnpack' or 'none'")
        self.card = card
        self._tflite = bytes(tflite)
        self._num_threads = num_threads
        self._delegate = delegate
        try:
            self._interpreter = Interpreter(
                model_content=self._tflite, num_threads=num_threads, **options
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelContractError(f"LiteRT cannot load the model: {exc}") from exc
        signatures = self._interpreter.get_signature_list()
        self._check_contract(signatures)
        self._infer = self._interpreter.get_signature_runner("infer")
        self._train = self._interpreter.get_signature_runner("train")
        self._parameters = self._interpreter.get_signature_runner("parameters")
        self._restore = self._interpreter.get_signature_runner("restore")
        self._check_shapes()
        self._infer_call = _InferCall(self._infer, card.input.name, card.output.name)
        self._train_call = _SignatureCall(self._train)
        self._parameters_call = _SignatureCall(self._parameters)
        self._restore_call = _SignatureCall(self._restore)
        logger.debug(
            "loaded %s (%d bytes, %d threads, delegate %s)",
            card.architecture_id,
            len(self._tflite),
            num_threads,
            delegate,
        )

    # -- construction helpers -----------------------------------------------------------
    @classmethod
    def load(
        cls, directory: str | Path, *, num_threads: int = 1, delegate: str = "xnnpack"
    ) -> LiteRTModel:
        """Load ``model.tflite`` + ``card.json`` from a build directory."""
        directory = Path(directory)
        card = ModelCard.load(directory / CARD_FILE)
        return cls(
            (directory / MODEL_FILE).read_bytes(), card, num_threads=num_threads, delegate=delegate
        )

    def clone(self) -> LiteRTModel:
        """A new, independent interpreter of the same model holding the current weights."""
        other = LiteRTModel(
            self._tflite, self.card, num_threads=self._num_threads, delegate=self._delegate
        )
        other.set_weights(self.get_weights())
        return other

    @property
    def tflite(self) -> bytes:
        """The flatbuffer this model was created from (initial weights, not current ones)."""
        return self._tflite

    @property
    def num_threads(self) -> int:
        """CPU threads the interpreter may use."""
        return self._num_threads

    @property
    def delegate(self) -> str:
        """``"xnnpack"`` or ``"none"``: what runs the operators."""
        return self._delegate

    @property
    def infer_path(self) -> str:
        """``"direct"`` when inference drives the interpreter wrapper itself, else
        ``"signature-runner"`` (a runtime whose internals differ; see :class:`_InferCall`)."""
        return "direct" if self._infer_call.direct else "signature-runner"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return self.card.input_shape

    @property
    def train_batch(self) -> int:
        """The fixed batch size of the ``train`` signature."""
        return self.card.train_batch

    def _check_contract(self, signatures: Mapping[str, Any]) -> None:
        problems: list[str] = []
        for key in ("infer", "train", "parameters", "restore"):
            if key not in signatures:
                problems.append(f"signature {key!r} missing")
        names = set(self.card.weight_names)
        if "infer" in signatures:
            sig = signatures["infer"]
            if list(sig["inputs"]) != [self.card.input.name]:
                problems.append(f"infer inputs {sig['inputs']} != [{self.card.input.name!r}]")
            if self.card.output.name not in sig["outputs"]:
                problems.append(f"infer has no output {self.card.output.name!r}")
        if "train" in signatures:
            sig = signatures["train"]
            if set(sig["inputs"]) != _TRAIN_INPUTS:
                problems.append(f"train inputs {sorted(sig['inputs'])} != {sorted(_TRAIN_INPUTS)}")
            if not set(sig["outputs"]) >= _TRAIN_OUTPUTS:
                problems.append(f"train outputs {sorted(sig['outputs'])} lack loss/correct")
        if "parameters" in signatures and set(signatures["parameters"]["outputs"]) != names:
            problems.append("parameters outputs do not match the card's weight names")
        if "restore" in signatures and set(signatures["restore"]["inputs"]) != names:
            problems.append("restore inputs do not match the card's weight names")
        if problems:
            raise ModelContractError("model does not match its card: " + "; ".join(problems))

    def _check_shapes(self) -> None:
        problems: list[str] = []
        x_infer = self._infer.get_input_details()[self.card.input.name]
        if tuple(int(d) for d in x_infer["shape_signature"]) != tuple(self.card.input.shape):
            problems.append(
                f"infer input shape {list(x_infer['shape_signature'])} != card {list(self.card.input.shape)}"
            )
        train_in = self._train.get_input_details()
        expected_x = (self.card.train_batch, *self.card.input_shape)
        if tuple(int(d) for d in train_in["x"]["shape_signature"]) != expected_x:
            problems.append(
                f"train x shape {list(train_in['x']['shape_signature'])} != {list(expected_x)}"
            )
        if train_in["y"]["dtype"] != np.dtype(self.card.label_dtype):
            problems.append(f"train y dtype {train_in['y']['dtype']} != {self.card.label_dtype}")
        restore_in = self._restore.get_input_details()
        for spec in self.card.weight_specs:
            detail = restore_in.get(spec.name)
            if detail is None:
                continue
            if tuple(int(d) for d in detail["shape_signature"]) != spec.shape:
                problems.append(
                    f"weight {spec.name} shape {list(detail['shape_signature'])} != card {list(spec.shape)}"
                )
        if problems:
            raise ModelContractError("model does not match its card: " + "; ".join(problems))

    # -- inference ----------------------------------------------------------------------
    def _as_examples(self, x: np.ndarray, what: str) -> np.ndarray:
        arr = np.asarray(x)
        if arr.ndim != len(self.input_shape) + 1 or tuple(arr.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{what}: expected shape [batch, {', '.join(map(str, self.input_shape))}], "
                f"got {list(arr.shape)}"
            )
        if arr.shape[0] < 1:
            raise ValueError(f"{what}: batch must hold at least one example")
        return np.ascontiguousarray(arr, dtype=np.float32)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities ``[batch, classes]`` for a float batch of any size >= 1."""
        return self._infer_call(self._as_examples(x, "infer"))

    def infer_checked(self, xs: np.ndarray) -> np.ndarray:
        """:meth:`infer` for a batch the caller has already checked: C-contiguous
        float32 of shape ``[batch >= 1, *input_shape]`` (anything else may fail inside
        the runtime with a less helpful message). Saves the checks on the serving path."""
        return self._infer_call(xs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Most likely class per example (int32)."""
        return self.infer(x).argmax(axis=-1).astype(np.int32)

    # -- training -----------------------------------------------------------------------
    def _as_labels(self, y: np.ndarray, n: int) -> np.ndarray:
        arr = np.asarray(y)
        if arr.shape != (n,):
            raise ValueError(f"labels: expected shape [{n}], got {list(arr.shape)}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {arr.dtype}")
        if n and (arr.min() < 0 or arr.max() >= self.card.classes):
            raise ValueError(
                f"labels must lie in [0, {self.card.classes}), got {arr.min()}..{arr.max()}"
            )
        return np.ascontiguousarray(arr, dtype=np.int32)

    def train_step(
        self, x: np.ndarray, y: np.ndarray, lr: float, mu: float = 0.0
    ) -> tuple[float, int]:
        """One SGD step on exactly ``train_batch`` examples; returns (mean loss, #correct).

        ``mu > 0`` adds the FedProx term ``mu * (w - anchor)`` to every gradient, where
        the anchor is the last weights given to :meth:`set_weights`.
        """
        xs = self._as_examples(x, "train_step")
        if xs.shape[0] != self.card.train_batch:
            raise ValueError(
                f"train_step needs exactly {self.card.train_batch} examples, got {xs.shape[0]}"
            )
        ys = self._as_labels(y, xs.shape[0])
        out = self._train_call(
            x=xs,
            y=ys,
            lr=np.asarray(lr, dtype=np.float32),
            mu=np.asarray(mu, dtype=np.float32),
        )
        return float(out["loss"]), round(float(out["correct"]))

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        lr: float,
        mu: float = 0.0,
        seed: int = 0,
        cancelled: Callable[[], bool] | None = None,
    ) -> dict[str, float]:
        """Train ``epochs`` passes over ``(x, y)`` in shuffled mini-batches of ``train_batch``.

        ``cancelled()`` is asked before every step; when it returns true training stops
        with :class:`~edge.errors.TrainingCancelled` (the weights of this interpreter are
        then half-trained: callers restore weights before the next use).

        Remainder policy: **wrap**. Each epoch is a fresh seeded permutation; the last,
        partial batch is filled up with examples from the start of that permutation, so
        every example is seen at least once per epoch and a device with fewer examples
        than ``train_batch`` still trains (steps per epoch = ceil(n / train_batch)).

        Returns ``loss`` and ``accuracy`` (means over the steps of the last epoch,
        including wrapped duplicates), ``steps`` (total), ``seconds`` (wall time) and
        ``examples`` (``len(x)``, the weight FedAvg should use).
        """
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        xs = self._as_examples(x, "fit")
        n = xs.shape[0]
        ys = self._as_labels(y, n)
        batch = self.card.train_batch
        steps_per_epoch = -(-n // batch)
        rng = np.random.default_rng(seed)
        started = time.perf_counter()
        steps = 0
        loss_sum = 0.0
        correct = 0
        seen = 0
        for _ in range(epochs):
            order = rng.permutation(n)
            if steps_per_epoch * batch > n:
                order = np.resize(order, steps_per_epoch * batch)  # wraps around the start
            loss_sum, correct, seen = 0.0, 0, 0
            for s in range(steps_per_epoch):
                if cancelled is not None and cancelled():
                    raise TrainingCancelled(f"training cancelled after {steps} steps")
                idx = order[s * batch : (s + 1) * batch]
                loss, ok = self.train_step(xs[idx], ys[idx], lr, mu)
                loss_sum += loss
                correct += ok
                seen += batch
                steps += 1
        seconds = time.perf_counter() - started
        metrics = {
            "loss": loss_sum / steps_per_epoch if epochs else float("nan"),
            "accuracy": correct / seen if seen else float("nan"),
            "steps": float(steps),
            "seconds": seconds,
            "examples": float(n),
        }
        logger.debug("fit: %s", metrics)
        return metrics

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch: int = 256) -> dict[str, float]:
        """Cross-entropy (probabilities clipped at 1e-7) and accuracy over ``(x, y)``."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        xs = self._as_examples(x, "evaluate")
        ys = self._as_labels(y, xs.shape[0])
        loss_sum = 0.0
        correct = 0
        for start in range(0, xs.shape[0], batch):
            probs = self.infer(xs[start : start + batch])
            labels = ys[start : start + batch]
            picked = probs[np.arange(labels.shape[0]), labels]
            loss_sum += float(-np.log(np.clip(picked, _PROB_FLOOR, 1.0)).sum())
            correct += int((probs.argmax(axis=-1) == labels).sum())
        n = xs.shape[0]
        return {"loss": loss_sum / n, "accuracy": correct / n, "examples": float(n)}

    # -- weights ------------------------------------------------------------------------
    def get_weights(self) -> dict[str, np.ndarray]:
        """Current weights by name (copies, in card order)."""
        out = self._parameters_call()
        return {
            name: np.array(out[name], dtype=np.float32, copy=True)
            for name in self.card.weight_names
        }

    def check_weights(self, weights: Mapping[str, np.ndarray]) -> list[str]:
        """Every way ``weights`` differs from the card (empty list when they match)."""
        problems: list[str] = []
        expected = {w.name: w for w in self.card.weight_specs}
        missing = [name for name in expected if name not in weights]
        unexpected = sorted(name for name in weights if name not in expected)
        if missing:
            problems.append(f"missing: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected: {', '.join(unexpected)}")
        for name, spec in expected.items():
            if name not in weights:
                continue
            value = weights[name]
            if not isinstance(value, np.ndarray):
                problems.append(f"{name}: not a numpy array ({type(value).__name__})")
                continue
            if tuple(value.shape) != spec.shape:
                problems.append(f"{name}: shape {list(value.shape)} != {list(spec.shape)}")
            if value.dtype != np.dtype(spec.dtype):
                problems.append(f"{name}: dtype {value.dtype} != {spec.dtype}")
        return problems

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace all weights (and the FedProx anchors).

        Everything is validated first; on any mismatch :class:`WeightMismatchError`
        names every problem and the model is left untouched.
        """
        problems = self.check_weights(weights)
        if problems:
            raise WeightMismatchError(problems)
        self._restore_call(
            **{name: np.ascontiguousarray(weights[name]) for name in self.card.weight_names}
        )
