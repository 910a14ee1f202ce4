"""``edgefl cloud …`` commands: init, up, status, model list/pin, rollout status/promote/halt,
bridge-config."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from protos import wire_keys as keys

DEFAULT_CONFIG = Path("cloud.toml")


def _load(args: argparse.Namespace) -> Any:
    from cloud import config as cloud_config

    return cloud_config.load(Path(args.config))


def cmd_init(args: argparse.Namespace) -> int:
    from cloud import ports
    from cloud.supervisor import CloudError, init_cloud

    if not args.secure:
        # Fixed, documented ports: devices keep the addresses they were configured with.
        args.broker_port = args.broker_port or ports.DEFAULT_BROKER_PORT
        args.superlink_port = args.superlink_port or ports.DEFAULT_SUPERLINK_PORT
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
            web_port=args.web_port,
        )
    except CloudError as exc:
        print(f"edgefl cloud init: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    print(f"start the aggregator with: edgefl cloud up --config {path}")
    return 0


def own_run(registry: Any, before: Any) -> Any:
    """The registry run that a run submitted after ``before`` (the latest run then) drives.

    That is a newer run, or ``before`` itself when it was still running (the aggregator
    resumes it). None until the aggregator has registered it: an older run's rounds are
    never reported as this one's.
    """
    run = registry.latest_run()
    if run is None or before is None:
        return run
    if run.id > before.id or (run.id == before.id and before.status == "running"):
        return run
    return None


def progress_line(registry: Any, num_rounds: int, *, before: Any = None) -> str:
    run = own_run(registry, before)
    if run is None:
        return "waiting for the run to start"
    rounds = registry.list_rounds(run.id)
    done = [r for r in rounds if r.finished and r.round > 0]
    current = max((r.round for r in rounds), default=0)
    latest = registry.latest_version()
    parts = [f"run {run.id} {run.status}", f"round {current}/{run.num_rounds or num_rounds}"]
    if done:
        last = max(done, key=lambda r: r.round)
        acc = last.eval_metrics.get(keys.EVAL_ACCURACY) if last.eval_metrics else None
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


#: Exit code of a command interrupted by Ctrl-C or SIGTERM (128 + SIGINT).
EXIT_INTERRUPTED = 130


def _idle(stack: Any) -> int:
    """Keep the services up until Ctrl-C; 1 when the watchdog gave up on a part."""
    while not stack.watchdog.failed.wait(1.0):
        pass
    print(f"edgefl cloud up: {stack.watchdog.failure}", file=sys.stderr, flush=True)
    return 1


def cmd_up(args: argparse.Namespace) -> int:
    from cloud.supervisor import CloudStack

    settings = _load(args)
    _check_fleet_ports(settings)
    return serve(CloudStack(settings, num_rounds=args.rounds), args)


def serve(stack: Any, args: argparse.Namespace) -> int:
    """Start ``stack``, run (``args.no_run``, ``args.exit_when_done``), stop it; the exit code.

    Ctrl-C (or SIGTERM) at any moment stops whatever was started so far and returns 130.
    """
    from cloud.supervision import interrupts_ignored

    settings = stack.settings
    try:
        stack.start()
        # Where devices connect (the cloud's own clients may use a loopback listener).
        device_port = stack.broker.port if stack.broker is not None else None
        print(
            "edgefl cloud up: broker "
            f"{settings.broker.host}:{device_port or stack.runtime_settings.broker.port}"
        )
        print(f"edgefl cloud up: fleet port (SuperLink Fleet API) {stack.fleet_address}")
        print(f"edgefl cloud up: operator path (SuperLink) {stack.superlink.address}")  # type: ignore[union-attr]
        print(f"edgefl cloud up: web UI {stack.web.url}", flush=True)
        if args.no_run:
            print("edgefl cloud up: no run submitted (--no-run); press Ctrl-C to stop", flush=True)
            return _idle(stack)
        before = stack.registry.latest_run()
        run_id = stack.submit_run()
        print(f"edgefl cloud up: Flower run {run_id} submitted", flush=True)
        last = ""

        def show() -> None:
            nonlocal last
            line = progress_line(stack.registry, settings.run.num_rounds, before=before)
            if line != last:
                print(f"  {line}", flush=True)
                last = line

        status = stack.wait_for_run(on_progress=show)
        wait_for_spread(stack.registry, timeout=SPREAD_WAIT_S)
        show()
        print(f"edgefl cloud up: run {stack.flower_run_id} {status}", flush=True)
        if args.exit_when_done:
            return 0 if status == "finished:completed" else 1
        print("edgefl cloud up: the UI stays up; press Ctrl-C to stop", flush=True)
        return _idle(stack)
    except KeyboardInterrupt:
        print("\nedgefl cloud up: stopping", flush=True)
        with interrupts_ignored():
            stack.stop_run()
        return EXIT_INTERRUPTED
    finally:
        stack.stop()


def _check_fleet_ports(settings: Any) -> None:
    from cloud.config import ConfigError
    from cloud.ports import ephemeral_port_problems

    problems = ephemeral_port_problems(settings)
    if problems:
        raise ConfigError(
            "devices outside this host are configured, so the cloud needs fixed ports:\n  - "
            + "\n  - ".join(problems)
        )


def _running(settings: Any) -> Any:
    from cloud.cloud_lock import running_cloud

    return running_cloud(settings.data_dir)


def _not_running(settings: Any, command: str) -> int:
    where = f" --config {settings.source}" if settings.source is not None else ""
    print(
        f"edgefl cloud {command}: no cloud is running on {settings.data_dir} "
        f"(start one with `edgefl cloud up{where}`)",
        file=sys.stderr,
    )
    return 1


def _api(url: str, path: str) -> Any:
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=10) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def cmd_status(args: argparse.Namespace) -> int:
    settings = _load(args)
    info = _running(settings)
    if info is None:
        if args.json:
            print(json.dumps({"running": False, "data_dir": str(settings.data_dir)}, indent=2))
        return _not_running(settings, "status")
    web = info.urls.get("web")
    overview = None if web is None else _api(web, "/api/overview")
    devices = None if web is None else _api(web, "/api/devices")
    if args.json:
        doc = {
            "running": True,
            "cloud": {"pid": info.pid, "phase": info.phase, "urls": info.urls},
            "overview": overview,
            "devices": _device_list(devices),
        }
        print(json.dumps(doc, indent=2))
    else:
        print(format_status(info, overview, _device_list(devices)))
    if overview is None:
        print(
            f"edgefl cloud status: the cloud (pid {info.pid}) is {info.phase} but its web API "
            "did not answer",
            file=sys.stderr,
        )
        return 1
    return 0


def _device_list(devices: Any) -> list[dict[str, Any]]:
    if isinstance(devices, dict):  # a paginated answer
        devices = devices.get("devices", devices.get("items", []))
    return [d for d in devices or [] if isinstance(d, dict)]


def format_status(info: Any, o: dict[str, Any] | None, devices: list[dict[str, Any]]) -> str:
    """``cloud status`` for people: the cloud, the run, the newest version, the devices."""
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.started_at))
    lines = [f"cloud running (pid {info.pid}, {info.phase}) since {since}"]
    for name, label in (("broker", "broker"), ("superlink", "SuperLink"), ("web", "web UI")):
        if name in info.urls:
            lines.append(f"  {label:<10} {info.urls[name]}")
    if o is None:
        return "\n".join(lines)
    count = o.get("devices") or {}
    lines.append(
        f"fleet {o.get('fleet', '?')}: {count.get('online', 0)} of {count.get('total', 0)} "
        "devices online"
    )
    run, progress = o.get("run"), o.get("progress")
    if run:
        text = f"run {run.get('id')} {run.get('status')}"
        if progress:
            text += f": round {progress.get('current', 0)}/{progress.get('total', run.get('num_rounds'))}"
            if progress.get("sampled"):
                text += (
                    f" ({len(progress.get('replied', []))} of {len(progress['sampled'])} replied"
                    f"{', finished' if progress.get('finished') else ''})"
                )
        lines.append(text)
    else:
        lines.append("no run yet")
    latest = o.get("latest_metrics") or {}
    if latest.get("eval_accuracy") is not None:
        lines.append(f"accuracy {latest['eval_accuracy']:.3f} after round {latest.get('round')}")
    newest, serving = o.get("newest_version"), o.get("serving")
    if newest:
        spread = newest.get("spread") or {}
        lines.append(
            f"newest version v{newest.get('version')} (run {newest.get('run_id')}, round "
            f"{newest.get('round')}) on {spread.get('serving', 0)}/{spread.get('online', 0)} "
            "online devices"
        )
    if serving:
        lines.append(
            f"fleet target v{serving.get('version')}{' (pinned)' if serving.get('pinned') else ''}"
        )
    if devices:
        lines.append(f"  {'device':20} {'state':9} {'version':>7}  last error")
        for d in devices:
            lines.append(
                f"  {d.get('device_id')!s:20} {d.get('state')!s:9} "
                f"{'v' + str(d.get('serving_version')):>7}  {d.get('last_error') or ''}".rstrip()
            )
    return "\n".join(lines)


def cmd_model_list(args: argparse.Namespace) -> int:
    from cloud.registry import Registry

    settings = _load(args)
    registry = Registry(settings.registry_url)
    try:
        current = registry.current()
        print(f"{'version':>7}  {'round':>5}  {'accuracy':>8}  {'size':>8}  sha256")
        for v in registry.list_versions():
            acc = v.metrics.get(keys.EVAL_ACCURACY)
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
    from cloud import config as cloud_config
    from cloud.registry import NotFoundError, Registry
    from cloud.releases import pin_version

    settings = _load(args)
    registry = Registry(settings.registry_url)
    try:
        try:
            registry.get_version(args.version)
        except NotFoundError:
            known = [v.version for v in registry.list_versions()]
            have = f"stored versions: {_ranges(known)}" if known else "no version is stored yet"
            print(
                f"edgefl cloud model pin: there is no version {args.version}; {have}",
                file=sys.stderr,
            )
            return 1
        info = _running(settings)
        runtime = settings.data_dir / "runtime.toml"
        if info is not None and runtime.exists():
            # The running cloud's actual ports (a port 0 in cloud.toml was resolved at start).
            settings = cloud_config.load(runtime)
        elif settings.broker.managed:
            return _not_running(settings, "model pin")
        run = registry.latest_run()
        manifest = pin_version(settings, registry, args.version)
    except (NotFoundError, RuntimeError) as exc:
        print(f"edgefl cloud model pin: {exc}", file=sys.stderr)
        return 1
    finally:
        registry.close()
    print(
        f"version {args.version} pinned for fleet {settings.cloud.fleet} (sequence {manifest.sequence})"
    )
    if run is not None and run.status == "running":
        print(
            f"note: run {run.id} is in progress; the release of its next round supersedes this "
            "pin on every device. To keep the pin, stop the run first (Stop run in the UI, or "
            "Ctrl-C on `cloud up`).",
            file=sys.stderr,
        )
    return 0


def format_rollouts(status: dict[str, Any]) -> str:
    """``edgefl cloud rollout status`` as text: the running rollout, then recent ones."""
    lines = [f"rollout policy: {status.get('policy')}"]
    rollouts = list(reversed(status.get("history") or []))
    active = status.get("active")
    if active is not None and active.get("status") == "running":
        rollouts.insert(0, active)
    if not rollouts:
        lines.append("no rollout yet")
    for r in rollouts:
        lines.append(
            f"version {r['version']} (round {r['round']}, served version "
            f"{r['served_version']}): {r['status']}, phase {r['phase']}/{r['phase_count']}"
        )
        for ph in r.get("phases", []):
            figures = ph.get("figures") or {}
            decided = (
                "open"
                if ph.get("passed") is None
                else ("passed" if ph["passed"] else "failed") + f": {ph.get('reason')}"
            )
            drop = figures.get("accuracy_drop")
            lines.append(
                f"  phase {ph['phase']} ({ph['fraction']:.0%}, {len(ph['cohort'])} devices, "
                f"{len(ph['checked'])} checked, {len(ph['failed'])} failed"
                + (f", accuracy drop {drop:+.4f}" if drop is not None else "")
                + f"): {decided}"
            )
    return "\n".join(lines)


def cmd_rollout(args: argparse.Namespace) -> int:
    from cloud.signer import SignerClient, SignerError

    settings = _load(args)
    command = f"rollout {args.rollout_command}"
    if _running(settings) is None:
        return _not_running(settings, command)
    client = SignerClient(settings.data_dir, timeout_s=60.0)
    try:
        if args.rollout_command == "status":
            reply = client.rollout("rollout-status")
            if args.json:
                print(json.dumps(reply["status"], indent=2))
            else:
                print(format_rollouts(reply["status"]))
            return 0
        reply = client.rollout(f"rollout-{args.rollout_command}", args.version)
    except SignerError as exc:
        print(f"edgefl cloud {command}: {exc}", file=sys.stderr)
        return 1
    if args.rollout_command == "promote":
        print(f"version {args.version} promoted to the whole fleet (sequence {reply['sequence']})")
    else:
        print(f"rollout of version {args.version} halted")
    return 0


def _ranges(numbers: list[int]) -> str:
    """``1-4, 7`` for ``[1, 2, 3, 4, 7]``."""
    out: list[list[int]] = []
    for n in sorted(set(numbers)):
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as an argparse type: a clear error, never a traceback."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or any(c.isspace() for c in host):
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    if ":" in host:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use a host name or an IPv4 address (Mosquitto's bridge address "
            "is HOST:PORT)"
        )
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: port {port!r} is not a number") from None
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: port {number} is not within 1..65535")
    return host, number


def cmd_bridge_config(args: argparse.Namespace) -> int:
    """Write a regional broker's mosquitto.conf: its listener plus a bridge to the cloud broker."""
    from cloud.bridge import BridgeConfig, BridgeError
    from cloud.broker import BrokerConfig, write_private

    problems = []
    files = {
        "--password-file": "password_file",
        "--cafile": "cafile",
        "--tls-cert": "tls_cert",
        "--tls-key": "tls_key",
        "--device-passwd": "device_passwd",
        "--device-acl": "device_acl",
    }
    for option, name in files.items():
        path = getattr(args, name)
        if path is not None:
            # Absolute: Mosquitto resolves paths against its own working directory.
            setattr(args, name, path.expanduser().resolve())
            if not getattr(args, name).is_file():
                problems.append(f"{option} {path}: no such file")
    if (args.username is None) != (args.password_file is None):
        problems.append("--username and --password-file go together")
    if (args.tls_cert is None) != (args.tls_key is None):
        problems.append("--tls-cert and --tls-key go together")
    if (args.device_passwd is None) != (args.device_acl is None):
        problems.append("--device-passwd and --device-acl go together")
    password = None
    if args.password_file is not None and args.password_file.is_file():
        lines = args.password_file.read_text().splitlines()
        password = lines[0].strip() if lines else ""
        if not password:
            problems.append(f"--password-file {args.password_file}: the first line is empty")
    if args.message_size_limit < 0:
        problems.append(f"--message-size-limit {args.message_size_limit} is negative")
    if problems:
        raise BridgeError("; ".join(problems))
    remote_host, remote_port = args.cloud_broker
    listen_host, listen_port = args.listen
    bridge = BridgeConfig(
        region=args.region,
        fleet=args.fleet,
        remote_host=remote_host,
        remote_port=remote_port,
        remote_username=args.username,
        remote_password=password,
        cafile=args.cafile,
        keepalive=args.keepalive,
    )
    data_dir = (args.data_dir or Path(f"mosquitto-{bridge.region}")).expanduser().resolve()
    config = BrokerConfig(
        port=listen_port,
        host=listen_host,
        data_dir=data_dir,
        allow_anonymous=args.device_passwd is None,
        password_file=args.device_passwd,
        acl_file=args.device_acl,
        certfile=args.tls_cert,
        keyfile=args.tls_key,
        message_size_limit=args.message_size_limit,
        bridges=(bridge,),
    )
    text = config.render(
        f"Generated by `edgefl cloud bridge-config` for region {bridge.region} of fleet "
        f"{bridge.fleet}; rerun it to change this file."
    )
    # Mosquitto neither creates its persistence directory nor starts without its log file.
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if args.output is None:
        sys.stdout.write(text)
    else:
        # Owner-only: it may hold the bridge's password.
        write_private(Path(args.output), text)
        print(f"wrote {args.output} (data directory {data_dir})", file=sys.stderr)
    return 0


def _clean_errors(func: Any) -> Any:
    """Turn the errors an operator can fix into one clear line instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        from cloud.broker import BrokerError
        from cloud.cloud_lock import CloudRunningError
        from cloud.config import ConfigError
        from cloud.ports import PortInUseError
        from cloud.supervisor import CloudError
        from edge.flower_node import FlowerError

        try:
            return int(func(args))
        except (
            BrokerError,
            ConfigError,
            CloudError,
            CloudRunningError,
            PortInUseError,
            FlowerError,
            OSError,
        ) as exc:
            print(f"edgefl cloud {args.cloud_command}: {exc}", file=sys.stderr)
            return 1

    return run


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from cloud.broker import DEFAULT_MESSAGE_SIZE_LIMIT

    cloud = subparsers.add_parser(
        "cloud", help="the aggregator: init, up, status, models, rollouts, bridge-config"
    )
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
    p.add_argument(
        "--broker-port", type=int, help="MQTT port (default 1883; 8883 with --secure, TLS)"
    )
    p.add_argument("--superlink-port", type=int, help="SuperLink port (default 9092)")
    p.add_argument("--web-port", type=int, default=8080, help="web UI port (default 8080)")
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

    rollout = sub.add_parser("rollout", help="staged rollouts: status, promote, halt")
    rsub = rollout.add_subparsers(dest="rollout_command", metavar="COMMAND", required=True)
    p = rsub.add_parser("status", help="the running rollout and recent ones, with their gates")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_clean_errors(cmd_rollout))
    p = rsub.add_parser("promote", help="release VERSION to the whole fleet now, skipping phases")
    p.add_argument("version", type=int)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.set_defaults(func=_clean_errors(cmd_rollout))
    p = rsub.add_parser("halt", help="stop the rollout of VERSION where it is")
    p.add_argument("version", type=int)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.set_defaults(func=_clean_errors(cmd_rollout))

    p = sub.add_parser(
        "bridge-config",
        help="write a regional Mosquitto broker's config, bridged to the cloud broker",
        description="Print (or write with --output) a mosquitto.conf for a regional broker: "
        "a listener for the region's devices and a bridge that brings the fleet's releases "
        "in from the cloud broker and sends its device reports out to it. Run it on the "
        "regional host, then `mosquitto -c FILE`.",
    )
    p.add_argument("--region", required=True, help="the regional broker's name (e.g. eu)")
    p.add_argument("--fleet", required=True, help="the fleet whose topics cross the bridge")
    p.add_argument(
        "--cloud-broker",
        required=True,
        type=host_port,
        metavar="HOST:PORT",
        help="the cloud broker, as the regional broker reaches it",
    )
    p.add_argument(
        "--listen",
        type=host_port,
        default=("0.0.0.0", 1883),
        metavar="HOST:PORT",
        help="where the regional broker listens for its devices (default 0.0.0.0:1883)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        help="the regional broker's persistence and log directory, created if missing "
        "(default ./mosquitto-REGION)",
    )
    p.add_argument("--username", help="the bridge's user on the cloud broker")
    p.add_argument("--password-file", type=Path, help="file whose first line is that password")
    p.add_argument(
        "--cafile",
        type=Path,
        help="CA of the cloud broker's TLS certificate (the bridge connects with TLS)",
    )
    p.add_argument("--tls-cert", type=Path, help="TLS certificate of the regional listener")
    p.add_argument("--tls-key", type=Path, help="its private key")
    p.add_argument(
        "--device-passwd",
        type=Path,
        help="Mosquitto password file for the region's devices (a copy of data/mqtt/passwd); "
        "without it the regional listener is anonymous",
    )
    p.add_argument("--device-acl", type=Path, help="their ACL file (a copy of data/mqtt/acl)")
    p.add_argument(
        "--keepalive", type=int, default=30, help="bridge keepalive in seconds (default 30)"
    )
    p.add_argument(
        "--message-size-limit",
        type=int,
        default=DEFAULT_MESSAGE_SIZE_LIMIT,
        help=f"largest payload in bytes (default {DEFAULT_MESSAGE_SIZE_LIMIT}; must fit a chunk)",
    )
    p.add_argument("--output", "-o", help="write the config here (owner-only) instead of stdout")
    p.set_defaults(func=_clean_errors(cmd_bridge_config))
