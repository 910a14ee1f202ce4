"""The KServe V2 inference service, driven by tritonclient as a real user would.

tritonclient registers its protos in package ``inference`` like ours, and this test
process loads ours (other edge tests run servers in-process), so tritonclient runs in
client subprocesses (``python -m tests.edge.helpers triton-calls|triton-load``) and
the edge server in another (``python -m edge.server``). Each test asserts on what the
client saw. Expected outputs come from a local LiteRT interpreter with the same weights.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.litert_model import LiteRTModel
from tests.edge.helpers import (
    READY_RE,
    device_config,
    make_package,
    model_weights,
    perturbed,
    run_triton,
    start_process,
    wait_for_line,
)

MAX_BATCH = 8
MAX_MESSAGE = 64 * 1024


def digits_batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, size=(n, 64)).astype(np.float32)


@dataclass
class Device:
    address: str
    model: LiteRTModel  # holds the served weights, for expected outputs
    arrays: Path


def _array(device_arrays: Path, name: str, x: np.ndarray) -> str:
    path = device_arrays / f"{name}.npy"
    np.save(path, x)
    return str(path)


@pytest.fixture(scope="module")
def device(mlp_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    tmp = tmp_path_factory.mktemp("inference")
    pkg = tmp / "initial.pkg"
    pkg.write_bytes(make_package(mlp_model_dir))
    config = device_config(
        tmp, initial_package=pkg, grpc={"max_batch": MAX_BATCH, "max_message_bytes": MAX_MESSAGE}
    )
    proc = start_process(
        "edge-server",
        [sys.executable, "-m", "edge.server", "--config", str(config)],
        tmp / "server.log",
    )
    try:
        match = wait_for_line(proc, READY_RE)
        arrays = tmp / "arrays"
        arrays.mkdir()
        yield Device(f"{match.group(1)}:{match.group(2)}", LiteRTModel.load(mlp_model_dir), arrays)
    finally:
        proc.stop()


GOOD_BATCHES = (1, 5, MAX_BATCH)
BAD_INFER: dict[str, tuple[dict[str, Any], str, str]] = {
    # id: (call fields, expected status, message fragment)
    "unknown model": ({"name": "other"}, "NOT_FOUND", "model 'other' not found"),
    "unknown version": ({"version": "7"}, "NOT_FOUND", "version '7' not found"),
    "dtype": (
        {"x": ("f64", digits_batch(1).astype(np.float64)), "datatype": "FP64"},
        "INVALID_ARGUMENT",
        "datatype FP64",
    ),
    "shape": ({"x": ("s63", np.zeros((1, 63), np.float32))}, "INVALID_ARGUMENT", "shape [1, 63]"),
    "rank": ({"x": ("r3", np.zeros((1, 8, 8), np.float32))}, "INVALID_ARGUMENT", "shape [1, 8, 8]"),
    "batch over limit": (
        {"x": ("b9", digits_batch(MAX_BATCH + 1))},
        "INVALID_ARGUMENT",
        "batch 9 outside",
    ),
    "input name": ({"input": "image"}, "INVALID_ARGUMENT", "unknown input 'image'"),
    "requested output": ({"outputs": ["logits"]}, "INVALID_ARGUMENT", "requested output 'logits'"),
    "oversized": ({"x": ("big", digits_batch(400))}, "RESOURCE_EXHAUSTED", ""),
}
ONE = digits_batch(1).tobytes().hex()
BAD_RAW: dict[str, tuple[dict[str, Any], str, str]] = {
    "byte length": (
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 64]}], "raw": [ONE]},
        "INVALID_ARGUMENT",
        "bytes do not match",
    ),
    "zero batch": (
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 64]}], "raw": [""]},
        "INVALID_ARGUMENT",
        "batch 0 outside",
    ),
    "negative dim": (
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}], "raw": [ONE]},
        "INVALID_ARGUMENT",
        "batch -1 outside",
    ),
    "mixed contents": (
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, 64], "fp32_contents": [0.0] * 64}
            ],
            "raw": [ONE],
        },
        "INVALID_ARGUMENT",
        "not both",
    ),
    "typed count": (
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [2, 64], "fp32_contents": [0.5] * 64}
            ]
        },
        "INVALID_ARGUMENT",
        "holds 64 values",
    ),
    "no data": (
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64]}]},
        "INVALID_ARGUMENT",
        "no data",
    ),
    "two inputs": (
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64]}] * 2, "raw": [ONE, ONE]},
        "INVALID_ARGUMENT",
        "expected exactly 1 input",
    ),
    "no model name": (
        {"name": "", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64]}], "raw": [ONE]},
        "NOT_FOUND",
        "model '' not found",
    ),
}
TYPED_X = digits_batch(3, seed=11)


@pytest.fixture(scope="module")
def outcomes(device: Device) -> dict[str, dict[str, Any]]:
    """Every client call of this module, run by one tritonclient subprocess, by name."""
    named: list[tuple[str, dict[str, Any]]] = [
        ("live", {"op": "live"}),
        ("ready", {"op": "ready"}),
        ("model ready", {"op": "model_ready", "name": "digits"}),
        ("model ready v1", {"op": "model_ready", "name": "digits", "version": "1"}),
        ("model ready v2", {"op": "model_ready", "name": "digits", "version": "2"}),
        ("model ready other", {"op": "model_ready", "name": "other"}),
        ("server metadata", {"op": "server_metadata"}),
        ("model metadata", {"op": "model_metadata", "name": "digits"}),
    ]
    for n in GOOD_BATCHES:
        x = _array(device.arrays, f"good{n}", digits_batch(n, seed=n))
        named.append(
            (f"infer {n}", {"op": "infer", "x": x, "outputs": ["probs"], "id": f"req-{n}"})
        )
    default_x = _array(device.arrays, "one", digits_batch(1))
    for case, (fields, _, _) in BAD_INFER.items():
        call = {"op": "infer", "x": default_x, **fields}
        if isinstance(call["x"], tuple):
            call["x"] = _array(device.arrays, *call["x"])
        named.append((case, call))
    typed = {
        "name": "x",
        "datatype": "FP32",
        "shape": [3, 64],
        "fp32_contents": TYPED_X.ravel().tolist(),
    }
    named.append(("typed", {"op": "raw", "inputs": [typed]}))
    for case, (fields, _, _) in BAD_RAW.items():
        named.append((case, {"op": "raw", **fields}))
    named.append(("live after", {"op": "live"}))
    named.append(
        ("infer after", {"op": "infer", "x": _array(device.arrays, "after", digits_batch(2, 99))})
    )
    results = run_triton(device.address, [call for _, call in named], device.arrays)
    return {name: result for (name, _), result in zip(named, results, strict=True)}


def test_server_and_model_metadata(outcomes: dict[str, dict[str, Any]]) -> None:
    values: dict[str, Any] = {name: outcomes[name].get("value") for name in outcomes}
    assert values["live"] is True and values["ready"] is True
    assert values["model ready"] is True and values["model ready v1"] is True
    assert values["model ready v2"] is False and values["model ready other"] is False
    meta = values["server metadata"]
    assert meta["name"] == "edgefl" and meta["version"]
    assert meta.get("extensions", []) == []
    model = values["model metadata"]
    assert model["versions"] == ["1"] and model["platform"] == "litert"
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert model["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": ["-1", "10"]}]


@pytest.mark.parametrize("n", GOOD_BATCHES)
def test_infer_matches_the_local_runtime(
    outcomes: dict[str, dict[str, Any]], device: Device, n: int
) -> None:
    result = outcomes[f"infer {n}"]
    assert result["ok"], result
    probs = np.asarray(result["probs"], dtype=np.float32)
    assert probs.shape == (n, 10) and result["dtype"] == "float32"
    np.testing.assert_allclose(
        probs, device.model.infer(digits_batch(n, seed=n)), rtol=1e-6, atol=1e-7
    )
    assert (result["model_name"], result["model_version"], result["id"]) == (
        "digits",
        "1",
        f"req-{n}",
    )


def test_typed_contents_are_accepted(outcomes: dict[str, dict[str, Any]], device: Device) -> None:
    result = outcomes["typed"]
    assert result["ok"], result
    assert result["model_version"] == "1"
    np.testing.assert_allclose(
        np.asarray(result["probs"], np.float32), device.model.infer(TYPED_X), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("case", [*BAD_INFER, *BAD_RAW])
def test_bad_requests_get_the_right_status(outcomes: dict[str, dict[str, Any]], case: str) -> None:
    _, code, message = BAD_INFER[case] if case in BAD_INFER else BAD_RAW[case]
    result = outcomes[case]
    assert not result["ok"], result
    assert result["status"] == f"StatusCode.{code}"
    assert message in (result["message"] or "")


def test_the_service_survives_every_bad_request(
    outcomes: dict[str, dict[str, Any]], device: Device
) -> None:
    assert outcomes["live after"]["value"] is True
    after = outcomes["infer after"]
    assert after["ok"], after
    np.testing.assert_allclose(
        np.asarray(after["probs"], np.float32), device.model.infer(digits_batch(2, 99)), rtol=1e-6
    )


# -- hot swaps under load -------------------------------------------------------------------


def test_hot_swaps_under_load_never_fail_or_mix_versions(
    mlp_model_dir: Path, tmp_path: Path
) -> None:
    """20 installs alternating weights A/B while 3 tritonclient threads infer non-stop."""
    weights_a = model_weights(mlp_model_dir)
    weights_b = perturbed(weights_a, seed=1)
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    (pkgs / "a.pkg").write_bytes(make_package(mlp_model_dir, weights_a))
    (pkgs / "b.pkg").write_bytes(make_package(mlp_model_dir, weights_b))
    config = device_config(tmp_path, initial_package=pkgs / "a.pkg", grpc={"serving_threads": 2})
    swap_log, replies_file = tmp_path / "swaps.json", tmp_path / "replies.json"
    batches = {"1": digits_batch(1, 21), "4": digits_batch(4, 22), "8": digits_batch(8, 23)}
    np.savez(tmp_path / "batches.npz", **batches)  # type: ignore[arg-type]
    stop_file = tmp_path / "stop"
    server = start_process(
        "swap-server",
        [
            sys.executable,
            "-m",
            "tests.edge.helpers",
            "swap-server",
            str(config),
            str(pkgs),
            "20",
            "0.12",
            str(swap_log),
        ],
        tmp_path / "swap-server.log",
    )
    load = None
    try:
        match = wait_for_line(server, READY_RE)
        address = f"{match.group(1)}:{match.group(2)}"
        load = start_process(
            "triton-load",
            [
                sys.executable,
                "-m",
                "tests.edge.helpers",
                "triton-load",
                address,
                str(tmp_path / "batches.npz"),
                str(stop_file),
                str(replies_file),
            ],
            tmp_path / "load.log",
        )
        wait_for_line(load, re.compile("load running"))
        time.sleep(0.5)  # load is running before the first swap
        (pkgs / "go").touch()
        wait_for_line(server, re.compile("swaps done"), timeout=120)
        time.sleep(0.2)
        stop_file.touch()
        wait_for_line(load, re.compile("load done"), timeout=60)
    finally:
        stop_file.touch()
        if load is not None:
            load.stop()
        server.stop()

    outcome = json.loads(replies_file.read_text())
    assert outcome["errors"] == []
    events = {e["version"]: e for e in json.loads(swap_log.read_text())}
    assert sorted(events) == list(range(2, 22))
    model_a, model_b = LiteRTModel.load(mlp_model_dir), LiteRTModel.load(mlp_model_dir)
    model_b.set_weights(weights_b)
    expected = {
        (key, parity): (model_a if parity == 1 else model_b).infer(x)
        for key, x in batches.items()
        for parity in (0, 1)
    }
    for key in batches:  # the two weight sets really give different answers
        assert np.abs(expected[(key, 0)] - expected[(key, 1)]).max() > 0.05
    replies = outcome["replies"]
    versions_seen = {r["version"] for r in replies}
    assert len(versions_seen) >= 15, f"too few versions observed: {sorted(versions_seen)}"
    assert len(replies) > 100
    for r in replies:
        probs = np.asarray(r["probs"], dtype=np.float32)
        np.testing.assert_allclose(
            probs, expected[(r["batch"], r["version"] % 2)], rtol=1e-5, atol=1e-6
        )
        # The version was current at some moment between sending and receiving: it became
        # current after events[v]["before"] and stopped being current before events[v+1]["after"].
        if r["version"] in events:
            assert events[r["version"]]["before"] <= r["received"]
        if r["version"] + 1 in events:
            assert r["sent"] <= events[r["version"] + 1]["after"]
