"""``edgefl cloud …`` commands: init, up, status, model list/pin."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("cloud.toml")


def _load(args: argparse.Namespace) -> Any:
    from cloud import config as cloud_config

    return cloud_config.load(Path(args.config))


def cmd_init(args: argparse.Namespace) -> int:
    from cloud.supervisor import CloudError, init_cloud

    try:
        path = init_cloud(
            Path(args.dir),
            fleet=args.fleet,
            arch=args.arch,
            secure=args.secure,
            hosts=args.host or None,
            force=args.force,
            model_dir=None if args.model_dir is None else Path(args.model_dir),
            broker_port=args.broker_port,
            superlink_port=args.superlink_port,
        )
    except CloudError as exc:
        print(f"edgefl cloud init: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    print(f"start the aggregator with: edgefl cloud up --config {path}")
    return 0


def progress_line(registry: Any, num_rounds: int) -> str:
    run = registry.latest_run()
    if run is None:
        return "waiting for the run to start"
    rounds = registry.list_rounds(run.id)
    done = [r for r in rounds if r.finished and r.round > 0]
    current = max((r.round for r in rounds), default=0)
    latest = registry.latest_version()
    parts = [f"run {run.id} {run.status}", f"round {current}/{run.num_rounds or num_rounds}"]
    if done:
        last = max(done, key=lambda r: r.round)
        acc = last.eval_metrics.get("eval-accuracy") if last.eval_metrics else None
        if acc is not None:
            parts.append(f"accuracy {acc:.3f}")
        parts.append(f"replied {len(last.replied)}/{len(last.sampled)}")
    if latest is not None:
        spread = registry.spread(latest.version)
        parts.append(f"v{latest.version} on {spread['serving']}/{spread['online']} online devices")
    return " | ".join(parts)


#: After a run, how long `cloud up` waits for the last release to reach the online devices.
SPREAD_WAIT_S = 30.0


def wait_for_spread(registry: Any, *, timeout: float) -> bool:
    """Wait until every online device reports the newest version (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = registry.latest_version()
        if latest is None:
            return True
        spread = registry.spread(latest.version)
        if spread["serving"] >= spread["online"]:
            return True
        time.sleep(0.5)
    return False


def cmd_up(args: argparse.Namespace) -> int:
    from cloud.supervisor import CloudStack

    settings = _load(args)
    stack = CloudStack(settings, num_rounds=args.rounds)
    try:
        stack.start()
        print(
            f"edgefl cloud up: broker {settings.broker.host}:{stack.runtime_settings.broker.port}"
        )
        print(f"edgefl cloud up: SuperLink {stack.superlink.address}")  # type: ignore[union-attr]
        print(f"edgefl cloud up: web UI {stack.web.url}", flush=True)
        if args.no_run:
            print("edgefl cloud up: no run submitted (--no-run); press Ctrl-C to stop", flush=True)
            while True:
                time.sleep(3600)
        run_id = stack.submit_run()
        print(f"edgefl cloud up: Flower run {run_id} submitted", flush=True)
        last = ""

        def show() -> None:
            nonlocal last
            line = progress_line(stack.registry, settings.run.num_rounds)
            if line != last:
                print(f"  {line}", flush=True)
                last = line

        status = stack.wait_for_run(on_progress=show)
        wait_for_spread(stack.registry, timeout=SPREAD_WAIT_S)
        show()
        print(f"edgefl cloud up: run {run_id} {status}", flush=True)
        if args.exit_when_done:
            return 0 if status == "finished:completed" else 1
        print("edgefl cloud up: the UI stays up; press Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nedgefl cloud up: stopping", flush=True)
        stack.stop_run()
        return 0
    finally:
        stack.stop()


def _api(settings: Any, path: str) -> Any:
    url_file = settings.data_dir / "web.url"
    if not url_file.exists():
        return None
    try:
        with urllib.request.urlopen(url_file.read_text().strip() + path, timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def cmd_status(args: argparse.Namespace) -> int:
    settings = _load(args)
    overview = _api(settings, "/api/overview")
    if overview is not None:
        print(json.dumps(overview, indent=2) if args.json else _format_overview(overview))
        return 0
    # No running UI: read the registry directly.
    from cloud.registry import Registry

    registry = Registry(settings.registry_url)
    try:
        print(progress_line(registry, settings.run.num_rounds))
        for d in registry.list_devices():
            print(f"  {d.device_id:20} {'online ' if d.online else 'offline'} v{d.serving_version}")
    finally:
        registry.close()
    return 0


def _format_overview(o: dict[str, Any]) -> str:
    lines = [f"fleet {o.get('fleet', '?')}"]
    run = o.get("run")
    if run:
        lines.append(
            f"run {run.get('id')} {run.get('status')}: round {o.get('round', {}).get('current', '?')}/{run.get('num_rounds')}"
        )
    spread = o.get("spread")
    if spread:
        lines.append(
            f"newest version on {spread.get('serving')}/{spread.get('online')} online devices"
        )
    return "\n".join(lines) + "\n" + json.dumps(o, indent=2)


def cmd_model_list(args: argparse.Namespace) -> int:
    from cloud.registry import Registry

    settings = _load(args)
    registry = Registry(settings.registry_url)
    try:
        current = registry.current()
        print(f"{'version':>7}  {'round':>5}  {'accuracy':>8}  {'size':>8}  sha256")
        for v in registry.list_versions():
            acc = v.metrics.get("eval-accuracy")
            mark = " *" if current is not None and current.version == v.version else ""
            acc_text = f"{acc:.3f}" if acc is not None else "-"
            print(
                f"{v.version:>7}  {v.round:>5}  {acc_text:>8}  {v.size:>8}  {v.sha256[:16]}{mark}"
            )
        if current is not None:
            print(f"* current: version {current.version}{' (pinned)' if current.pinned else ''}")
    finally:
        registry.close()
    return 0


def cmd_model_pin(args: argparse.Namespace) -> int:
    from cloud.registry import NotFoundError, Registry
    from cloud.releases import pin_version

    settings = _load(args)
    registry = Registry(settings.registry_url)
    try:
        manifest = pin_version(settings, registry, args.version)
    except NotFoundError as exc:
        print(f"edgefl cloud model pin: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"edgefl cloud model pin: {exc}", file=sys.stderr)
        return 1
    finally:
        registry.close()
    print(
        f"version {args.version} pinned for fleet {settings.cloud.fleet} (sequence {manifest.sequence})"
    )
    return 0


def _clean_errors(func: Any) -> Any:
    """Turn the errors an operator can fix into one clear line instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        from cloud.broker import BrokerError
        from cloud.config import ConfigError
        from cloud.supervisor import CloudError
        from edge.flower_node import FlowerError

        try:
            return int(func(args))
        except (BrokerError, ConfigError, CloudError, FlowerError, OSError) as exc:
            print(f"edgefl cloud {args.cloud_command}: {exc}", file=sys.stderr)
            return 1

    return run


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cloud = subparsers.add_parser("cloud", help="the aggregator: init, up, status, models")
    sub = cloud.add_subparsers(dest="cloud_command", metavar="COMMAND", required=True)

    p = sub.add_parser("init", help="create cloud.toml, keys and the initial model")
    p.add_argument("--dir", default=".", help="where cloud.toml and data/ go (default: .)")
    p.add_argument("--fleet", default="demo", help="fleet name (part of every MQTT topic)")
    p.add_argument(
        "--arch", choices=("mlp", "cnn"), default="mlp", help="model architecture for digits"
    )
    p.add_argument(
        "--model-dir",
        help="use this built model (model.tflite + card.json) instead of building one",
    )
    p.add_argument(
        "--secure",
        action="store_true",
        help="TLS, broker passwords and ACLs, SuperNode authentication",
    )
    p.add_argument(
        "--host",
        action="append",
        help="host name or IP the devices use to reach the cloud (repeatable)",
    )
    p.add_argument("--broker-port", type=int, help="MQTT TLS port of a secure fleet (default 8883)")
    p.add_argument(
        "--superlink-port", type=int, help="SuperLink port of a secure fleet (default 9092)"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing cloud.toml")
    p.set_defaults(func=_clean_errors(cmd_init))

    p = sub.add_parser("up", help="start broker, SuperLink, registry, UI and the federated run")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--rounds", type=int, default=None, help="override run.num_rounds")
    p.add_argument("--no-run", action="store_true", help="start the services but submit no run")
    p.add_argument(
        "--exit-when-done", action="store_true", help="stop everything when the run ends"
    )
    p.set_defaults(func=_clean_errors(cmd_up))

    p = sub.add_parser("status", help="the current run, rounds and fleet")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_clean_errors(cmd_status))

    model = sub.add_parser("model", help="list and pin model versions")
    msub = model.add_subparsers(dest="model_command", metavar="COMMAND", required=True)
    p = msub.add_parser("list", help="every stored version with its metrics")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.set_defaults(func=_clean_errors(cmd_model_list))
    p = msub.add_parser("pin", help="make the whole fleet serve VERSION (rollback or forward)")
    p.add_argument("version", type=int)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.set_defaults(func=_clean_errors(cmd_model_pin))
