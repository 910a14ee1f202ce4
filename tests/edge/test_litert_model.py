"""LiteRTModel against real LiteRT interpreters running the built digits models."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from devices.datasets import Dataset, device_partitions, load_digits
from edge.litert_model import LiteRTModel, ModelContractError, WeightMismatchError, _InferCall
from edge.model_card import ModelCard


@pytest.fixture(scope="module")
def digits_flat() -> Dataset:
    return load_digits(layout="flat", seed=0)


@pytest.fixture(scope="module")
def digits_image() -> Dataset:
    return load_digits(layout="image", seed=0)


@pytest.fixture
def mlp(mlp_model_dir: Path) -> LiteRTModel:
    return LiteRTModel.load(mlp_model_dir)


@pytest.fixture
def cnn(cnn_model_dir: Path) -> LiteRTModel:
    return LiteRTModel.load(cnn_model_dir)


def _train_a_little(model: LiteRTModel, data: Dataset, steps: int = 5) -> None:
    b = model.train_batch
    for s in range(steps):
        model.train_step(data.train.x[s * b : (s + 1) * b], data.train.y[s * b : (s + 1) * b], 0.2)


@pytest.mark.parametrize("batch", [1, 7, 100])
def test_infer_shapes_for_any_batch(
    batch: int, mlp: LiteRTModel, cnn: LiteRTModel, digits_flat: Dataset, digits_image: Dataset
) -> None:
    for model, data in ((mlp, digits_flat), (cnn, digits_image)):
        probs = model.infer(data.test.x[:batch])
        assert probs.shape == (batch, 10)
        assert probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_direct_infer_matches_the_signature_runner_across_batch_changes(
    mlp_model_dir: Path, digits_flat: Dataset
) -> None:
    model = LiteRTModel.load(mlp_model_dir)
    # The pinned runtime exposes what the direct path needs: if an upgrade hides it,
    # inference silently falls back to the slower runner, and this says so.
    assert model.infer_path == "direct"
    runner = Interpreter(model_content=model.tflite).get_signature_runner("infer")
    x = digits_flat.test.x
    first = model.infer(x[:1])
    for start, batch in [(0, 1), (1, 5), (6, 1), (7, 64), (71, 64), (135, 3)]:
        xs = x[start : start + batch]
        np.testing.assert_array_equal(model.infer(xs), runner(x=xs)["probs"])
    # Results are copies: later calls do not change an earlier answer.
    np.testing.assert_array_equal(first, runner(x=x[:1])["probs"])


def test_infer_falls_back_to_the_runner_when_internals_are_missing(
    mlp_model_dir: Path, digits_flat: Dataset
) -> None:
    class RunnerOnly:
        """A real signature runner seen only through its public call."""

        def __init__(self, runner: object) -> None:
            self._call = runner

        def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
            return self._call(**inputs)  # type: ignore[operator, no-any-return]

    tflite = (mlp_model_dir / "model.tflite").read_bytes()
    runner = Interpreter(model_content=tflite).get_signature_runner("infer")
    fallback = _InferCall(RunnerOnly(runner), "x", "probs")
    assert not fallback.direct
    reference = Interpreter(model_content=tflite).get_signature_runner("infer")
    for batch in (1, 4, 1):
        xs = np.ascontiguousarray(digits_flat.test.x[:batch])
        got = fallback(xs)
        assert got.dtype == np.float32 and got.shape == (batch, 10)
        np.testing.assert_array_equal(got, reference(x=xs)["probs"])


class _RecordingWrapper:
    """A real interpreter wrapper that records every ``ResizeInputTensor`` shape."""

    def __init__(self, wrapper: object, resizes: list[tuple[int, ...]]) -> None:
        self._wrapper = wrapper
        self._resizes = resizes

    def ResizeInputTensor(self, index: int, shape: np.ndarray, *rest: object) -> object:
        self._resizes.append(tuple(int(d) for d in shape))
        return self._wrapper.ResizeInputTensor(index, shape, *rest)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._wrapper, name)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_training_and_weights_never_resize_a_scalar_input(
    arch: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    digits_flat: Dataset,
    digits_image: Dataset,
) -> None:
    """Issue 13: LiteRT 2.3.0 on aarch64 dies (SIGSEGV) resizing a 0-d input.

    ``SignatureRunner.__call__`` resizes every input on every call, so the train
    signature's scalar ``lr`` and ``mu`` crashed every train step on arm64 (found
    under qemu-user 10 with a core dump; ``tests/e2e/test_arm64.py`` runs it there).
    This host's x86-64 LiteRT survives that call, so here the real wrapper is watched.
    """
    resizes: list[tuple[int, ...]] = []
    real_runner = Interpreter.get_signature_runner

    def watched(self: Interpreter, *args: object, **kwargs: object) -> object:
        runner = real_runner(self, *args, **kwargs)  # type: ignore[arg-type]
        runner._interpreter_wrapper = _RecordingWrapper(runner._interpreter_wrapper, resizes)
        return runner

    monkeypatch.setattr(Interpreter, "get_signature_runner", watched)
    model = LiteRTModel.load(request.getfixturevalue(f"{arch}_model_dir"))
    data = digits_flat if arch == "mlp" else digits_image
    weights = model.get_weights()
    _train_a_little(model, data, steps=3)
    model.fit(data.train.x[:100], data.train.y[:100], epochs=1, lr=0.1, mu=0.01)
    model.set_weights(weights)
    np.testing.assert_array_equal(
        model.get_weights()[model.card.weight_names[0]], weights[model.card.weight_names[0]]
    )
    model.infer(data.test.x[:3])
    assert () not in resizes, f"a 0-d input was resized: {resizes}"
    assert resizes, "the recording wrapper saw no resize at all (inference resizes x)"


def test_a_signature_call_refuses_a_changed_scalar_shape(mlp: LiteRTModel) -> None:
    b = mlp.train_batch
    x, y = np.zeros((b, 64), np.float32), np.zeros(b, np.int32)
    lr = np.asarray([0.1, 0.2], np.float32)
    with pytest.raises(ValueError, match="input 'lr' has shape"):
        mlp._train_call(x=x, y=y, lr=lr, mu=np.asarray(0.0, np.float32))
    with pytest.raises(ValueError, match="signature inputs are"):
        mlp._train_call(x=x, y=y)
    loss, _ = mlp.train_step(x, y, 0.1)  # still usable afterwards
    assert np.isfinite(loss)


def test_infer_rejects_wrong_example_shape(mlp: LiteRTModel) -> None:
    with pytest.raises(ValueError, match="expected shape"):
        mlp.infer(np.zeros((3, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="at least one"):
        mlp.infer(np.zeros((0, 64), np.float32))


def test_train_step_needs_exact_batch_and_valid_labels(
    mlp: LiteRTModel, digits_flat: Dataset
) -> None:
    x, y = digits_flat.train.x, digits_flat.train.y
    with pytest.raises(ValueError, match="exactly 32"):
        mlp.train_step(x[:31], y[:31], 0.1)
    bad = y[:32].copy()
    bad[0] = 10
    with pytest.raises(ValueError, match="labels"):
        mlp.train_step(x[:32], bad, 0.1)
    loss, correct = mlp.train_step(x[:32], y[:32], 0.1)
    assert np.isfinite(loss) and loss > 0
    assert 0 <= correct <= 32


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_parameters_restore_into_fresh_interpreter_is_bit_exact(
    arch: str, request: pytest.FixtureRequest, digits_flat: Dataset, digits_image: Dataset
) -> None:
    model_dir: Path = request.getfixturevalue(f"{arch}_model_dir")
    data = digits_flat if arch == "mlp" else digits_image
    trained = LiteRTModel.load(model_dir)
    _train_a_little(trained, data)
    weights = trained.get_weights()
    fresh = LiteRTModel.load(model_dir)
    assert not np.array_equal(fresh.infer(data.test.x), trained.infer(data.test.x))
    fresh.set_weights(weights)
    np.testing.assert_array_equal(fresh.infer(data.test.x), trained.infer(data.test.x))
    for name, value in fresh.get_weights().items():
        np.testing.assert_array_equal(value, weights[name])


def test_get_weights_returns_copies(mlp: LiteRTModel, digits_flat: Dataset) -> None:
    before = mlp.infer(digits_flat.test.x[:10])
    weights = mlp.get_weights()
    assert list(weights) == list(mlp.card.weight_names)
    for value in weights.values():
        value[...] = 0.0
    np.testing.assert_array_equal(mlp.infer(digits_flat.test.x[:10]), before)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda w: w.update(extra_kernel=w.pop("dense0_kernel")), "missing: dense0_kernel"),
        (lambda w: w.update(dense0_bias=np.zeros((3,), np.float32)), "dense0_bias: shape [3]"),
        (lambda w: w.update(dense1_kernel=w["dense1_kernel"].astype(np.float64)), "dtype float64"),
    ],
    ids=["wrong-name", "wrong-shape", "wrong-dtype"],
)
def test_set_weights_mismatch_leaves_model_untouched(
    mutate: object, fragment: str, mlp: LiteRTModel, digits_flat: Dataset
) -> None:
    before = mlp.infer(digits_flat.test.x)
    weights = {k: v + 1.0 for k, v in mlp.get_weights().items()}  # would change predictions
    mutate(weights)  # type: ignore[operator]
    with pytest.raises(WeightMismatchError, match=re.escape(fragment)):
        mlp.set_weights(weights)
    np.testing.assert_array_equal(mlp.infer(digits_flat.test.x), before)


def test_weight_mismatch_names_every_problem(mlp: LiteRTModel) -> None:
    weights = mlp.get_weights()
    weights["bogus"] = weights.pop("dense0_bias")
    weights["dense0_kernel"] = weights["dense0_kernel"][:, :3]
    weights["dense1_bias"] = weights["dense1_bias"].astype(np.float16)
    with pytest.raises(WeightMismatchError) as info:
        mlp.set_weights(weights)
    assert len(info.value.problems) == 4
    message = str(info.value)
    for fragment in (
        "missing: dense0_bias",
        "unexpected: bogus",
        "dense0_kernel: shape",
        "float16",
    ):
        assert fragment in message


def test_card_that_does_not_match_the_model_is_refused(
    mlp_model_dir: Path, cnn_model_dir: Path
) -> None:
    cnn_card = ModelCard.load(cnn_model_dir / "card.json")
    with pytest.raises(ModelContractError):
        LiteRTModel((mlp_model_dir / "model.tflite").read_bytes(), cnn_card)


def test_mlp_fit_on_one_iid_partition_reaches_90_percent(
    mlp: LiteRTModel, digits_flat: Dataset
) -> None:
    part = device_partitions(digits_flat, 5, scheme="iid", seed=0)[0]
    before = mlp.evaluate(digits_flat.test.x, digits_flat.test.y)
    metrics = mlp.fit(part.x, part.y, epochs=30, lr=mlp.card.optimizer.learning_rate, seed=0)
    after = mlp.evaluate(digits_flat.test.x, digits_flat.test.y)
    assert metrics["examples"] == len(part)
    assert metrics["steps"] == 30 * -(-len(part) // 32)
    assert metrics["seconds"] > 0
    assert after["loss"] < before["loss"]
    assert after["accuracy"] >= 0.9, after
    assert after["examples"] == len(digits_flat.test)


def test_cnn_fit_on_one_iid_partition_learns(cnn: LiteRTModel, digits_image: Dataset) -> None:
    part = device_partitions(digits_image, 5, scheme="iid", seed=0)[0]
    cnn.fit(part.x, part.y, epochs=25, lr=cnn.card.optimizer.learning_rate, seed=0)
    assert cnn.evaluate(digits_image.test.x, digits_image.test.y)["accuracy"] >= 0.85


def test_fit_is_deterministic_and_wraps_small_sets(
    mlp_model_dir: Path, digits_flat: Dataset
) -> None:
    x, y = digits_flat.train.x[:40], digits_flat.train.y[:40]
    a, b = LiteRTModel.load(mlp_model_dir), LiteRTModel.load(mlp_model_dir)
    ma = a.fit(x, y, epochs=2, lr=0.1, seed=7)
    mb = b.fit(x, y, epochs=2, lr=0.1, seed=7)
    assert ma["steps"] == 4  # ceil(40 / 32) per epoch: the remainder wraps, nothing dropped
    assert ma["loss"] == mb["loss"]
    for name, value in a.get_weights().items():
        np.testing.assert_array_equal(value, b.get_weights()[name])
    tiny = a.fit(x[:5], y[:5], epochs=1, lr=0.1)
    assert tiny["steps"] == 1 and tiny["examples"] == 5


def test_fedprox_term_matches_hand_computation(mlp: LiteRTModel, digits_flat: Dataset) -> None:
    """After restore, w == anchor, so step 1 ignores mu; step 2 adds lr*mu*(w1 - anchor)."""
    x, y = digits_flat.train.x, digits_flat.train.y
    lr, mu = 0.2, 1.5
    anchor = mlp.get_weights()
    runs = {}
    for m in (0.0, mu):
        mlp.set_weights(anchor)
        mlp.train_step(x[:32], y[:32], lr, m)
        w1 = mlp.get_weights()
        mlp.train_step(x[32:64], y[32:64], lr, m)
        runs[m] = (w1, mlp.get_weights())
    for name in anchor:
        np.testing.assert_array_equal(runs[0.0][0][name], runs[mu][0][name])
        expected = runs[0.0][1][name] - lr * mu * (runs[0.0][0][name] - anchor[name])
        np.testing.assert_allclose(runs[mu][1][name], expected, rtol=1e-5, atol=1e-6)


def test_fedprox_keeps_weights_closer_to_anchor(mlp: LiteRTModel, digits_flat: Dataset) -> None:
    part = device_partitions(digits_flat, 5, scheme="dirichlet", alpha=0.2, seed=1)[0]
    anchor = mlp.get_weights()

    def distance() -> float:
        w = mlp.get_weights()
        return float(np.sqrt(sum(np.sum((w[k] - anchor[k]) ** 2) for k in anchor)))

    distances = {}
    for mu in (0.0, 1.0):
        mlp.set_weights(anchor)
        mlp.fit(part.x, part.y, epochs=3, lr=0.2, mu=mu, seed=0)
        distances[mu] = distance()
    assert 0 < distances[1.0] < distances[0.0]


def test_clone_is_independent(mlp: LiteRTModel, digits_flat: Dataset) -> None:
    twin = mlp.clone()
    np.testing.assert_array_equal(twin.infer(digits_flat.test.x), mlp.infer(digits_flat.test.x))
    _train_a_little(twin, digits_flat, steps=2)
    assert not np.array_equal(twin.infer(digits_flat.test.x), mlp.infer(digits_flat.test.x))


def test_importing_the_runtime_does_not_import_tensorflow() -> None:
    code = (
        "import sys\n"
        "import edge.litert_model, edge.model_card\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
