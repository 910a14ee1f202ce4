"""Digits loading and device partitioning."""

from __future__ import annotations

import numpy as np
import pytest

from devices.datasets import (
    Dataset,
    device_partitions,
    label_histogram,
    load_digits,
    partition_dirichlet,
    partition_iid,
)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits(layout="flat", seed=0)


def test_shapes_dtypes_and_range(digits: Dataset) -> None:
    assert digits.train.x.shape == (len(digits.train), 64)
    assert len(digits.train) + len(digits.test) == 1797
    assert len(digits.test) == 360
    assert digits.train.x.dtype == np.float32 and digits.train.y.dtype == np.int32
    assert digits.train.x.min() >= 0.0 and digits.train.x.max() <= 1.0
    assert digits.train.x.max() == 1.0
    assert set(np.unique(digits.test.y)) == set(range(10))


def test_image_layout_matches_flat(digits: Dataset) -> None:
    images = load_digits(layout="image", seed=0)
    assert images.train.x.shape == (len(digits.train), 8, 8, 1)
    np.testing.assert_array_equal(images.train.x.reshape(-1, 64), digits.train.x)
    np.testing.assert_array_equal(images.train.y, digits.train.y)


def test_split_is_seeded() -> None:
    a, b, c = load_digits(seed=1), load_digits(seed=1), load_digits(seed=2)
    np.testing.assert_array_equal(a.train.y, b.train.y)
    np.testing.assert_array_equal(a.test.x, b.test.x)
    assert not np.array_equal(a.train.y, c.train.y)


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


def test_iid_partitions_are_disjoint_balanced_and_cover() -> None:
    parts = partition_iid(1437, 5, seed=0)
    _assert_disjoint_cover(parts, 1437)
    assert sorted(len(p) for p in parts) == [287, 287, 287, 288, 288]


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_dirichlet_partitions_are_disjoint_and_cover(digits: Dataset, alpha: float) -> None:
    parts = partition_dirichlet(digits.train.y, 8, alpha=alpha, seed=3)
    _assert_disjoint_cover(parts, len(digits.train))
    assert min(len(p) for p in parts) >= 1


def _dominant_share(y: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over parts of the share of the part's most common label."""
    return float(np.mean([label_histogram(y[p]).max() / len(p) for p in parts]))


def test_small_alpha_is_skewed_large_alpha_is_not(digits: Dataset) -> None:
    y = digits.train.y
    skewed = partition_dirichlet(y, 5, alpha=0.1, seed=0)
    even = partition_dirichlet(y, 5, alpha=1000.0, seed=0)
    iid = partition_iid(len(y), 5, seed=0)
    assert _dominant_share(y, skewed) > 0.4
    assert _dominant_share(y, even) < 0.2
    assert _dominant_share(y, iid) < 0.2
    # With small alpha most parts miss several classes entirely.
    assert np.mean([np.count_nonzero(label_histogram(y[p])) for p in skewed]) < 8


def test_partitions_are_reproducible(digits: Dataset) -> None:
    y = digits.train.y
    for make in (
        lambda s: partition_iid(len(y), 4, seed=s),
        lambda s: partition_dirichlet(y, 4, alpha=0.3, seed=s),
    ):
        first, again, other = make(11), make(11), make(12)
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(a, b)
        assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_device_partitions_return_splits(digits: Dataset) -> None:
    splits = device_partitions(digits, 3, scheme="dirichlet", alpha=0.5, seed=0)
    assert sum(len(s) for s in splits) == len(digits.train)
    assert all(s.x.shape[1:] == (64,) and s.x.dtype == np.float32 for s in splits)
    with pytest.raises(ValueError, match="scheme"):
        device_partitions(digits, 3, scheme="nope")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        lambda: partition_iid(10, 0),
        lambda: partition_iid(3, 5),
        lambda: partition_dirichlet(np.zeros(10, np.int32), 2, alpha=0.0),
        lambda: partition_dirichlet(np.zeros(4, np.int32), 2, alpha=1.0, min_size=3),
        lambda: load_digits(test_fraction=1.0),
        lambda: load_digits(layout="cube"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_raise_value_error(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]
