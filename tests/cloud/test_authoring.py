"""Model authoring: built models are LiteRT-portable and carry a valid card.

The models come from the session fixtures in ``tests.fixtures.models`` (built in a
subprocess); this test process never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import flatbuffers
import pytest
from ai_edge_litert import schema_py_generated as schema

from cloud.authoring import commands
from cloud.authoring.build import architecture_id, parse_input_shape
from cloud.authoring.opcheck import OpCheckError, check_bytes, check_file
from edge.model_card import CARD_FORMAT, ModelCard, WeightSpec

SIGNATURES = {"infer", "parameters", "restore", "train"}


def _with_extra_op_codes(data: bytes, custom_codes: list[str]) -> bytes:
    """Re-pack a model with extra CUSTOM operator codes (as a Flex/custom model has)."""
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    for name in custom_codes:
        code = schema.OperatorCodeT()
        code.builtinCode = schema.BuiltinOperator.CUSTOM
        code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
        code.customCode = name
        model.operatorCodes.append(code)
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@pytest.mark.parametrize("fixture", ["mlp_model_dir", "cnn_model_dir"])
def test_built_models_use_builtin_ops_only(fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    report = check_file(model_dir / "model.tflite")
    assert report.ok, report.summary()
    assert report.flex_ops == ()
    assert report.custom_ops == ()
    assert "FULLY_CONNECTED" in report.builtin_ops or "BATCH_MATMUL" in report.builtin_ops
    assert set(report.signatures) == SIGNATURES
    assert report.signatures["infer"] == {"inputs": ["x"], "outputs": ["probs"]}
    assert set(report.signatures["train"]["inputs"]) == {"x", "y", "lr", "mu"}
    assert set(report.signatures["train"]["outputs"]) == {"loss", "correct"}


def test_opcheck_flags_flex_and_custom_ops(mlp_model_dir: Path) -> None:
    data = (mlp_model_dir / "model.tflite").read_bytes()
    tampered = _with_extra_op_codes(data, ["FlexAddV2", "MyCustomOp"])
    report = check_bytes(tampered)
    assert not report.ok
    assert report.flex_ops == ("FlexAddV2",)
    assert report.custom_ops == ("MyCustomOp",)
    assert "FlexAddV2" in report.summary() and "MyCustomOp" in report.summary()


def test_opcheck_rejects_non_tflite_bytes() -> None:
    with pytest.raises(OpCheckError):
        check_bytes(b"definitely not a flatbuffer")


@pytest.mark.parametrize(
    ("fixture", "arch", "input_shape", "weight_names"),
    [
        (
            "mlp_model_dir",
            "mlp",
            [64],
            ["dense0_kernel", "dense0_bias", "dense1_kernel", "dense1_bias"],
        ),
        (
            "cnn_model_dir",
            "cnn",
            [8, 8, 1],
            [
                "conv0_kernel",
                "conv0_bias",
                "dense0_kernel",
                "dense0_bias",
                "dense1_kernel",
                "dense1_bias",
            ],
        ),
    ],
)
def test_card_describes_the_contract(
    fixture: str,
    arch: str,
    input_shape: list[int],
    weight_names: list[str],
    request: pytest.FixtureRequest,
) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    raw = json.loads((model_dir / "card.json").read_text())
    card = ModelCard.from_json((model_dir / "card.json").read_bytes())
    assert raw["format"] == CARD_FORMAT
    assert raw["signatures"] == sorted(SIGNATURES)
    assert card.arch == arch
    assert card.input.to_dict() == {"name": "x", "dtype": "float32", "shape": [-1, *input_shape]}
    assert card.output.to_dict() == {"name": "probs", "dtype": "float32", "shape": [-1, 10]}
    assert card.classes == 10 and card.train_batch == 32 and card.label_dtype == "int32"
    assert card.optimizer.name == "sgd" and card.optimizer.proximal
    assert list(card.weight_names) == weight_names
    shape_text = "x".join(map(str, input_shape))
    assert re.fullmatch(rf"{arch}-{shape_text}-10-[0-9a-f]{{8}}", card.architecture_id)
    report = check_file(model_dir / "model.tflite")
    assert set(report.signatures["restore"]["inputs"]) == set(weight_names)


def test_architecture_id_depends_on_layout_not_seed() -> None:
    weights = [
        WeightSpec("dense0_kernel", "float32", (64, 10)),
        WeightSpec("dense0_bias", "float32", (10,)),
    ]
    first = architecture_id("mlp", (64,), 10, 32, weights)
    assert first == architecture_id("mlp", (64,), 10, 32, list(weights))
    assert first.startswith("mlp-64-10-")
    assert first != architecture_id("mlp", (64,), 10, 16, weights)
    wider = [
        WeightSpec("dense0_kernel", "float32", (64, 12)),
        WeightSpec("dense0_bias", "float32", (12,)),
    ]
    assert first != architecture_id("mlp", (64,), 12, 32, wider)


@pytest.mark.parametrize(
    ("text", "expected"), [("64", (64,)), ("8,8,1", (8, 8, 1)), ("8x8x1", (8, 8, 1))]
)
def test_parse_input_shape(text: str, expected: tuple[int, ...]) -> None:
    assert parse_input_shape(text) == expected


@pytest.mark.parametrize("text", ["", "a,b", "8,0,1", "-1"])
def test_parse_input_shape_rejects_bad_text(text: str) -> None:
    with pytest.raises(ValueError):
        parse_input_shape(text)


def test_model_inspect_command(cnn_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="edgefl")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["model", "inspect", str(cnn_model_dir / "model.tflite")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "train(lr, mu, x, y) -> correct, loss" in out
    assert "no Flex/custom ops" in out


def test_model_build_parser_accepts_the_documented_options() -> None:
    parser = argparse.ArgumentParser(prog="edgefl")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["model", "build", "--arch", "cnn", "--input-shape", "8,8,1", "--classes", "10",
         "--train-batch", "16", "--learning-rate", "0.05", "--seed", "3", "--out", "x"]
    )  # fmt: skip
    assert (args.arch, args.input_shape, args.classes) == ("cnn", "8,8,1", 10)
    assert (args.train_batch, args.learning_rate, args.seed, args.out) == (16, 0.05, 3, "x")


def test_cli_registration_and_opcheck_do_not_import_tensorflow() -> None:
    code = (
        "import argparse, sys\n"
        "import cloud.authoring.commands as c, cloud.authoring.opcheck, cloud.authoring.build\n"
        "c.register(argparse.ArgumentParser().add_subparsers())\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
