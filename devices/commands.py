"""``edgefl devices``: list board profiles, flash a device, revoke a device."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``devices`` command group to the ``edgefl`` parser."""
    devices = subparsers.add_parser(
        "devices", help="device profiles, flashing and revoking devices"
    )
    sub = devices.add_subparsers(dest="devices_command", metavar="COMMAND")
    devices.set_defaults(func=lambda _args: devices.print_help() or 2)

    p = sub.add_parser("profiles", help="list the board profiles")
    p.add_argument("--verbose-limits", action="store_true", help="also print each profile's limits")
    p.set_defaults(func=_profiles)

    p = sub.add_parser(
        "flash",
        help="make a device bundle (identity, config, trust anchors, units) and enrol it",
    )
    p.add_argument(
        "--profile",
        required=True,
        help="board profile: a shipped one (see `edgefl devices profiles`) or the path of "
        "your own profile .toml",
    )
    p.add_argument("--name", required=True, help="device id, unique in the fleet")
    p.add_argument(
        "--cloud",
        required=True,
        metavar="HOST",
        help="host name or address devices reach the cloud at",
    )
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument(
        "--boot", type=Path, metavar="DIR", help="mounted boot partition to write edgefl/ into"
    )
    dest.add_argument(
        "--out", type=Path, metavar="FILE.tar.gz", help="write the bundle as a tarball"
    )
    p.add_argument("--force", action="store_true", help="replace an existing identity of that name")
    p.add_argument(
        "--cloud-dir",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="directory of cloud.toml or the secure fleet's data directory (default: .)",
    )
    p.add_argument(
        "--initial-package",
        type=Path,
        default=None,
        metavar="FILE",
        help="model package the device starts with (default: <data_dir>/initial.pkg if present)",
    )
    p.add_argument(
        "--wheel",
        type=Path,
        default=None,
        metavar="FILE",
        help="the edgefl-fleet wheel the device installs (default: built from this edgefl's "
        "source tree)",
    )
    p.add_argument(
        "--wheelhouse",
        type=Path,
        default=None,
        metavar="DIR",
        help="download every dependency for the profile's architecture and Python into DIR "
        "and put them in the bundle (offline install, for air-gapped sites)",
    )
    p.add_argument("--grpc-port", type=int, default=None, help="override the profile's gRPC port")
    p.add_argument(
        "--supernode-port", type=int, default=None, help="override the profile's SuperNode port"
    )
    p.set_defaults(func=_flash)

    p = sub.add_parser(
        "emulate", help="run virtual devices on this machine against a running `edgefl cloud up`"
    )
    p.add_argument("--config", type=Path, default=Path("cloud.toml"), help="the cloud's cloud.toml")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--count", type=int, help="N plain (loopback, no TLS) devices")
    what.add_argument(
        "--bundle",
        type=Path,
        action="append",
        help="boot a device from this flashed bundle (repeatable)",
    )
    p.add_argument(
        "--dir", type=Path, default=Path("emulated-devices"), help="where device state goes"
    )
    p.add_argument("--iid", action="store_true", help="IID digits partitions (default: Dirichlet)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_emulate)

    p = sub.add_parser("revoke", help="revoke a device: broker and SuperLink refuse it from now on")
    p.add_argument("name", help="device id")
    p.add_argument(
        "--cloud-dir",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="directory of cloud.toml or the secure fleet's data directory (default: .)",
    )
    p.set_defaults(func=_revoke)


def _emulate(args: argparse.Namespace) -> int:
    import time

    from cloud import config as cloud_config
    from devices.emulate import EmulatedFleet, FleetSpec
    from edge.process import connect_host

    settings = cloud_config.load(args.config)
    runtime = settings.data_dir / "runtime.toml"
    if not runtime.exists():
        print("edgefl devices emulate: start the cloud first (`edgefl cloud up`)", file=sys.stderr)
        return 1
    live = cloud_config.load(runtime)
    spec = FleetSpec(
        fleet=live.cloud.fleet,
        broker_host=connect_host(live.broker.host),
        broker_port=live.broker.port,
        superlink=f"{connect_host(live.superlink.host)}:{live.superlink.port}",
        signing_public_key=live.signing.public_key,
        initial_package=live.data_dir / "initial.pkg",
        card_json=(live.model.dir / "card.json").read_text(),
        scheme="iid" if args.iid else "dirichlet",
        alpha=args.alpha,
        seed=args.seed,
    )
    fleet = EmulatedFleet(spec, args.dir.resolve(), args.count or 0)
    counts = fleet.from_bundles(list(args.bundle)) if args.bundle else fleet.prepare()
    try:
        fleet.start()
        for device, count in zip(fleet.devices, counts, strict=True):
            print(f"{device.name}: services on {device.address}, {count} samples", flush=True)
        print("edgefl devices emulate: running; press Ctrl-C to stop them all", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nedgefl devices emulate: stopping", flush=True)
        return 0
    finally:
        fleet.stop()


def _profiles(args: argparse.Namespace) -> int:
    from devices.profiles import ProfileError, list_profiles, load_profile

    status = 0
    rows = []
    for name in list_profiles():
        try:
            prof = load_profile(name)
        except ProfileError as exc:
            print(exc, file=sys.stderr)
            status = 1
            continue
        rows.append(
            (
                prof.name,
                prof.hardware.arch,
                f"{prof.hardware.ram_mb} MB",
                f"py{prof.os.python}",
                prof.os.image_family,
                "train+serve" if prof.training.enabled else "serve only",
                prof.title,
            )
        )
        if args.verbose_limits and prof.limits:
            rows.append(("", "", "", "", "", "", f"  limits: {prof.limits}"))
    header = ("PROFILE", "ARCH", "RAM", "PYTHON", "IMAGE", "ROLE", "BOARD")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return status


def _fleet_hooks(cloud_dir: Path) -> tuple[Any, Any, Any]:
    """(reload, register, unregister) callables for the cloud's running broker/SuperLink."""
    from devices.flash import resolve_cloud_data_dir
    from devices.secure_fleet import (
        SecureFleet,
        reload_broker_from_pid_file,
        running_superlink,
        unregister_supernode,
    )

    data_dir = resolve_cloud_data_dir(cloud_dir)
    sf = SecureFleet.load(data_dir)
    link = running_superlink(sf)

    def reload() -> bool:
        return reload_broker_from_pid_file(data_dir)

    if link is None:
        return reload, None, None
    return reload, link.register_supernode, lambda node_id: unregister_supernode(link, node_id)


def _flash(args: argparse.Namespace) -> int:
    from devices.flash import flash
    from devices.profiles import ProfileError
    from devices.secure_fleet import FleetError
    from edge.flower_node import FlowerError
    from protos.topics import TopicError

    try:
        reload, register_fn, unregister_fn = _fleet_hooks(args.cloud_dir)
        result = flash(
            cloud_dir=args.cloud_dir,
            profile=args.profile,
            name=args.name,
            cloud_host=args.cloud,
            out=args.out,
            boot=args.boot,
            force=args.force,
            initial_package=args.initial_package,
            reload=reload,
            register_supernode=register_fn,
            unregister_supernode=unregister_fn,
            wheel=args.wheel,
            wheelhouse=args.wheelhouse,
            grpc_port=args.grpc_port,
            supernode_port=args.supernode_port,
        )
    except (FleetError, ProfileError, TopicError, FlowerError, OSError) as exc:
        print(f"edgefl devices flash: {exc}", file=sys.stderr)
        return 1
    print(f"flashed {result.name} ({result.profile}, fleet {result.fleet}) -> {result.bundle}")
    if result.replaced:
        print("  replaced the previous identity of that name")
    if result.node_id:
        print(f"  SuperNode key registered as node {result.node_id}")
    print(f"  broker reloaded: {'yes' if result.broker_reloaded else 'no (not running)'}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from devices.revoke import revoke
    from devices.secure_fleet import FleetError
    from edge.flower_node import FlowerError

    try:
        reload, _register, unregister_fn = _fleet_hooks(args.cloud_dir)
        result = revoke(
            args.cloud_dir, args.name, reload=reload, unregister_supernode=unregister_fn
        )
    except (FleetError, FlowerError, OSError) as exc:
        print(f"edgefl devices revoke: {exc}", file=sys.stderr)
        return 1
    print(f"revoked {result.name} (fleet {result.fleet})")
    if result.unregistered_node_id:
        print(f"  SuperNode node {result.unregistered_node_id} unregistered")
    for note in result.notes:
        print(f"  note: {note}")
    return 0
