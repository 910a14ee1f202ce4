"""Helpers for the edge tests: packages, config files, server subprocesses, crash writers.

Also a small command line (``python -m tests.edge.helpers ...``) for the programs the
tests run as real subprocesses: a model-store writer and a sample appender that get
SIGKILLed, and an edge server that performs hot swaps on cue.

tritonclient registers its protos in package ``inference`` like our ``protos.kserve``;
one process cannot load both. The test process loads ours (in-process servers), so every
tritonclient call runs in a subprocess: ``triton-calls`` runs a JSON list of client
calls and writes their outcomes as JSON; ``triton-load`` runs inference threads until
told to stop. This module imports neither at import time.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge.process import ManagedProcess, ProcessError

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_RE = re.compile(r"edgefl edge: serving on (\S+):(\d+)")


# -- packages ---------------------------------------------------------------------------


def model_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """The initial weights of the built model."""
    from edge.litert_model import LiteRTModel

    return LiteRTModel.load(model_dir).get_weights()


def perturbed(
    weights: dict[str, np.ndarray], seed: int, scale: float = 0.5
) -> dict[str, np.ndarray]:
    """A different but valid weight set (seeded noise added)."""
    rng = np.random.default_rng(seed)
    return {
        name: (w + rng.normal(0.0, scale, size=w.shape)).astype(np.float32)
        for name, w in weights.items()
    }


def make_package(model_dir: Path, weights: dict[str, np.ndarray] | None = None) -> bytes:
    """ModelPackage bytes for the built model with ``weights`` (its initial ones if None)."""
    from edge.model_card import ModelCard
    from protos.codec import ModelPackage, package_to_bytes

    card = ModelCard.load(model_dir / "card.json")
    if weights is None:
        weights = model_weights(model_dir)
    pkg = ModelPackage(
        architecture_id=card.architecture_id,
        tflite=(model_dir / "model.tflite").read_bytes(),
        card_json=card.to_json(),
        weights=weights,
    )
    return package_to_bytes(pkg)


# -- config -----------------------------------------------------------------------------


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write a TOML settings file from ``{section: {key: value}}`` (valid or not)."""
    from edge.settings import toml_value

    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def device_config(
    tmp_path: Path,
    *,
    initial_package: Path | None = None,
    grpc: dict[str, Any] | None = None,
    name: str = "edge.toml",
    data_dir: Path | None = None,
) -> Path:
    """A device settings file in ``tmp_path`` (port 0, data under ``tmp_path/data``)."""
    sections: dict[str, dict[str, Any]] = {
        "device": {"id": "test-device", "data_dir": str(data_dir or tmp_path / "data")},
        "grpc": {"port": 0, "drain_delay_s": 0.5, "grace_s": 2.0, **(grpc or {})},
    }
    if initial_package is not None:
        sections["model"] = {"initial_package": str(initial_package)}
    return write_config(tmp_path / name, sections)


# -- subprocesses -----------------------------------------------------------------------


def start_process(name: str, argv: list[str], log: Path) -> ManagedProcess:
    """Start ``argv`` (a Python module run) from the repo root, logging to ``log``."""
    proc = ManagedProcess(
        name, argv, log_path=log, cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT)}
    )
    return proc.start()


def wait_for_line(
    proc: ManagedProcess, pattern: re.Pattern[str], timeout: float = 60.0
) -> re.Match[str]:
    """Wait until ``pattern`` appears in the process log; return the match."""
    found: list[re.Match[str]] = []

    def ready() -> bool:
        try:
            text = proc.log_path.read_text(errors="replace")
        except OSError:
            return False
        match = pattern.search(text)
        if match:
            found.append(match)
        return match is not None

    try:
        proc.wait_until(ready, timeout=timeout, what=f"printing {pattern.pattern!r}")
    except ProcessError:
        if not ready():  # it may have printed the line and exited between two polls
            raise
    return found[-1]


def start_edge_server(config: Path, log: Path, *extra: str) -> tuple[ManagedProcess, str]:
    """Run ``python -m edge.server --config CONFIG``; return it and ``host:port`` once ready."""
    proc = start_process(
        "edge-server",
        [sys.executable, "-m", "edge.server", "--config", str(config), "-v", *extra],
        log,
    )
    try:
        match = wait_for_line(proc, READY_RE)
    except BaseException:
        proc.stop()
        raise
    return proc, f"{match.group(1)}:{match.group(2)}"


# -- programs run as subprocesses ----------------------------------------------------------


def _store_writer(root: str, package_file: str) -> None:
    """Install many versions back to back (bytes differ per version) until killed."""
    from edge.model_store import ModelStore
    from protos.codec import sha256_hex

    base = Path(package_file).read_bytes()
    store = ModelStore(Path(root), keep=2)
    version = max(store.versions(), default=0)
    while True:
        version += 1
        # Pad each version to a large, distinct artifact so that writes take a while.
        data = base + version.to_bytes(8, "little") * (1 << 17)
        store.install(version, data, sha256_hex(data))
        print(f"installed {version}", flush=True)


def _sample_appender(root: str, batch: int) -> None:
    """Append batches whose values encode their index until killed; print each ack."""
    from edge.local_data import LocalData, SampleSpec

    data = LocalData(Path(root), capacity=10**7, spec=SampleSpec((64,), 10))
    start = len(data)
    while True:
        idx = np.arange(start, start + batch)
        x = np.repeat(idx[:, None].astype(np.float32), 64, axis=1)
        y = (idx % 10).astype(np.int32)
        data.append(x, y)
        start += batch
        print(f"acked {start}", flush=True)


def _swap_server(
    config: str, packages_dir: str, swaps: int, interval: float, log_file: str
) -> None:
    """Serve, then on ``packages_dir/go`` install ``swaps`` releases; log swap times as JSON."""
    import logging

    from edge.config import load_settings
    from edge.server import READY_LINE, EdgeServer
    from protos.codec import sha256_hex

    logging.basicConfig(level=logging.WARNING)
    settings = load_settings(Path(config))
    server = EdgeServer(settings)
    port = server.start()
    print(READY_LINE.format(host=settings.grpc.host, port=port), flush=True)
    pkgs = Path(packages_dir)
    blobs = {name: (pkgs / f"{name}.pkg").read_bytes() for name in ("a", "b")}
    while not (pkgs / "go").exists():
        time.sleep(0.05)
    events = []
    for i in range(swaps):
        version = server.node.serving_version() + 1
        blob = blobs["a" if version % 2 == 1 else "b"]
        before = time.monotonic()
        server.node.install_release(version, blob, sha256_hex(blob))
        after = time.monotonic()
        events.append({"version": version, "before": before, "after": after})
        time.sleep(interval if i < swaps - 1 else 0)
    Path(log_file).write_text(json.dumps(events))
    print("swaps done", flush=True)
    while True:
        time.sleep(1)


def _enospc(root: str) -> None:
    """On a tiny filesystem: install a small version, then one too big; report as JSON."""
    from edge.errors import InstallError
    from edge.model_store import ModelStore
    from protos.codec import sha256_hex

    store = ModelStore(Path(root))
    small = b"small package" * 1000
    store.install(1, small, sha256_hex(small))
    big = bytes(range(256)) * 4096  # 1 MiB, more than the filesystem holds
    outcome: dict[str, Any] = {}
    try:
        store.install(2, big, sha256_hex(big))
        outcome["error"] = None
    except InstallError as exc:
        outcome["error"] = str(exc)
    reopened = ModelStore(Path(root))
    current = reopened.current()
    outcome["current"] = None if current is None else current.version
    outcome["current_ok"] = current is not None and current.data == small
    outcome["versions"] = reopened.versions()
    outcome["files"] = sorted(p.name for p in Path(root).iterdir())
    print("RESULT " + json.dumps(outcome), flush=True)


def run_triton(address: str, calls: list[dict[str, Any]], workdir: Path) -> list[dict[str, Any]]:
    """Run tritonclient calls in a client subprocess; return their outcomes in order."""
    spec, out = workdir / "calls.json", workdir / "outcomes.json"
    spec.write_text(json.dumps(calls))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.edge.helpers", "triton-calls", address, str(spec), str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"triton client failed:\n{proc.stdout}\n{proc.stderr}"
    return list(json.loads(out.read_text()))


def _triton_call(client: Any, address: str, call: dict[str, Any]) -> dict[str, Any]:
    """One tritonclient call described by ``call``; returns what happened."""
    import grpc
    import tritonclient.grpc as tc
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    from tritonclient.utils import InferenceServerException

    op = call["op"]
    try:
        if op == "live":
            return {"ok": True, "value": client.is_server_live()}
        if op == "ready":
            return {"ok": True, "value": client.is_server_ready()}
        if op == "model_ready":
            return {
                "ok": True,
                "value": client.is_model_ready(call["name"], call.get("version", "")),
            }
        if op == "server_metadata":
            return {"ok": True, "value": client.get_server_metadata(as_json=True)}
        if op == "model_metadata":
            return {"ok": True, "value": client.get_model_metadata(call["name"], as_json=True)}
        if op == "infer":
            x = np.load(call["x"])
            inp = tc.InferInput(call.get("input", "x"), list(x.shape), call.get("datatype", "FP32"))
            inp.set_data_from_numpy(x)
            outputs = [tc.InferRequestedOutput(n) for n in call.get("outputs", [])] or None
            result = client.infer(
                call.get("name", "digits"),
                [inp],
                model_version=call.get("version", ""),
                outputs=outputs,
                request_id=call.get("id", ""),
            )
            response = result.get_response()
            probs = result.as_numpy("probs")
            return {
                "ok": True,
                "model_name": response.model_name,
                "model_version": response.model_version,
                "id": response.id,
                "dtype": str(probs.dtype),
                "probs": probs.tolist(),
            }
        if op == "raw":
            # A hand-built request with tritonclient's own messages and stub.
            request = service_pb2.ModelInferRequest(model_name=call.get("name", "digits"))
            for spec in call["inputs"]:
                tensor = request.inputs.add(
                    name=spec["name"], datatype=spec["datatype"], shape=spec["shape"]
                )
                if "fp32_contents" in spec:
                    tensor.contents.fp32_contents.extend(spec["fp32_contents"])
            for raw in call.get("raw", []):
                request.raw_input_contents.append(bytes.fromhex(raw))
            with grpc.insecure_channel(address) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                reply = stub.ModelInfer(request, timeout=30)
            probs = np.frombuffer(reply.raw_output_contents[0], dtype="<f4")
            shape = list(reply.outputs[0].shape)
            return {
                "ok": True,
                "model_version": reply.model_version,
                "probs": probs.reshape(shape).tolist(),
            }
    except InferenceServerException as exc:
        return {"ok": False, "status": exc.status(), "message": exc.message()}
    except grpc.RpcError as exc:
        return {"ok": False, "status": str(exc.code()), "message": exc.details()}
    raise SystemExit(f"unknown call {op!r}")


def _triton_calls(address: str, spec_file: str, out_file: str) -> None:
    import tritonclient.grpc as tc

    calls = json.loads(Path(spec_file).read_text())
    client = tc.InferenceServerClient(address)
    try:
        results = [_triton_call(client, address, call) for call in calls]
    finally:
        client.close()
    Path(out_file).write_text(json.dumps(results))


def _triton_load(address: str, batches_file: str, stop_file: str, out_file: str) -> None:
    """One tritonclient thread per batch in ``batches_file`` infers until ``stop_file`` exists."""
    import threading

    import tritonclient.grpc as tc

    batches = dict(np.load(batches_file))
    replies: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = Path(stop_file)

    def worker(key: str) -> None:
        x = batches[key]
        client = tc.InferenceServerClient(address)
        try:
            while not stop.exists():
                inp = tc.InferInput("x", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                sent = time.monotonic()
                result = client.infer("digits", [inp])
                received = time.monotonic()
                reply = {
                    "batch": key,
                    "sent": sent,
                    "received": received,
                    "version": int(result.get_response().model_version),
                    "probs": result.as_numpy("probs").tolist(),
                }
                with lock:
                    replies.append(reply)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(key,)) for key in batches]
    for t in threads:
        t.start()
    print("load running", flush=True)
    for t in threads:
        t.join()
    Path(out_file).write_text(json.dumps({"replies": replies, "errors": errors}))
    print("load done", flush=True)


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "store-writer":
        _store_writer(args[0], args[1])
    elif command == "sample-appender":
        _sample_appender(args[0], int(args[1]))
    elif command == "triton-calls":
        _triton_calls(args[0], args[1], args[2])
    elif command == "triton-load":
        _triton_load(args[0], args[1], args[2], args[3])
    elif command == "enospc":
        _enospc(args[0])
    elif command == "swap-server":
        _swap_server(args[0], args[1], int(args[2]), float(args[3]), args[4])
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
