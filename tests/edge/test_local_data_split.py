"""The held-out split: Fit trains on the train part only, the check and Evaluate use the
held-out part only (a real EdgeNode: LiteRT trainer, the sample log on disk)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest

from devices.datasets import Dataset, device_partitions, load_digits
from edge.config import load_settings
from edge.errors import NoHeldOutData
from edge.litert_model import LiteRTModel
from edge.local_data import LocalData
from edge.local_data_split import split_samples
from edge.node import EdgeNode
from protos import codec
from tests.edge.helpers import device_config, make_package, model_weights, perturbed


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits(layout="flat", seed=0)


def expected_heldout(x: np.ndarray, y: np.ndarray, fraction: float, m: int) -> list[int]:
    """The documented rule, written out again: BLAKE2b keys, the k lowest held out."""
    keys = []
    for row, label in zip(x, y, strict=True):
        h = hashlib.blake2b(
            row.astype("<f4").tobytes() + np.int32(label).astype("<i4").tobytes(),
            digest_size=8,
            person=b"edgefl-split-v1",
        )
        keys.append(int.from_bytes(h.digest(), "big") / 2**64)
    k = max(sum(key < fraction for key in keys), m)
    return sorted(sorted(range(len(keys)), key=lambda i: (keys[i], i))[:k])


def _node(tmp_path: Path, model_dir: Path, **data: object) -> EdgeNode:
    pkg = tmp_path / "initial.pkg"
    pkg.write_bytes(make_package(model_dir))
    settings = load_settings(device_config(tmp_path, initial_package=pkg))
    if data:
        settings = dataclasses.replace(settings, data=dataclasses.replace(settings.data, **data))
    node = EdgeNode(settings)
    node.start()
    return node


def test_fit_trains_on_exactly_the_train_part(
    tmp_path: Path, mlp_model_dir: Path, digits: Dataset
) -> None:
    part = device_partitions(digits, 10, scheme="iid", seed=0)[0]
    node = _node(tmp_path, mlp_model_dir)
    node.data.load_partition(part.x, part.y)
    x, y = LocalData(tmp_path / "data" / "samples").snapshot()  # what the file holds
    held = expected_heldout(x, y, 0.2, 10)
    train = [i for i in range(len(y)) if i not in set(held)]
    assert 10 <= len(held) < len(y) // 2

    weights = model_weights(mlp_model_dir)
    result = node.trainer.fit(weights, {"epochs": 3, "seed": 4})

    assert result.num_examples == len(train)

    def trained_on(idx: list[int]) -> dict[str, np.ndarray]:
        ref = LiteRTModel.load(mlp_model_dir)
        ref.set_weights(weights)
        lr = ref.card.optimizer.learning_rate
        ref.fit(x[idx], y[idx], epochs=3, lr=lr, seed=4)
        return ref.get_weights()

    exact = trained_on(train)
    for name, w in result.weights.items():
        np.testing.assert_array_equal(w, exact[name])
    touched = trained_on(list(range(len(y))))  # what training on everything gives
    assert any(not np.array_equal(result.weights[n], touched[n]) for n in touched)


def test_check_and_evaluate_use_exactly_the_heldout_part(
    tmp_path: Path, mlp_model_dir: Path, digits: Dataset
) -> None:
    part = device_partitions(digits, 10, scheme="iid", seed=0)[1]
    node = _node(tmp_path, mlp_model_dir, holdout_fraction=0.3)
    node.data.load_partition(part.x, part.y)
    x, y = node.data.snapshot()
    held = expected_heldout(x, y, 0.3, 10)
    train = [i for i in range(len(y)) if i not in set(held)]
    candidate = perturbed(model_weights(mlp_model_dir), seed=3)
    node.stage_release(2, make_package(mlp_model_dir, candidate), _sha(mlp_model_dir, candidate))

    figures = node.check_candidate(2, 1)

    ref = LiteRTModel.load(mlp_model_dir)
    ref.set_weights(candidate)
    on_held = ref.evaluate(x[held], y[held])
    on_train = ref.evaluate(x[train], y[train])
    assert figures["examples"] == figures["inference_calls"] == len(held)
    assert figures["train_examples"] == len(train)
    assert figures["candidate_accuracy"] == pytest.approx(on_held["accuracy"])
    assert figures["candidate_loss"] == pytest.approx(on_held["loss"], rel=1e-5)
    assert figures["candidate_loss"] != pytest.approx(on_train["loss"], rel=1e-3)
    assert figures["candidate_error_rate"] == figures["served_error_rate"] == 0.0

    evaluation = node.trainer.evaluate(candidate, {})
    assert evaluation.num_examples == len(held)
    assert evaluation.loss == pytest.approx(on_held["loss"], rel=1e-5)


def test_the_split_follows_the_samples_not_their_positions(digits: Dataset) -> None:
    x, y = digits.train.x[:400], digits.train.y[:400]
    first = split_samples(x, y, 0.2, 10)
    # The oldest 150 evicted: every surviving sample stays on its side.
    later = split_samples(x[150:], y[150:], 0.2, 10)
    assert set(later.heldout + 150) == {i for i in first.heldout if i >= 150}
    # Duplicates of a sample never sit on both sides.
    doubled = split_samples(np.concatenate([x, x]), np.concatenate([y, y]), 0.2, 10)
    held = set(doubled.heldout)
    assert all((i in held) == (i + 400 in held) for i in range(400))


def test_too_little_data_trains_on_all_and_refuses_the_check(
    tmp_path: Path, mlp_model_dir: Path, digits: Dataset
) -> None:
    node = _node(tmp_path, mlp_model_dir, min_holdout=8)
    node.data.load_partition(digits.train.x[:15], digits.train.y[:15])
    weights = model_weights(mlp_model_dir)
    node.stage_release(2, make_package(mlp_model_dir, weights), _sha(mlp_model_dir, weights))

    assert node.trainer.fit(weights, {"epochs": 1}).num_examples == 15
    with pytest.raises(NoHeldOutData, match=r"15 samples stored, at least 16 needed"):
        node.check_candidate(2, 1)
    with pytest.raises(NoHeldOutData):
        node.trainer.evaluate(weights, {})
    # One more sample and the device has a split: 8 held out, 8 trained on.
    node.data.append(digits.train.x[15:16], digits.train.y[15:16])
    figures = node.check_candidate(2, 1)
    assert figures["examples"] == 8 and figures["train_examples"] == 8


def _sha(model_dir: Path, weights: dict[str, np.ndarray]) -> str:
    return codec.sha256_hex(make_package(model_dir, weights))
