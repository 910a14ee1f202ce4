"""Inference and training with a device bundle's own model, as a device's Python runs them.

Run by ``tests/e2e/test_arm64.py`` twice with the same arguments: on the host (x86-64,
the reference) and inside an arm64 Debian root filesystem under qemu-user-static, with
the edgefl installed there from the bundle's aarch64 wheelhouse. It imports only what a
device has (``edge``, ``protos``, numpy, LiteRT), never the tests.

    python arm64_check.py PACKAGE DATA.npz OUT.npz

PACKAGE is the bundle's ``model/initial.pkg``; DATA.npz holds ``x_train``, ``y_train``,
``x_test``, ``y_test`` and ``x_probe``. OUT.npz gets the probe's class probabilities
and the weights after training; a JSON summary goes to stdout.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np

from edge.litert_model import LiteRTModel
from edge.model_card import ModelCard
from edge.model_check import check_isolated
from protos import codec

EPOCHS = 2
LEARNING_RATE = 0.05


def main(package_path: str, data_path: str, out_path: str) -> None:
    package = codec.package_from_bytes(Path(package_path).read_bytes())
    check_isolated(package.tflite, package.card_json)  # what a device does before serving it
    model = LiteRTModel(package.tflite, ModelCard.from_json(package.card_json), num_threads=2)
    model.set_weights(package.weights)
    data = np.load(data_path)
    probe = model.infer(data["x_probe"])
    before = model.evaluate(data["x_test"], data["y_test"])
    batch = model.train_batch
    step_loss, _ = model.train_step(data["x_train"][:batch], data["y_train"][:batch], LEARNING_RATE)
    fit = model.fit(data["x_train"], data["y_train"], epochs=EPOCHS, lr=LEARNING_RATE, seed=0)
    after = model.evaluate(data["x_test"], data["y_test"])
    weights = model.get_weights()
    np.savez(out_path, probe=probe, **{f"w:{k}": v for k, v in weights.items()})
    summary = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "delegate": model.delegate,
        "step_loss": step_loss,
        "fit": fit,
        "before": before,
        "after": after,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main(*sys.argv[1:4])
