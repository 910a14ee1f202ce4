"""Build a model: TensorFlow module → LiteRT flatbuffer + model card.

Run as ``python -m cloud.authoring.build --arch mlp --input-shape 64 --classes 10
--out DIR``; it writes ``DIR/model.tflite`` and ``DIR/card.json`` and refuses to write
a model that uses Flex or custom ops. The conversion goes through a temporary
SavedModel so that all four signatures (infer, train, parameters, restore) are kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cloud.authoring.opcheck import OpCheckReport, check_bytes
from cloud.errors import CloudError
from edge.model_card import ModelCard, OptimizerSpec, TensorSpec, WeightSpec

logger = logging.getLogger(__name__)

MODEL_FILE = "model.tflite"
CARD_FILE = "card.json"

DEFAULT_LEARNING_RATES = {"mlp": 0.3, "cnn": 0.2}
"""SGD learning rates that train sklearn digits (scaled to [0, 1]) well with batch 32."""


class BuildError(CloudError, RuntimeError):
    """The model could not be converted to a builtin-ops-only LiteRT model."""


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build_model` produced."""

    tflite: bytes
    card: ModelCard
    opcheck: OpCheckReport
    model_path: Path | None = None
    card_path: Path | None = None


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``"64"``, ``"8,8,1"`` or ``"8x8x1"`` into a tuple of positive ints."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError as exc:
        raise ValueError(f"invalid input shape {text!r}: use e.g. 64 or 8,8,1") from exc
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"invalid input shape {text!r}: dimensions must be positive")
    return shape


def architecture_id(
    arch: str,
    input_shape: Sequence[int],
    classes: int,
    train_batch: int,
    weights: Sequence[WeightSpec],
) -> str:
    """Stable id of an architecture: two models share it iff their weights are interchangeable.

    It hashes the architecture parameters and the weight layout, not the weight values,
    so models built with different seeds (or trained) keep the same id.
    """
    layout = {
        "arch": arch,
        "input_shape": list(input_shape),
        "classes": classes,
        "train_batch": train_batch,
        "weights": [w.to_dict() for w in weights],
    }
    digest = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:8]
    shape = "x".join(str(d) for d in input_shape)
    return f"{arch}-{shape}-{classes}-{digest}"


def convert(model: object) -> bytes:
    """Convert a :class:`cloud.authoring.models.TrainableModel` to TFLite (builtins only)."""
    import tensorflow as tf

    from cloud.authoring.models import TrainableModel

    assert isinstance(model, TrainableModel)
    with tempfile.TemporaryDirectory(prefix="edgefl-savedmodel-") as tmp:
        signatures = model.signatures()
        tf.saved_model.save(model, tmp, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=sorted(signatures))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        try:
            data: bytes = converter.convert()
        except Exception as exc:  # the converter raises several private error types
            raise BuildError(f"TFLite conversion failed: {exc}") from exc
    return data


def build_model(
    arch: str,
    input_shape: Sequence[int],
    classes: int,
    *,
    train_batch: int = 32,
    learning_rate: float | None = None,
    seed: int = 0,
    out: str | Path | None = None,
) -> BuildResult:
    """Build, convert and check a model; write ``model.tflite`` + ``card.json`` to ``out``.

    ``learning_rate`` defaults to :data:`DEFAULT_LEARNING_RATES` for the architecture;
    it is only recorded in the card (the ``train`` signature takes ``lr`` as input).
    Raises :class:`BuildError` if the converted model uses Flex or custom ops.
    """
    from cloud.authoring.models import make_model

    shape = tuple(int(d) for d in input_shape)
    if arch == "cnn" and len(shape) == 1:
        raise ValueError("cnn needs an input shape H,W,C such as 8,8,1")
    lr = DEFAULT_LEARNING_RATES.get(arch, 0.1) if learning_rate is None else float(learning_rate)
    model = make_model(arch, shape, classes, train_batch=train_batch, seed=seed)
    data = convert(model)
    report = check_bytes(data)
    if not report.ok:
        raise BuildError(f"converted model is not portable to LiteRT: {report.summary()}")
    missing = {"infer", "train", "parameters", "restore"} - set(report.signatures)
    if missing:
        raise BuildError(f"converted model lacks signatures: {', '.join(sorted(missing))}")
    weights = tuple(model.specs)
    card = ModelCard(
        architecture_id=architecture_id(arch, shape, classes, train_batch, weights),
        arch=arch,
        input=TensorSpec("x", "float32", (-1, *shape)),
        output=TensorSpec("probs", "float32", (-1, classes)),
        classes=classes,
        train_batch=train_batch,
        weights=weights,
        optimizer=OptimizerSpec("sgd", lr, True),
        signatures=tuple(sorted(report.signatures)),
        metadata={"seed": seed},
    )
    model_path = card_path = None
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        model_path, card_path = out_dir / MODEL_FILE, out_dir / CARD_FILE
        _atomic_write(model_path, data)
        _atomic_write(card_path, card.to_json().encode())
        logger.info("wrote %s (%d bytes) and %s", model_path, len(data), card_path)
    return BuildResult(data, card, report, model_path, card_path)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``build`` options (shared by ``python -m`` and ``edgefl model build``)."""
    parser.add_argument("--arch", choices=("mlp", "cnn"), required=True)
    parser.add_argument(
        "--input-shape", required=True, help="example shape without batch: 64 or 8,8,1"
    )
    parser.add_argument("--classes", type=int, required=True)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="SGD learning rate recorded in the card (default: per architecture)",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument("--out", required=True, help="output directory")


def run_build(args: argparse.Namespace) -> int:
    """Run a build from parsed arguments and print what was written; returns an exit code."""
    try:
        shape = parse_input_shape(args.input_shape)
        result = build_model(
            args.arch,
            shape,
            args.classes,
            train_batch=args.train_batch,
            learning_rate=args.learning_rate,
            seed=args.seed,
            out=args.out,
        )
    except (ValueError, BuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.model_path} ({len(result.tflite)} bytes)")
    print(f"wrote {result.card_path}")
    print(f"architecture id: {result.card.architecture_id}")
    print(f"parameters: {result.card.num_parameters}")
    print(f"op check: {result.opcheck.summary()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cloud.authoring.build``."""
    parser = argparse.ArgumentParser(
        prog="python -m cloud.authoring.build", description=__doc__.splitlines()[0]
    )
    add_build_arguments(parser)
    args = parser.parse_args(argv)
    from edge.logging_config import configure_logging

    configure_logging()
    return run_build(args)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
