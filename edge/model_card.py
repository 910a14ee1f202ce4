"""The model card: what a device must know about a ``.tflite`` model to use it.

A card travels next to every model file (``card.json``). It names the input and output
tensors of the ``infer`` signature, the label dtype and fixed batch of ``train``, the
optimizer defaults and, above all, the named weights that ``parameters()`` returns and
``restore(**weights)`` accepts: this list is the wire format of federated rounds.

Example (``format`` ``edgefl.model-card/1``)::

    {"format": "edgefl.model-card/1", "architecture_id": "mlp-64-10-3f9a1c2b",
     "arch": "mlp", "input": {"name": "x", "dtype": "float32", "shape": [-1, 64]},
     "output": {"name": "probs", "dtype": "float32", "shape": [-1, 10]},
     "classes": 10, "label_dtype": "int32", "train_batch": 32,
     "optimizer": {"name": "sgd", "learning_rate": 0.1, "proximal": true},
     "weights": [{"name": "dense0_kernel", "dtype": "float32", "shape": [64, 64]}, ...],
     "signatures": ["infer", "parameters", "restore", "train"]}

Parsing validates everything and raises :class:`ModelCardError` naming every problem at
once. Unknown keys are errors; free-form extras belong in the optional ``metadata``
object. This module uses the standard library only.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import EdgeError

logger = logging.getLogger(__name__)

CARD_FORMAT = "edgefl.model-card/1"
"""The only card format this module reads and writes."""

KNOWN_ARCHS = ("mlp", "cnn")
REQUIRED_SIGNATURES = ("infer", "parameters", "restore", "train")
SUPPORTED_DTYPES = ("float32",)
SUPPORTED_LABEL_DTYPES = ("int32",)

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOP_KEYS = frozenset(
    {
        "format",
        "architecture_id",
        "arch",
        "input",
        "output",
        "classes",
        "label_dtype",
        "train_batch",
        "optimizer",
        "weights",
        "signatures",
        "metadata",
    }
)


class ModelCardError(EdgeError, ValueError):
    """A card is malformed; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid model card: " + "; ".join(self.problems))


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a signature tensor; ``-1`` marks the dynamic batch."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class WeightSpec:
    """One named weight as returned by ``parameters()``."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class OptimizerSpec:
    """Optimizer defaults baked into the ``train`` signature (SGD, optional FedProx)."""

    name: str = "sgd"
    learning_rate: float = 0.1
    proximal: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form."""
        return {"name": self.name, "learning_rate": self.learning_rate, "proximal": self.proximal}


@dataclass(frozen=True)
class ModelCard:
    """Validated description of a model file; build with :meth:`from_json`/:meth:`from_dict`.

    Constructing a card directly also validates it (in ``__post_init__``).
    """

    architecture_id: str
    arch: str
    input: TensorSpec
    output: TensorSpec
    classes: int
    train_batch: int
    weights: tuple[WeightSpec, ...]
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    label_dtype: str = "int32"
    signatures: tuple[str, ...] = REQUIRED_SIGNATURES
    metadata: dict[str, Any] = field(default_factory=dict)
    format: str = CARD_FORMAT

    def __post_init__(self) -> None:
        problems = _check_card(self)
        if problems:
            raise ModelCardError(problems)

    # -- convenience ------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (the input shape without the batch dimension)."""
        return self.input.shape[1:]

    @property
    def weight_specs(self) -> tuple[WeightSpec, ...]:
        """The named weights, in the order of the card."""
        return self.weights

    @property
    def weight_names(self) -> tuple[str, ...]:
        """Names of the weights, in the order of the card."""
        return tuple(w.name for w in self.weights)

    @property
    def num_parameters(self) -> int:
        """Total number of trainable scalars."""
        return sum(w.size for w in self.weights)

    # -- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-compatible dict form."""
        out: dict[str, Any] = {
            "format": self.format,
            "architecture_id": self.architecture_id,
            "arch": self.arch,
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "classes": self.classes,
            "label_dtype": self.label_dtype,
            "train_batch": self.train_batch,
            "optimizer": self.optimizer.to_dict(),
            "weights": [w.to_dict() for w in self.weights],
            "signatures": sorted(self.signatures),
        }
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        return out

    def to_json(self, *, indent: int | None = 2) -> str:
        """Serialise to JSON text (stable key order)."""
        return json.dumps(self.to_dict(), indent=indent) + ("\n" if indent is not None else "")

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelCard:
        """Parse and validate JSON text; raises :class:`ModelCardError`."""
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelCardError([f"not valid JSON: {exc}"]) from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        """Validate a decoded JSON object and build the card; raises :class:`ModelCardError`."""
        problems: list[str] = []
        if not isinstance(data, dict):
            raise ModelCardError([f"card must be a JSON object, got {type(data).__name__}"])
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            problems.append(f"unknown keys: {', '.join(unknown)}")
        for key in sorted(_TOP_KEYS - {"metadata", "optimizer", "label_dtype", "signatures"}):
            if key not in data:
                problems.append(f"missing key: {key}")
        input_spec = _tensor_spec(data.get("input"), "input", problems)
        output_spec = _tensor_spec(data.get("output"), "output", problems)
        weights = _weight_specs(data.get("weights"), problems)
        optimizer = _optimizer(data.get("optimizer", {}), problems)
        signatures = data.get("signatures", list(REQUIRED_SIGNATURES))
        if not isinstance(signatures, list) or not all(isinstance(s, str) for s in signatures):
            problems.append("signatures must be a list of strings")
            signatures = list(REQUIRED_SIGNATURES)
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            problems.append("metadata must be an object")
            metadata = {}
        for key, kind in (
            ("format", str),
            ("architecture_id", str),
            ("arch", str),
            ("label_dtype", str),
        ):
            if key in data and not isinstance(data[key], kind):
                problems.append(f"{key} must be a string")
        for key in ("classes", "train_batch"):
            if key in data and not _is_int(data[key]):
                problems.append(f"{key} must be an integer")
        if problems:
            # Structural problems (wrong types, missing keys) are reported together; the
            # semantic checks of __post_init__ run once the structure is sound.
            raise ModelCardError(problems)
        assert input_spec is not None and output_spec is not None and weights is not None
        return cls(
            architecture_id=data["architecture_id"],
            arch=data["arch"],
            input=input_spec,
            output=output_spec,
            classes=data["classes"],
            train_batch=data["train_batch"],
            weights=weights,
            optimizer=optimizer,
            label_dtype=data.get("label_dtype", "int32"),
            signatures=tuple(signatures),
            metadata=metadata,
            format=data["format"],
        )

    def save(self, path: str | Path) -> None:
        """Write the card as JSON to ``path``."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """Read and validate the card stored at ``path``."""
        return cls.from_json(Path(path).read_bytes())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape(value: Any, where: str, problems: list[str]) -> tuple[int, ...] | None:
    if not isinstance(value, list) or not all(_is_int(d) for d in value):
        problems.append(f"{where}.shape must be a list of integers")
        return None
    return tuple(value)


def _tensor_spec(value: Any, where: str, problems: list[str]) -> TensorSpec | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.append(f"{where} must be an object")
        return None
    extra = sorted(set(value) - {"name", "dtype", "shape"})
    if extra:
        problems.append(f"{where}: unknown keys: {', '.join(extra)}")
    name, dtype = value.get("name"), value.get("dtype")
    ok = True
    if not isinstance(name, str):
        problems.append(f"{where}.name must be a string")
        ok = False
    if not isinstance(dtype, str):
        problems.append(f"{where}.dtype must be a string")
        ok = False
    shape = _shape(value.get("shape"), where, problems)
    if not ok or shape is None:
        return None
    assert isinstance(name, str) and isinstance(dtype, str)
    return TensorSpec(name, dtype, shape)


def _weight_specs(value: Any, problems: list[str]) -> tuple[WeightSpec, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        problems.append("weights must be a list")
        return None
    specs: list[WeightSpec] = []
    for i, item in enumerate(value):
        where = f"weights[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where} must be an object")
            continue
        extra = sorted(set(item) - {"name", "dtype", "shape"})
        if extra:
            problems.append(f"{where}: unknown keys: {', '.join(extra)}")
        name, dtype = item.get("name"), item.get("dtype")
        shape = _shape(item.get("shape"), where, problems)
        if not isinstance(name, str) or not isinstance(dtype, str):
            problems.append(f"{where}: name and dtype must be strings")
            continue
        if shape is not None:
            specs.append(WeightSpec(name, dtype, shape))
    return tuple(specs)


def _optimizer(value: Any, problems: list[str]) -> OptimizerSpec:
    if not isinstance(value, dict):
        problems.append("optimizer must be an object")
        return OptimizerSpec()
    extra = sorted(set(value) - {"name", "learning_rate", "proximal"})
    if extra:
        problems.append(f"optimizer: unknown keys: {', '.join(extra)}")
    name = value.get("name", "sgd")
    lr = value.get("learning_rate", 0.1)
    proximal = value.get("proximal", True)
    if not isinstance(name, str):
        problems.append("optimizer.name must be a string")
        name = "sgd"
    if isinstance(lr, bool) or not isinstance(lr, int | float):
        problems.append("optimizer.learning_rate must be a number")
        lr = 0.1
    if not isinstance(proximal, bool):
        problems.append("optimizer.proximal must be a boolean")
        proximal = True
    return OptimizerSpec(name, float(lr), proximal)


def _check_card(card: ModelCard) -> list[str]:
    """Return every semantic problem of an assembled card (empty when valid)."""
    problems: list[str] = []
    if card.format != CARD_FORMAT:
        problems.append(f"format must be {CARD_FORMAT!r}, got {card.format!r}")
    if not card.architecture_id:
        problems.append("architecture_id must not be empty")
    if card.arch not in KNOWN_ARCHS:
        problems.append(f"arch must be one of {', '.join(KNOWN_ARCHS)}, got {card.arch!r}")
    if not _is_int(card.classes) or card.classes < 2:
        problems.append(f"classes must be an integer >= 2, got {card.classes!r}")
    if not _is_int(card.train_batch) or card.train_batch < 1:
        problems.append(f"train_batch must be an integer >= 1, got {card.train_batch!r}")
    if card.label_dtype not in SUPPORTED_LABEL_DTYPES:
        problems.append(
            f"label_dtype must be one of {SUPPORTED_LABEL_DTYPES}, got {card.label_dtype!r}"
        )
    for where, spec in (("input", card.input), ("output", card.output)):
        if not spec.name:
            problems.append(f"{where}.name must not be empty")
        if spec.dtype not in SUPPORTED_DTYPES:
            problems.append(f"{where}.dtype must be one of {SUPPORTED_DTYPES}, got {spec.dtype!r}")
        if len(spec.shape) < 2 or spec.shape[0] != -1:
            problems.append(
                f"{where}.shape must be [-1, ...] (dynamic batch first), got {list(spec.shape)}"
            )
        elif any(d < 1 for d in spec.shape[1:]):
            problems.append(f"{where}.shape has a non-positive dimension: {list(spec.shape)}")
    if _is_int(card.classes) and tuple(card.output.shape) != (-1, card.classes):
        problems.append(f"output.shape must be [-1, {card.classes}], got {list(card.output.shape)}")
    if card.optimizer.name != "sgd":
        problems.append(f"optimizer.name must be 'sgd', got {card.optimizer.name!r}")
    if not (card.optimizer.learning_rate > 0 and math.isfinite(card.optimizer.learning_rate)):
        problems.append(
            f"optimizer.learning_rate must be > 0, got {card.optimizer.learning_rate!r}"
        )
    if not card.weights:
        problems.append("weights must not be empty")
    seen: set[str] = set()
    for i, w in enumerate(card.weights):
        if not _NAME_RE.match(w.name):
            problems.append(f"weights[{i}].name {w.name!r} is not a simple identifier")
        if w.name in seen:
            problems.append(f"weights[{i}].name {w.name!r} is duplicated")
        seen.add(w.name)
        if w.dtype not in SUPPORTED_DTYPES:
            problems.append(f"weights[{i}] ({w.name}) dtype must be float32, got {w.dtype!r}")
        if any(d < 1 for d in w.shape):
            problems.append(
                f"weights[{i}] ({w.name}) has a non-positive dimension: {list(w.shape)}"
            )
    missing = [s for s in REQUIRED_SIGNATURES if s not in card.signatures]
    if missing:
        problems.append(f"signatures missing: {', '.join(missing)}")
    return problems
