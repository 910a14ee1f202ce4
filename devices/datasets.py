"""The digits data set, split and partitioned across virtual devices.

scikit-learn's ``load_digits`` (1,797 8x8 grey-scale images, 10 classes) ships with the
library, so tests and fleet emulation work offline. Pixels (0..16) are scaled to
``[0, 1]`` float32; labels are int32. Examples are shaped for the model architecture:
``[n, 64]`` for the MLP and ``[n, 8, 8, 1]`` for the CNN.

Partitioning splits the *training* set into disjoint index sets, one per device, that
together cover it: IID (a seeded shuffle cut into near-equal parts) or non-IID with a
per-class Dirichlet(alpha) split (small alpha → each device sees few classes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

Layout = Literal["flat", "image"]
DIGITS_CLASSES = 10
DIGITS_IMAGE_SHAPE = (8, 8, 1)
DIGITS_FEATURES = 64


@dataclass(frozen=True)
class Split:
    """Examples and labels of one split: ``x`` float32 in [0, 1], ``y`` int32."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray) -> Split:
        """Return the examples at ``indices`` (copied)."""
        return Split(self.x[indices], self.y[indices])


@dataclass(frozen=True)
class Dataset:
    """A seeded train/test split of one data set."""

    train: Split
    test: Split
    classes: int


def _reshape(x: np.ndarray, layout: Layout) -> np.ndarray:
    if layout == "flat":
        return x.reshape(-1, DIGITS_FEATURES)
    if layout == "image":
        return x.reshape(-1, *DIGITS_IMAGE_SHAPE)
    raise ValueError(f"layout must be 'flat' or 'image', got {layout!r}")


def load_digits(*, layout: Layout = "flat", test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Load digits, scale to [0, 1] float32 and make a seeded, stratified train/test split.

    ``layout="flat"`` gives ``[n, 64]`` (MLP), ``layout="image"`` ``[n, 8, 8, 1]`` (CNN).
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = _sk_load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Dataset(
        train=Split(np.ascontiguousarray(_reshape(x_train, layout)), y_train.astype(np.int32)),
        test=Split(np.ascontiguousarray(_reshape(x_test, layout)), y_test.astype(np.int32)),
        classes=DIGITS_CLASSES,
    )


def partition_iid(n_examples: int, n_parts: int, *, seed: int = 0) -> list[np.ndarray]:
    """Shuffle ``range(n_examples)`` with ``seed`` and cut it into ``n_parts`` near-equal parts.

    Part sizes differ by at most one; each part's indices are sorted.
    """
    _check_parts(n_examples, n_parts)
    order = np.random.default_rng(seed).permutation(n_examples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, n_parts)]


def partition_dirichlet(
    labels: np.ndarray,
    n_parts: int,
    *,
    alpha: float,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Non-IID split: for every class, draw device shares from Dirichlet(alpha).

    Small ``alpha`` (e.g. 0.1) makes each device hold mostly a few classes; large
    ``alpha`` approaches IID. Draws are repeated (seeded) until every part has at least
    ``min_size`` examples; after ``max_tries`` a ``ValueError`` is raised. Parts are
    disjoint, cover all indices and are sorted.
    """
    labels = np.asarray(labels)
    _check_parts(len(labels), n_parts)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size * n_parts > len(labels):
        raise ValueError(
            f"cannot give {n_parts} parts at least {min_size} of {len(labels)} examples"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for attempt in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(n_parts, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.append(chunk)
        result = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in result) >= min_size:
            logger.debug("dirichlet partition found after %d tries", attempt + 1)
            return result
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split gives every one of {n_parts} parts "
        f"{min_size}+ examples in {max_tries} tries"
    )


def _check_parts(n_examples: int, n_parts: int) -> None:
    if n_parts < 1:
        raise ValueError(f"n_parts must be >= 1, got {n_parts}")
    if n_parts > n_examples:
        raise ValueError(f"cannot split {n_examples} examples into {n_parts} parts")


def device_partitions(
    dataset: Dataset,
    n_devices: int,
    *,
    scheme: Literal["iid", "dirichlet"] = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[Split]:
    """Partition ``dataset.train`` into one :class:`Split` per device."""
    if scheme == "iid":
        parts = partition_iid(len(dataset.train), n_devices, seed=seed)
    elif scheme == "dirichlet":
        parts = partition_dirichlet(dataset.train.y, n_devices, alpha=alpha, seed=seed)
    else:
        raise ValueError(f"scheme must be 'iid' or 'dirichlet', got {scheme!r}")
    return [dataset.train.subset(p) for p in parts]


def label_histogram(y: np.ndarray, classes: int = DIGITS_CLASSES) -> np.ndarray:
    """Count of each label in ``y`` (length ``classes``)."""
    return np.bincount(np.asarray(y, dtype=np.int64), minlength=classes)
