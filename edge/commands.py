"""``edgefl edge ...`` commands: ``serve`` and ``data load-digits``.

``edgefl edge data load-digits`` loads one partition of the digits training set into
a device. It talks to the device's **running** LocalData service (its local socket,
``data_dir/run/local.sock``, so it must run as the device's user), replacing nothing: the samples are
appended, so run ``--clear`` first for a fresh partition. With ``--direct`` it writes
the sample store on disk instead, which is only safe while the device is stopped; the
sample shape then comes from the stored model's card.

Heavy modules (gRPC, LiteRT, scikit-learn) are imported inside the command functions.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Literal

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``edge`` command group to ``subparsers``."""
    edge = subparsers.add_parser("edge", help="run and feed the device services")
    edge_sub = edge.add_subparsers(dest="edge_command", metavar="COMMAND", required=True)

    serve = edge_sub.add_parser(
        "serve",
        help="run the device gRPC services (Inference, Trainer, LocalData) until SIGTERM",
    )
    serve.add_argument("--config", help="settings file (TOML); EDGEFL_* variables override it")
    serve.add_argument("--only", choices=("inference", "trainer", "data"), help="run one service")
    serve.set_defaults(func=_run_serve)

    up = edge_sub.add_parser(
        "up",
        help="run everything a device runs: the services, the MQTT agent and the Flower SuperNode",
    )
    up.add_argument("--config", required=True, help="the device's settings file (edge.toml)")
    up.set_defaults(func=_run_up)

    data = edge_sub.add_parser("data", help="manage the device's local samples")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    load = data_sub.add_parser(
        "load-digits", help="load one partition of the digits training set into the device"
    )
    load.add_argument("--config", required=True, help="the device's settings file")
    load.add_argument("--partition", required=True, help="I/N: partition I (0-based) of N")
    load.add_argument(
        "--dirichlet", type=float, metavar="ALPHA", help="non-IID split (default IID)"
    )
    load.add_argument("--seed", type=int, default=0, help="partition seed (default 0)")
    load.add_argument("--clear", action="store_true", help="remove stored samples first")
    load.add_argument(
        "--direct", action="store_true", help="write the store on disk (device must be stopped)"
    )
    load.set_defaults(func=_run_load_digits)


def _run_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edge.errors import ConfigError
    from edge.server import BindError, run_serve

    args.config = Path(args.config) if args.config else None
    try:
        return run_serve(args)
    except (BindError, ConfigError) as exc:
        print(f"edgefl edge serve: {exc}", file=sys.stderr)
        return 2


def _run_up(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edge.errors import ConfigError
    from edge.supervisor import run_up

    try:
        return run_up(Path(args.config))
    except ConfigError as exc:
        print(f"edgefl edge up: {exc}", file=sys.stderr)
        return 2


def parse_partition(text: str) -> tuple[int, int]:
    """``"2/5"`` → ``(2, 5)``; ``ValueError`` unless ``0 <= i < n``."""
    left, sep, right = text.partition("/")
    if not sep:
        raise ValueError(f"partition must look like I/N, got {text!r}")
    index, count = int(left), int(right)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"partition {text!r}: need 0 <= I < N")
    return index, count


def _run_load_digits(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edge.config import load_settings
    from edge.errors import EdgeError

    try:
        index, count = parse_partition(args.partition)
        settings = load_settings(Path(args.config))
    except (ValueError, EdgeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.direct:
            result = _load_direct(settings, index, count, args)
        else:
            result = _load_via_grpc(settings, index, count, args)
    except (EdgeError, OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result)
    return 0


def _partition(
    input_shape: tuple[int, ...], index: int, count: int, args: argparse.Namespace
) -> Any:
    from devices.datasets import device_partitions, load_digits

    layout: Literal["flat", "image"] = "flat" if tuple(input_shape) == (64,) else "image"
    dataset = load_digits(layout=layout, seed=args.seed)
    scheme: Literal["iid", "dirichlet"] = "iid" if args.dirichlet is None else "dirichlet"
    parts = device_partitions(
        dataset, count, scheme=scheme, alpha=args.dirichlet or 0.5, seed=args.seed
    )
    return parts[index]


def _load_direct(settings: Any, index: int, count: int, args: argparse.Namespace) -> str:
    from edge.errors import ModelNotLoaded
    from edge.local_data import LocalData, SampleSpec
    from edge.model_card import ModelCard
    from edge.model_store import ModelStore

    stored = ModelStore(settings.device.data_dir / "models").current()
    if stored is None:
        raise ModelNotLoaded("the device has no model yet, so the sample shape is unknown")
    card = ModelCard.from_json(stored.package().card_json)
    data = LocalData(
        settings.device.data_dir / "samples",
        capacity=settings.data.capacity,
        spec=SampleSpec(card.input_shape, card.classes),
    )
    if args.clear:
        data.clear()
    part = _partition(card.input_shape, index, count, args)
    result = data.append(part.x, part.y)
    return f"appended {result.accepted} samples ({result.evicted} evicted), {result.total} stored"


def _load_via_grpc(settings: Any, index: int, count: int, args: argparse.Namespace) -> str:
    import grpc

    from protos import codec
    from protos.edgefl.v1 import local_data_pb2, local_data_pb2_grpc

    sock = settings.local_socket
    if not sock.exists():
        raise RuntimeError(f"no running device found (no socket {sock}); start it or use --direct")
    address = f"unix:{sock.resolve()}"
    with grpc.insecure_channel(address) as channel:
        stub = local_data_pb2_grpc.LocalDataStub(channel)
        try:
            if args.clear:
                stub.Clear(local_data_pb2.ClearRequest(), timeout=30)
            stats = stub.Stats(local_data_pb2.StatsRequest(), timeout=30)
            if not stats.input_shape:
                raise RuntimeError("the device has no model yet, so the sample shape is unknown")
            part = _partition(tuple(stats.input_shape), index, count, args)
            total = evicted = 0
            step = 500
            for start in range(0, len(part), step):
                reply = stub.Append(
                    local_data_pb2.AppendRequest(
                        x=codec.tensor_to_proto("x", part.x[start : start + step]),
                        y=codec.tensor_to_proto("y", part.y[start : start + step]),
                    ),
                    timeout=60,
                )
                evicted += reply.evicted
                total = reply.total
        except grpc.RpcError as exc:
            raise RuntimeError(
                f"LocalData at {address}: {exc.code().name}: {exc.details()}"
            ) from exc
    return f"appended {len(part)} samples ({evicted} evicted), {total} stored"
