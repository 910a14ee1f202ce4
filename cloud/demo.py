"""``edgefl demo``: the whole system on one machine.

Starts Mosquitto, the cloud (SuperLink, registry on SQLite, web UI), N emulated
devices with non-IID partitions of the digits data, runs R federated rounds with a
progress line per round, and prints accuracy per round, how far the newest model has
spread, and the UI's URL. It keeps running until Ctrl-C, or exits by itself with
``--exit-when-done``. Everything it started is stopped on the way out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from protos import wire_keys as keys

logger = logging.getLogger(__name__)

DEFAULT_DEVICES = 5
DEFAULT_ROUNDS = 10


def _print(text: str = "") -> None:
    print(text, flush=True)


def run_demo(args: argparse.Namespace) -> int:
    from cloud import config as cloud_config
    from cloud.commands import SPREAD_WAIT_S, progress_line, wait_for_spread
    from cloud.supervisor import CloudStack, init_cloud, read_token
    from devices.emulate import EmulatedFleet, stack_fleet_spec

    work = Path(args.dir).resolve()
    started = time.monotonic()
    conf = work / "cloud.toml"
    if not conf.exists():
        _print(f"==> preparing the cloud in {work} (builds the LiteRT model once)")
        init_cloud(
            work,
            fleet="demo",
            arch=args.arch,
            model_dir=None if args.model_dir is None else Path(args.model_dir),
        )
    settings = cloud_config.load(conf)
    settings.run = dataclasses.replace(
        settings.run, num_rounds=args.rounds, min_nodes=args.devices, wait_for_nodes_s=120.0
    )
    from cloud.cloud_lock import CloudRunningError, running_cloud

    holder = running_cloud(settings.data_dir)
    if holder is not None:
        # Before --fresh deletes anything: the data dir belongs to a running cloud.
        print(f"edgefl demo: {CloudRunningError(holder, settings.data_dir)}", file=sys.stderr)
        return 1
    if args.fresh:
        for stale in ("registry.db", "registry.db-wal", "registry.db-shm"):
            (settings.data_dir / stale).unlink(missing_ok=True)
        for stale_dir in ("broker", "superlink"):
            shutil.rmtree(settings.data_dir / stale_dir, ignore_errors=True)
    # Emulated devices are ephemeral: every demo boots them fresh from the initial model.
    shutil.rmtree(work / "devices", ignore_errors=True)

    stack = CloudStack(settings, num_rounds=args.rounds)
    fleet: EmulatedFleet | None = None
    try:
        _print("==> starting Mosquitto, the Flower SuperLink, the registry and the web UI")
        stack.start()
        _print(
            f"    web UI: {stack.web.url}   (operator token in {settings.web.operator_token_file})"
        )
        spec = stack_fleet_spec(
            settings,
            stack,
            scheme="iid" if args.iid else "dirichlet",
            alpha=args.alpha,
            seed=args.seed,
        )
        fleet = EmulatedFleet(spec, work / "devices", args.devices)
        counts = fleet.prepare()
        _print(
            f"==> starting {args.devices} emulated devices (digits samples per device: {counts})"
        )
        fleet.start()
        _print(f"==> running {args.rounds} federated rounds")
        before = stack.registry.latest_run()
        stack.submit_run()
        printer = RoundPrinter(stack.registry, before, args.rounds)
        show = printer.show

        status = stack.wait_for_run(on_progress=show, timeout=args.timeout)
        show()
        # Give the last release a moment to reach every device, then report the spread.
        wait_for_spread(stack.registry, timeout=SPREAD_WAIT_S)
        latest = stack.registry.latest_version()
        _print(f"==> run {status} in {time.monotonic() - started:.0f}s")
        _print(f"    {progress_line(stack.registry, args.rounds, before=before)}")
        if latest is not None:
            spread = stack.registry.spread(latest.version)
            _print(
                f"    version {latest.version} is served by {spread['serving']} of {spread['online']} online devices"
            )
        _print(f"    web UI: {stack.web.url}")
        summary = _summary(stack, args, time.monotonic() - started, status, before)
        (work / "demo-summary.json").write_text(json.dumps(summary, indent=2))
        if args.exit_when_done:
            return 0 if status == "finished:completed" else 1
        _print("==> the fleet keeps serving; press Ctrl-C to stop everything")
        token = read_token(settings)
        if token:
            _print(f"    operator token for pin/rollback in the UI: {token}")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from cloud.commands import EXIT_INTERRUPTED

        _print("\n==> stopping")
        return EXIT_INTERRUPTED
    finally:
        if fleet is not None:
            fleet.stop()
        stack.stop()


class RoundPrinter:
    """Prints each finished round of this demo's run once (never an earlier run's)."""

    def __init__(self, registry: Any, before: Any, num_rounds: int) -> None:
        self.registry = registry
        self.before = before
        self.num_rounds = num_rounds
        self.shown: set[tuple[int, int]] = set()

    def lines(self) -> list[str]:
        from cloud.commands import own_run

        run = own_run(self.registry, self.before)
        if run is None:
            return []
        out = []
        for r in self.registry.list_rounds(run.id):
            if not r.finished or (run.id, r.round) in self.shown:
                continue
            self.shown.add((run.id, r.round))
            acc = r.eval_metrics.get(keys.EVAL_ACCURACY) if r.eval_metrics else None
            acc_text = "-" if acc is None else f"{acc:.3f}"
            who = f"{len(r.replied)}/{len(r.sampled)} devices" if r.round else "initial model"
            dropped = f", dropped {', '.join(r.dropped)}" if r.dropped else ""
            out.append(
                f"    round {r.round:>2}/{self.num_rounds}: accuracy {acc_text}  "
                f"({who}{dropped}, version {r.version})"
            )
        return out

    def show(self) -> None:
        for line in self.lines():
            _print(line)


def _summary(
    stack: Any, args: argparse.Namespace, seconds: float, status: str, before: Any = None
) -> dict[str, Any]:
    from cloud.commands import own_run

    run = own_run(stack.registry, before)
    rounds = [] if run is None else stack.registry.list_rounds(run.id)
    return {
        "devices": args.devices,
        "rounds": args.rounds,
        "status": status,
        "seconds": round(seconds, 1),
        "accuracy_per_round": {
            r.round: r.eval_metrics.get(keys.EVAL_ACCURACY) for r in rounds if r.eval_metrics
        },
        "newest_version": None
        if stack.registry.latest_version() is None
        else stack.registry.latest_version().version,
    }


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "demo", help="broker, cloud, emulated devices and the UI on this machine"
    )
    p.add_argument(
        "--devices",
        type=int,
        default=DEFAULT_DEVICES,
        help=f"emulated devices (default {DEFAULT_DEVICES})",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help=f"federated rounds (default {DEFAULT_ROUNDS})",
    )
    p.add_argument("--dir", default="demo-work", help="working directory (default ./demo-work)")
    p.add_argument("--arch", choices=("mlp", "cnn"), default="mlp")
    p.add_argument("--model-dir", help="use an already built model directory")
    p.add_argument("--iid", action="store_true", help="IID partitions instead of Dirichlet non-IID")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="forget earlier demo runs (registry) first")
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="give up on the run after this many seconds"
    )
    p.add_argument(
        "--exit-when-done", action="store_true", help="stop everything when the run ends"
    )
    p.set_defaults(func=lambda a: run_demo(a) if a.devices > 0 and a.rounds > 0 else _bad(a))


def _bad(_args: argparse.Namespace) -> int:
    print("edgefl demo: --devices and --rounds must be positive", file=sys.stderr)
    return 2
