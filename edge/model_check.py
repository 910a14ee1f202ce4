"""Open an untrusted LiteRT model in a throw-away process before serving it.

The LiteRT runtime parses a ``.tflite`` flatbuffer natively; a malformed one can
crash the process that loads it (a segmentation fault seen with fuzzed packages) —
and a crash of the device's service is exactly what a bad release must never cause.
So a model whose bytes this process has not loaded before is first loaded, run once
and trained one step in a child process; only if that child exits cleanly does the
service build its own interpreters from it.

Each distinct flatbuffer is checked once per process (releases of one architecture
share the flatbuffer and differ only in weights, which are checked by name, shape and
dtype before they reach the runtime).

``python -m edge.model_check MODEL.tflite CARD.json`` is the child's entry point.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from edge.errors import EdgeError

logger = logging.getLogger(__name__)

#: Seconds the child may take to load and run the model.
CHECK_TIMEOUT_S = 60.0

_checked: set[str] = set()
_lock = threading.Lock()


class UnsafeModelError(EdgeError, RuntimeError):
    """The model crashed, hung or failed in the sandbox process."""


def check_isolated(tflite: bytes, card_json: str, *, workdir: Path | None = None) -> None:
    """Raise :class:`UnsafeModelError` unless a child process can load and run the model."""
    digest = hashlib.sha256(tflite).hexdigest()
    with _lock:
        if digest in _checked:
            return
    with tempfile.TemporaryDirectory(prefix="edgefl-check-", dir=workdir) as tmp:
        model = Path(tmp) / "model.tflite"
        card = Path(tmp) / "card.json"
        model.write_bytes(tflite)
        card.write_text(card_json)
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "edge.model_check", str(model), str(card)],
                capture_output=True,
                text=True,
                timeout=CHECK_TIMEOUT_S,
                env={**os.environ, "PYTHONFAULTHANDLER": "0"},
            )
        except subprocess.TimeoutExpired as exc:
            raise UnsafeModelError(
                f"loading the model hung for more than {CHECK_TIMEOUT_S:.0f}s"
            ) from exc
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise UnsafeModelError(
            f"the model crashed the LiteRT runtime ({name}) in a sandbox process"
        )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UnsafeModelError(f"the model cannot be used: {last[:300]}")
    with _lock:
        _checked.add(digest)


def _child(model_path: str, card_path: str) -> int:
    import numpy as np

    from edge.litert_model import LiteRTModel
    from edge.model_card import ModelCard

    card = ModelCard.from_json(Path(card_path).read_text())
    model = LiteRTModel(Path(model_path).read_bytes(), card)
    model.infer(np.zeros((1, *card.input_shape), dtype=np.float32))
    x = np.zeros((card.train_batch, *card.input_shape), dtype=np.float32)
    y = np.zeros((card.train_batch,), dtype=np.int32)
    model.train_step(x, y, lr=0.0)
    model.get_weights()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_child(sys.argv[1], sys.argv[2]))
    except Exception as exc:  # reported to the parent as the last stderr line
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
