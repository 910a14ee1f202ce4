"""Our inference proto is wire-compatible with the Open Inference Protocol as tritonclient ships it.

tritonclient registers its own descriptors for package ``inference``; loading both
into one process conflicts in protobuf's descriptor pool, so each side is described
in its own subprocess and the descriptions are compared here. A second test sends a
request serialized by tritonclient's own messages to a real gRPC stub servicer of
ours running in another process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

DESCRIBE = textwrap.dedent(
    """
    import json, sys
    from google.protobuf import descriptor
    mod = __import__(sys.argv[1], fromlist=["DESCRIPTOR"])
    names = json.loads(sys.argv[2])
    out = {}
    def describe(d):
        fields = {f.name: [f.number, f.type, f.label if not f.is_repeated else 3,
                           f.message_type.full_name if f.message_type else ""]
                  for f in d.fields}
        out[d.full_name] = fields
        for nested in d.nested_types:
            describe(nested)
    pool_file = mod.DESCRIPTOR
    for name in names:
        describe(pool_file.pool.FindMessageTypeByName(name))
    svc = pool_file.pool.FindServiceByName("inference.GRPCInferenceService")
    out["__service__"] = {m.name: [m.input_type.full_name, m.output_type.full_name] for m in svc.methods}
    print(json.dumps(out))
    """
)

MESSAGES = [
    "inference.ServerLiveRequest",
    "inference.ServerLiveResponse",
    "inference.ServerReadyRequest",
    "inference.ServerReadyResponse",
    "inference.ModelReadyRequest",
    "inference.ModelReadyResponse",
    "inference.ServerMetadataRequest",
    "inference.ServerMetadataResponse",
    "inference.ModelMetadataRequest",
    "inference.ModelMetadataResponse",
    "inference.ModelInferRequest",
    "inference.ModelInferResponse",
    "inference.InferParameter",
    "inference.InferTensorContents",
]


def describe(module: str) -> dict[str, dict[str, list[object]]]:
    res = subprocess.run(
        [sys.executable, "-c", DESCRIBE, module, json.dumps(MESSAGES)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_messages_and_service_match_tritonclient() -> None:
    ours = describe("protos.kserve.grpc_predict_v2_pb2")
    theirs = describe("tritonclient.grpc.service_pb2")
    for name in ours:
        if name == "__service__":
            continue
        assert name in theirs, f"{name} missing from the published protocol"
        for field, spec in ours[name].items():
            assert theirs[name].get(field) == spec, (
                f"{name}.{field}: ours {spec}, published {theirs[name].get(field)}"
            )
    # Every field the published protocol has on these messages, we have too
    # (Triton-only extensions live in other messages).
    for name, fields in theirs.items():
        if name == "__service__" or name not in ours:
            continue
        assert set(fields) <= set(ours[name]), f"{name}: we lack {set(fields) - set(ours[name])}"
    for method, types in ours["__service__"].items():
        assert theirs["__service__"][method] == types


STUB_SERVER = textwrap.dedent(
    """
    import sys
    from concurrent import futures
    import grpc
    from protos.kserve import grpc_predict_v2_pb2 as pb, grpc_predict_v2_pb2_grpc as pbg

    class Stub(pbg.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):
            return pb.ServerLiveResponse(live=True)
        def ModelInfer(self, request, context):
            # Echo back what we decoded so the client can check every field crossed intact.
            t = request.inputs[0]
            return pb.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id,
                outputs=[pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)],
                raw_output_contents=list(request.raw_input_contents),
            )

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pbg.add_GRPCInferenceServiceServicer_to_server(Stub(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(0)
    """
)


def test_tritonclient_talks_to_our_stub_servicer() -> None:
    pytest.importorskip  # noqa: B018 - tritonclient is a dev dependency, always present
    server = subprocess.Popen(
        [sys.executable, "-c", STUB_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        client = textwrap.dedent(
            f"""
            import numpy as np
            import tritonclient.grpc as tc
            c = tc.InferenceServerClient("127.0.0.1:{port}")
            assert c.is_server_live()
            x = np.arange(12, dtype=np.float32).reshape(3, 4)
            inp = tc.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            r = c.infer("digits", [inp], model_version="7", request_id="req-1")
            resp = r.get_response()
            assert resp.model_name == "digits" and resp.model_version == "7" and resp.id == "req-1", resp
            assert np.array_equal(r.as_numpy("x"), x)
            print("ok")
            """
        )
        res = subprocess.run(
            [sys.executable, "-c", client], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "ok"
    finally:
        server.kill()
        server.wait(timeout=10)
