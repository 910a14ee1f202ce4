"""ModelCard parsing, validation and round trips (no model files needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edge.model_card import CARD_FORMAT, ModelCard, ModelCardError


def _card_dict() -> dict[str, Any]:
    return {
        "format": CARD_FORMAT,
        "architecture_id": "mlp-64-10-deadbeef",
        "arch": "mlp",
        "input": {"name": "x", "dtype": "float32", "shape": [-1, 64]},
        "output": {"name": "probs", "dtype": "float32", "shape": [-1, 10]},
        "classes": 10,
        "label_dtype": "int32",
        "train_batch": 32,
        "optimizer": {"name": "sgd", "learning_rate": 0.3, "proximal": True},
        "weights": [
            {"name": "dense0_kernel", "dtype": "float32", "shape": [64, 10]},
            {"name": "dense0_bias", "dtype": "float32", "shape": [10]},
        ],
        "signatures": ["infer", "parameters", "restore", "train"],
    }


def test_round_trip(tmp_path: Path) -> None:
    card = ModelCard.from_json(json.dumps(_card_dict()))
    assert card.input_shape == (64,)
    assert [w.name for w in card.weight_specs] == ["dense0_kernel", "dense0_bias"]
    assert card.num_parameters == 650
    assert json.loads(card.to_json()) == _card_dict()
    card.save(tmp_path / "card.json")
    assert ModelCard.load(tmp_path / "card.json") == card
    assert ModelCard.from_json(card.to_json().encode()) == card


def test_every_semantic_problem_is_reported_at_once() -> None:
    data = _card_dict()
    data["format"] = "edgefl.model-card/9"
    data["arch"] = "transformer"
    data["output"]["shape"] = [-1, 7]
    data["weights"][1]["name"] = "dense0_kernel"
    data["weights"][0]["dtype"] = "float64"
    data["signatures"] = ["infer"]
    with pytest.raises(ModelCardError) as info:
        ModelCard.from_dict(data)
    text = str(info.value)
    for fragment in (
        "format",
        "arch",
        "output.shape",
        "duplicated",
        "float64",
        "signatures missing",
    ):
        assert fragment in text, fragment
    assert len(info.value.problems) == 6


def test_structural_problems_are_reported_together() -> None:
    data = _card_dict()
    del data["classes"]
    data["surprise"] = 1
    data["train_batch"] = "32"
    data["weights"] = "all of them"
    with pytest.raises(ModelCardError) as info:
        ModelCard.from_dict(data)
    text = str(info.value)
    for fragment in ("missing key: classes", "unknown keys: surprise", "train_batch", "weights"):
        assert fragment in text, fragment


@pytest.mark.parametrize("text", [b"\xff\xfe", "{", "[]", "null"])
def test_non_object_json_is_a_card_error(text: str | bytes) -> None:
    with pytest.raises(ModelCardError):
        ModelCard.from_json(text)


def test_metadata_is_kept() -> None:
    data = {**_card_dict(), "metadata": {"seed": 3}}
    assert ModelCard.from_dict(data).to_dict()["metadata"] == {"seed": 3}
