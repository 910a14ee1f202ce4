"""ModelInfer's wire, short and full paths agree; the interpreter pool is exclusive.

In-process, on a real LiteRT interpreter pool (the served behaviour is in
``test_inference_service.py``, through tritonclient; here one real gRPC server checks
which path tritonclient's requests take). The wire and short paths must accept only
requests the full path accepts, decode them to the same array, and answer with the
same bytes; everything else must fall through to the next path, and in the end to the
full one, which names the problem.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import weakref
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.errors import InvalidInput
from edge.inference_service import InferenceServicer, _Plan, add_to_server, decode_input
from edge.serving import Serving, ServingModel
from protos.codec import package_from_bytes
from protos.errors import CodecError
from protos.kserve import grpc_predict_v2_pb2 as pb
from tests.edge.helpers import REPO_ROOT, make_package, run_triton

MAX_BATCH = 8


@pytest.fixture(scope="module")
def serving(mlp_model_dir: Path) -> Serving:
    serving = Serving(pool_size=2)
    serving.load(3, package_from_bytes(make_package(mlp_model_dir)))
    return serving


def plain_request(x: np.ndarray, request_id: str = "r1", **fields: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits", id=request_id, **fields)
    tensor = request.inputs.add(name="x", datatype="FP32")
    tensor.shape.extend(x.shape)
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request


def test_plain_requests_take_the_short_path_with_identical_answers(serving: Serving) -> None:
    servicer = InferenceServicer(serving, "digits", MAX_BATCH)
    rng = np.random.default_rng(0)
    for batch, extra in [
        (1, {}),
        (5, {"model_version": "3"}),
        (MAX_BATCH, {"outputs": [pb.ModelInferRequest.InferRequestedOutputTensor(name="probs")]}),
    ]:
        request = plain_request(rng.random((batch, 64), dtype=np.float32), **extra)
        before = servicer.full_path_calls
        short = servicer.ModelInfer(request, None)  # type: ignore[arg-type]
        assert servicer.full_path_calls == before  # the short path answered
        full = servicer._infer_validated(request, None)  # type: ignore[arg-type]
        assert short.SerializeToString() == full.SerializeToString()
        assert short.model_version == "3" and list(short.outputs[0].shape) == [batch, 10]


def test_anything_unusual_takes_the_full_path(serving: Serving) -> None:
    servicer = InferenceServicer(serving, "digits", MAX_BATCH)
    x = np.zeros((1, 64), np.float32)
    typed = pb.ModelInferRequest(model_name="digits")
    tensor = typed.inputs.add(name="x", datatype="FP32", shape=[1, 64])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    answer = servicer.ModelInfer(typed, None)  # type: ignore[arg-type]
    assert servicer.full_path_calls == 1
    plain = servicer.ModelInfer(plain_request(x, request_id=""), None)  # type: ignore[arg-type]
    assert servicer.full_path_calls == 1
    assert answer.SerializeToString() == plain.SerializeToString()
    plan = _Plan.of(serving.require(), "digits", MAX_BATCH)
    assert plan.decode(plain_request(x, model_version="2"), MAX_BATCH) is None
    assert plan.decode(plain_request(np.zeros((MAX_BATCH + 1, 64), np.float32)), MAX_BATCH) is None
    wrong_output = plain_request(
        x, outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]
    )
    assert plan.decode(wrong_output, MAX_BATCH) is None


MUTATIONS = (
    "input name",
    "datatype",
    "shape tail",
    "rank",
    "batch 0",
    "batch over the limit",
    "negative batch",
    "raw length",
    "no raw contents",
    "two raw contents",
    "typed contents too",
    "two inputs",
    "unknown requested output",
    "model version",
)


@st.composite
def requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A valid request with zero, one or two things made wrong."""
    batch = draw(st.integers(1, MAX_BATCH))
    data = draw(st.binary(min_size=batch * 256, max_size=batch * 256))
    request = pb.ModelInferRequest(model_name="digits", id=draw(st.text(max_size=4)))
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[batch, 64])
    request.raw_input_contents.append(data)
    if draw(st.booleans()):
        request.outputs.add(name="probs")
    if draw(st.booleans()):
        request.model_version = "3"
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)):
        if mutation == "input name":
            tensor.name = draw(st.sampled_from(["y", "", "X"]))
        elif mutation == "datatype":
            tensor.datatype = draw(st.sampled_from(["FP64", "INT32", "BOOL", "UINT8", ""]))
        elif mutation == "shape tail":
            tensor.shape[-1] = draw(st.sampled_from([0, 1, 63, 65, -1]))
        elif mutation == "rank":
            if draw(st.booleans()) or len(tensor.shape) < 2:
                tensor.shape.append(1)
            else:
                tensor.shape.pop()
        elif mutation in ("batch 0", "batch over the limit", "negative batch"):
            tensor.shape[0] = {"batch 0": 0, "batch over the limit": MAX_BATCH + 1}.get(
                mutation, -1
            )
        elif mutation == "raw length":
            del request.raw_input_contents[:]
            request.raw_input_contents.append(data + b"\0" if draw(st.booleans()) else data[:-1])
        elif mutation == "no raw contents":
            del request.raw_input_contents[:]
        elif mutation == "two raw contents":
            request.raw_input_contents.append(data)
        elif mutation == "typed contents too":
            tensor.contents.fp32_contents.extend([0.5] * (batch * 64))
        elif mutation == "two inputs":
            request.inputs.add(name="x", datatype="FP32", shape=[batch, 64])
        elif mutation == "unknown requested output":
            request.outputs.add(name="logits")
        elif mutation == "model version":
            request.model_version = draw(st.sampled_from(["2", "03", "latest"]))
    return request


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests())
def test_short_path_accepts_only_what_the_full_path_accepts(
    serving: Serving, request: pb.ModelInferRequest
) -> None:
    model = serving.require()
    fast = _Plan.of(model, "digits", MAX_BATCH).decode(request, MAX_BATCH)
    try:
        full: np.ndarray | None = decode_input(request, model.card, MAX_BATCH)
    except (InvalidInput, CodecError):
        full = None
    wanted_ok = all(o.name == "probs" for o in request.outputs)
    version_ok = request.model_version in ("", "3")
    if fast is not None:
        assert full is not None and wanted_ok and version_ok
        np.testing.assert_array_equal(fast, full)  # NaN payloads compare equal here too
        assert fast.dtype == np.float32
    elif full is not None and wanted_ok and version_ok:
        # Declining a valid request is allowed only for what the short path leaves out.
        assert request.inputs[0].HasField("contents") or len(request.raw_input_contents) != 1


def test_plain_request_bytes_take_the_wire_path_with_identical_answers(serving: Serving) -> None:
    servicer = InferenceServicer(serving, "digits", MAX_BATCH)
    rng = np.random.default_rng(2)
    for batch in (1, 2, MAX_BATCH):
        request = plain_request(rng.random((batch, 64), dtype=np.float32), request_id="")
        answer = servicer.model_infer_bytes(request.SerializeToString(), None)  # type: ignore[arg-type]
        assert servicer.parsed_calls == 0  # the wire path answered
        full = servicer._infer_validated(request, None)  # type: ignore[arg-type]
        assert answer == full.SerializeToString()
    # Anything more (here an id) is parsed, then answered by the short path.
    request = plain_request(np.zeros((1, 64), np.float32), request_id="r9")
    full_before = servicer.full_path_calls  # our own _infer_validated calls above
    answer = servicer.model_infer_bytes(request.SerializeToString(), None)  # type: ignore[arg-type]
    assert (servicer.parsed_calls, servicer.full_path_calls) == (1, full_before)
    assert pb.ModelInferResponse.FromString(answer).id == "r9"


def test_no_wire_templates_past_the_batch_limit(serving: Serving) -> None:
    plan = _Plan.of(serving.require(), "digits", MAX_BATCH)
    assert sorted(batch for batch, _ in plan.request_heads.values()) == list(
        range(1, MAX_BATCH + 1)
    )
    over = plain_request(np.zeros((MAX_BATCH + 1, 64), np.float32), request_id="")
    assert plan.decode_wire(over.SerializeToString()) is None


BYTE_EDITS = ("none", "flip", "truncate", "append", "drop")


@st.composite
def plainest_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """The plainest request (what the wire path matches), batch possibly over the limit."""
    batch = draw(st.integers(1, MAX_BATCH + 1))
    data = draw(st.binary(min_size=batch * 256, max_size=batch * 256))
    return pb.ModelInferRequest(
        model_name="digits",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[batch, 64])
        ],
        raw_input_contents=[data],
    )


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    request=st.one_of(requests(), plainest_requests()),
    edit=st.sampled_from(BYTE_EDITS),
    where=st.integers(0, 10_000),
    in_head=st.booleans(),
)
def test_wire_path_accepts_only_what_the_full_path_accepts(
    serving: Serving, request: pb.ModelInferRequest, edit: str, where: int, in_head: bool
) -> None:
    """Requests, plainest or not, with one byte edit (often in the first 40 bytes, where
    names, datatype, shape and lengths are): whatever the wire path takes must be the
    plainest well-formed request, decoded and answered exactly as the full path does."""
    model = serving.require()
    plan = _Plan.of(model, "digits", MAX_BATCH)
    edited = bytearray(request.SerializeToString())
    at = where % (min(len(edited), 40) if in_head else len(edited))
    if edit == "flip":
        edited[at] ^= 1 << (where % 8)
    elif edit == "truncate":
        del edited[at:]
    elif edit == "append":
        edited += b"\x00"
    elif edit == "drop":
        del edited[at]
    data = bytes(edited)
    x = plan.decode_wire(data)
    try:
        parsed: pb.ModelInferRequest | None = pb.ModelInferRequest.FromString(data)
    except Exception:
        parsed = None
    full: np.ndarray | None = None
    if parsed is not None:
        try:
            full = decode_input(parsed, model.card, MAX_BATCH)
        except (InvalidInput, CodecError):
            full = None
    if x is not None:
        # Whatever matched is the plainest well-formed request, decoded the same way.
        assert parsed is not None and full is not None
        assert parsed.model_name == "digits" and not (parsed.id or parsed.model_version)
        assert not parsed.outputs and not parsed.parameters
        np.testing.assert_array_equal(x, full)
        probs = model.infer(full)
        servicer = InferenceServicer(serving, "digits", MAX_BATCH)
        expected = servicer._answer(plan.version, "", "probs", probs).SerializeToString()
        assert plan.encode_wire(probs) == expected
    elif parsed is not None and full is not None:
        # Declining is allowed only for requests that differ from the plainest one.
        plainest = pb.ModelInferRequest(
            model_name="digits",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=full.shape)
            ],
            raw_input_contents=list(parsed.raw_input_contents),
        )
        assert plainest.SerializeToString() != data


def test_tritonclient_requests_take_the_wire_path(serving: Serving, tmp_path: Path) -> None:
    """tritonclient (in a subprocess: its protos clash with ours) against a real gRPC
    server registered by ``add_to_server``; garbage bytes get INVALID_ARGUMENT."""
    servicer = InferenceServicer(serving, "digits", MAX_BATCH)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        rng = np.random.default_rng(3)
        xs = [rng.random((batch, 64), dtype=np.float32) for batch in (1, 3)]
        calls: list[dict[str, Any]] = [{"op": "live"}, {"op": "model_metadata", "name": "digits"}]
        for i, x in enumerate(xs):
            np.save(tmp_path / f"x{i}.npy", x)
            calls.append({"op": "infer", "x": str(tmp_path / f"x{i}.npy")})
        calls.append({"op": "infer", "x": str(tmp_path / "x0.npy"), "id": "with-id"})
        live, meta, *infers = run_triton(f"127.0.0.1:{port}", calls, tmp_path)
        assert live == {"ok": True, "value": True}
        assert meta["ok"] and meta["value"]["versions"] == ["3"]
        model = serving.require()
        for got, x in zip(infers, [*xs, xs[0]], strict=True):
            assert got["ok"] and got["model_version"] == "3"
            np.testing.assert_array_equal(np.array(got["probs"], np.float32), model.infer(x))
        assert infers[-1]["id"] == "with-id"
        # Only the request with an id needed parsing.
        assert (servicer.parsed_calls, servicer.full_path_calls) == (1, 0)

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            with pytest.raises(grpc.RpcError) as caught:
                call(b"\xff\xff\xff", timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid ModelInferRequest" in (caught.value.details() or "")
            # The service still answers.
            plain = plain_request(xs[0], request_id="").SerializeToString()
            reply = pb.ModelInferResponse.FromString(call(plain, timeout=10))
            assert reply.model_version == "3"
    finally:
        server.stop(None)


def test_pool_never_shares_an_interpreter(serving: Serving) -> None:
    model: ServingModel = serving.require()
    rng = np.random.default_rng(1)
    inputs = [rng.random((1 + i % 4, 64), dtype=np.float32) for i in range(60)]
    expected = [model.infer(x) for x in inputs]
    wrong: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def hammer(offset: int) -> None:
        start.wait()
        try:
            for round_ in range(5):
                for i in range(len(inputs)):
                    k = (i + offset + round_) % len(inputs)
                    if not np.array_equal(model.infer(inputs[k]), expected[k]):
                        wrong.append(k)
        except BaseException as exc:  # reported below, not swallowed
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n * 7,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not wrong
    assert all(not lock.locked() for lock, _ in model._slots)


def test_a_replaced_version_is_not_kept_alive_by_the_short_path(mlp_model_dir: Path) -> None:
    package = package_from_bytes(make_package(mlp_model_dir))
    serving = Serving(pool_size=1)
    servicer = InferenceServicer(serving, "digits", MAX_BATCH)
    x = np.zeros((1, 64), np.float32)
    old = weakref.ref(serving.load(1, package))
    assert servicer.ModelInfer(plain_request(x), None).model_version == "1"  # type: ignore[arg-type]
    serving.load(2, package)
    assert servicer._plan is not None and servicer._plan.version == "2"  # built at the swap
    gc.collect()
    assert old() is None  # the cached plan does not hold version 1's interpreters
    assert servicer.ModelInfer(plain_request(x), None).model_version == "2"  # type: ignore[arg-type]
    assert servicer.full_path_calls == 0


def test_litert_settings_reach_serving_and_training_interpreters(
    mlp_model_dir: Path, tmp_path: Path
) -> None:
    """``[litert] threads`` and ``delegate`` reach every interpreter the node builds."""
    from edge.config import load_settings
    from edge.node import EdgeNode
    from tests.edge.helpers import write_config

    package = tmp_path / "digits.pkg"
    package.write_bytes(make_package(mlp_model_dir))
    config = write_config(
        tmp_path / "edge.toml",
        {
            "device": {"id": "t-1", "data_dir": "state"},
            "grpc": {"serving_threads": 2},
            "litert": {"threads": 3, "delegate": "none"},
            "model": {"initial_package": str(package)},
        },
    )
    node = EdgeNode(load_settings(config, env={}))
    node.start()
    model = node.serving.require()
    assert [(m.num_threads, m.delegate) for _, m in model._slots] == [(3, "none"), (3, "none")]
    trainer = node.trainer._interpreter(model)
    assert (trainer.num_threads, trainer.delegate) == (3, "none")
    # Reference kernels on 3 threads answer like XNNPACK on 1, and training runs on them.
    x = np.random.default_rng(4).random((trainer.train_batch, 64), dtype=np.float32)
    reference = Serving(pool_size=1, num_threads=1).build(1, model.package).infer(x)
    np.testing.assert_allclose(model.infer(x), reference, rtol=1e-5, atol=1e-6)
    loss, _ = trainer.train_step(x, np.arange(trainer.train_batch) % 10, lr=0.1)
    assert np.isfinite(loss) and loss > 0
    with pytest.raises(ValueError, match="delegate must be one of"):
        Serving(delegate="gpu")


@pytest.mark.parametrize("delegate", ["xnnpack", "none"])
def test_litert_delegate_decides_whether_xnnpack_is_created(
    mlp_model_dir: Path, delegate: str
) -> None:
    """LiteRT logs the creation of its XNNPACK delegate to stderr (C++ logging, so a
    child process); with ``none`` it must not be created at all."""
    code = (
        "import sys; from edge.litert_model import LiteRTModel; "
        "LiteRTModel.load(sys.argv[1], delegate=sys.argv[2]).infer([[0.0] * 64])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(mlp_model_dir), delegate],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert ("XNNPACK delegate" in proc.stderr) == (delegate == "xnnpack"), proc.stderr
