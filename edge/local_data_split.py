"""The device's split of its local samples into a train part and a held-out part.

Flower training (``Trainer.Fit``) uses only the **train** part; the shadow check of a
staged rollout's candidate and ``Trainer.Evaluate`` use only the **held-out** part, so a
version is never judged on samples it was trained on.

**Rule** (``[data] holdout_fraction`` = f, ``[data] min_holdout`` = m). Every sample gets a
*split key* in [0, 1): the first 8 bytes, big-endian, of BLAKE2b (digest size 8, person
``edgefl-split-v1``) over its input as float32 little-endian bytes followed by its label as
int32 little-endian, divided by 2**64. The held-out part is the k samples with the lowest
keys (ties in arrival order), where k = max(number of samples whose key is below f, m);
the train part is the rest.

So the split depends on a sample's content only, not on its position in the store:
the same sample lands on the same side on every device, after evictions, restarts and
reloads, and duplicates of a sample never sit on both sides. A sample with a key below f
is held out for good. Only while fewer than m keys fall below f (a device with little
data) does the held-out part take the next-lowest keys to reach m, and a new sample with
a lower key can later move such a sample back to training.

**Too little data.** A device holding fewer than 2·m samples has no split: training
uses all of them (with a warning), and the shadow check and ``Evaluate`` refuse with
:class:`~edge.errors.NoHeldOutData` (``FAILED_PRECONDITION``), which the agent reports as a
``candidate_failed`` event naming the counts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from edge.config import DEFAULT_HOLDOUT_FRACTION, DEFAULT_MIN_HOLDOUT
from edge.errors import NoHeldOutData

_PERSON = b"edgefl-split-v1"


def split_keys(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The split key in [0, 1) of every sample of ``(x, y)`` (see the module docstring)."""
    xs = np.ascontiguousarray(x, dtype="<f4").reshape(len(y), -1)
    ys = np.ascontiguousarray(y, dtype="<i4")
    keys = np.empty(len(ys), dtype=np.float64)
    for i in range(len(ys)):
        h = hashlib.blake2b(xs[i].tobytes(), digest_size=8, person=_PERSON)
        h.update(ys[i : i + 1].tobytes())
        keys[i] = int.from_bytes(h.digest(), "big") / 2.0**64
    return keys


@dataclass(frozen=True)
class Split:
    """Index arrays (into the samples given) of the train and the held-out part."""

    train: np.ndarray
    heldout: np.ndarray

    @property
    def has_heldout(self) -> bool:
        return len(self.heldout) > 0


def split_samples(
    x: np.ndarray,
    y: np.ndarray,
    fraction: float = DEFAULT_HOLDOUT_FRACTION,
    min_holdout: int = DEFAULT_MIN_HOLDOUT,
) -> Split:
    """Split ``(x, y)`` by the module's rule; no held-out part below ``2 * min_holdout``."""
    n = len(y)
    every = np.arange(n)
    if n < 2 * min_holdout:
        return Split(train=every, heldout=every[:0])
    keys = split_keys(x, y)
    order = np.argsort(keys, kind="stable")
    k = max(int(np.count_nonzero(keys < fraction)), min_holdout)
    held = np.sort(order[:k])
    train = np.sort(order[k:])
    return Split(train=train, heldout=held)


def require_heldout(split: Split, n: int, min_holdout: int) -> np.ndarray:
    """The held-out indices, or :class:`NoHeldOutData` naming the counts."""
    if not split.has_heldout:
        raise NoHeldOutData(
            f"too little local data for a held-out split: {n} samples stored, at least "
            f"{2 * min_holdout} needed (2 x [data] min_holdout = {min_holdout})"
        )
    return split.heldout
