"""Across a real network: the cloud and three devices, each in its own network namespace.

A test-made LAN (veth pairs into a bridge in a namespace of its own, addresses in
10.231.<random>.0/24) replaces loopback between machines: the cloud (``edgefl cloud
up``) listens on its LAN address only, every device (``edgefl edge up``) reaches the
broker and the SuperLink over the LAN, and only a device's own services stay on its
own loopback. Mid-round the cable of one device is pulled and plugged back in; the
run completes and every device ends up serving the final model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloud import config as cloud_config
from cloud.registry import Registry
from cloud.supervisor import init_cloud
from devices.emulate import FleetSpec, load_partitions, write_device_config
from edge.process import ManagedProcess
from tests.e2e.netns import Host, Lan, require_netns

pytestmark = pytest.mark.slow

logger = logging.getLogger(__name__)

EDGEFL = str(Path(sys.executable).parent / "edgefl")
#: Fixed ports are safe here: the cloud's namespace belongs to this test alone.
BROKER_PORT = 1883
SUPERLINK_PORT = 9092
#: How long the cut device stays unplugged.
CUT_S = 12.0
_UP = re.compile(r"edgefl edge up: device (\S+) serving on (\S+)")

#: Run inside a device's namespace: the version its inference service reports.
SERVED_VERSION = """
    import sys
    import grpc
    from protos.kserve import grpc_predict_v2_pb2 as pb
    from protos.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
    with grpc.insecure_channel(sys.argv[1]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"), timeout=5)
        except grpc.RpcError:
            print(0)
        else:
            print(max((int(v) for v in meta.versions), default=0))
"""


@pytest.fixture
def lan() -> Iterator[Lan]:
    # No skip: a machine that cannot make namespaces fails this test with the reason.
    require_netns()
    lan = Lan()
    try:
        yield lan.start()
    finally:
        lan.close()


class Processes:
    """Processes started inside the LAN's namespaces, stopped by PID at teardown."""

    def __init__(self) -> None:
        self.started: list[ManagedProcess] = []

    def start(self, host: Host, name: str, argv: list[str], log: Path) -> ManagedProcess:
        proc = ManagedProcess(name, host.argv(argv), log_path=log).start()
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        """Stop every process at once, each only once (no PID is signalled after reaping)."""
        started, self.started = self.started, []

        def stop(proc: ManagedProcess) -> None:
            try:
                proc.stop(timeout=20)
            except Exception:
                logger.exception("stopping %s failed", proc.name)

        with ThreadPoolExecutor(max_workers=max(1, len(started))) as pool:
            list(pool.map(stop, started))


@pytest.fixture
def processes(lan: Lan) -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


def _log_text(proc: ManagedProcess) -> str:
    try:
        return proc.log_path.read_text(errors="replace")
    except OSError:
        return ""


def _wait(predicate, timeout: float, what: str, interval: float = 0.3):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} within {timeout:.0f}s")


def _write_cloud_config(tmp_path: Path, model_dir: Path, cloud: Host) -> cloud_config.CloudSettings:
    conf = init_cloud(tmp_path / "cloud", fleet="lan", model_dir=model_dir)
    s = cloud_config.load(conf)
    s.broker.host = s.superlink.host = s.web.host = cloud.address
    s.broker.port = BROKER_PORT
    s.superlink.port = SUPERLINK_PORT
    s.run = dataclasses.replace(
        s.run,
        num_rounds=3,
        min_nodes=3,
        wait_for_nodes_s=90.0,
        # Generous: on a loaded 2-core machine a healthy round takes ~20 s, and the cut
        # device usually still answers once its cable is back.
        round_timeout_s=60.0,
        local_epochs=2,
        fraction_train=1.0,
    )
    conf.write_text(cloud_config.to_toml(s))
    return cloud_config.load(conf)


def _round(registry: Registry, number: int):  # type: ignore[no-untyped-def]
    run = registry.latest_run()
    if run is None:
        return None
    return next((r for r in registry.list_rounds(run.id) if r.round == number), None)


def test_cloud_and_devices_in_their_own_namespaces_survive_a_pulled_cable(
    tmp_path: Path, mlp_model_dir: Path, lan: Lan, processes: Processes
) -> None:
    cloud = lan.add_host("cloud")
    hosts = {f"dev-{i}": lan.add_host(f"dev-{i}") for i in (1, 2, 3)}
    s = _write_cloud_config(tmp_path, mlp_model_dir, cloud)

    spec = FleetSpec(
        fleet=s.cloud.fleet,
        broker_host=cloud.address,
        broker_port=BROKER_PORT,
        superlink=f"{cloud.address}:{SUPERLINK_PORT}",
        signing_public_key=s.signing.public_key,
        initial_package=s.data_dir / "initial.pkg",
        card_json=(s.model.dir / "card.json").read_text(),
        scheme="iid",
    )
    roots = {name: tmp_path / "devices" / name for name in hosts}
    configs = {name: write_device_config(spec, name, root) for name, root in roots.items()}
    assert min(load_partitions(spec, [root / "data" for root in roots.values()])) > 0

    # -- the cloud and three devices, each alone in its namespace, all booting at once -----
    # (devices retry the broker and the SuperLink until the cloud is up, as in the field)
    cloud_proc = processes.start(
        cloud,
        "edgefl cloud up",
        [EDGEFL, "cloud", "up", "--config", str(s.source), "--exit-when-done"],
        tmp_path / "cloud-up.log",
    )
    device_procs = {
        name: processes.start(
            host,
            f"device {name}",
            [EDGEFL, "edge", "up", "--config", str(configs[name])],
            roots[name] / "logs" / "up.log",
        )
        for name, host in hosts.items()
    }
    cloud_proc.wait_until(
        lambda: "Flower run" in _log_text(cloud_proc), timeout=120, what="submitting its run"
    )
    # `ip netns exec` execs: the PID we hold is the cloud itself, inside the namespace.
    cmdline = Path(f"/proc/{cloud_proc.pid}/cmdline").read_bytes().split(b"\0")
    assert b"cloud" in cmdline and b"netns" not in cmdline, cmdline
    assert os.readlink(f"/proc/{cloud_proc.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert cloud_proc.pid in lan.pids(cloud)
    assert f"broker {cloud.address}:{BROKER_PORT}" in _log_text(cloud_proc)

    services: dict[str, str] = {}
    for name, proc in device_procs.items():

        def ready(proc: ManagedProcess = proc, name: str = name) -> bool:
            match = _UP.search(_log_text(proc))
            if match:
                services[name] = match.group(2)
            return bool(match)

        proc.wait_until(ready, timeout=120, what="up")
        assert proc.pid in lan.pids(hosts[name])

    # Nothing rides on loopback between machines: from a device, the cloud's ports exist
    # on the cloud's LAN address only.
    probe = hosts["dev-1"]
    assert lan.can_connect(probe, cloud.address, BROKER_PORT)
    assert lan.can_connect(probe, cloud.address, SUPERLINK_PORT)
    assert not lan.can_connect(probe, "127.0.0.1", BROKER_PORT)
    assert not lan.can_connect(probe, "127.0.0.1", SUPERLINK_PORT)

    # -- pull one device's cable mid-round, plug it back in --------------------------------
    registry = Registry(s.registry_url)
    try:
        victim_name = "dev-2"
        victim = hosts[victim_name]
        _wait(
            lambda: (r := _round(registry, 2)) is not None and not r.finished,
            timeout=150,
            what="round 2 did not start",
            interval=0.2,
        )
        cut_at, cut_wall = time.monotonic(), time.time()
        with lan.unplugged(victim):
            assert not lan.can_connect(victim, cloud.address, BROKER_PORT)
            assert lan.can_connect(hosts["dev-3"], cloud.address, BROKER_PORT)
            time.sleep(max(0.0, CUT_S - (time.monotonic() - cut_at)))
        restored_wall = time.time()
        _wait(
            lambda: lan.can_connect(victim, cloud.address, BROKER_PORT),
            timeout=10,
            what="the restored device did not reach the broker again",
        )

        # -- the run completes; the cloud exits by itself (--exit-when-done) ----------------
        try:
            code = cloud_proc.proc.wait(timeout=180)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            pytest.fail(f"the cloud did not finish the run:\n{cloud_proc.log_tail(40)}")
        assert code == 0, cloud_proc.log_tail(40)
        assert "finished:completed" in _log_text(cloud_proc)

        run = registry.latest_run()
        assert run is not None and run.status == "completed"
        rounds = {r.round: r for r in registry.list_rounds(run.id)}
        assert all(rounds[n].version is not None for n in (1, 2, 3)), rounds
        assert [v.round for v in registry.list_versions()] == [0, 1, 2, 3]
        final = registry.latest_version()
        assert final is not None and final.round == 3
        assert sorted(rounds[1].replied) == sorted(hosts), "all three trained before the cut"
        r2 = rounds[2]
        logger.info(
            "round 2: replied %s, dropped %s; round 3: replied %s",
            r2.replied,
            r2.dropped,
            rounds[3].replied,
        )
        # The cable was pulled while round 2 ran, and round 2 outlasted the cut: the cut
        # device either answered once its cable was back, or was dropped.
        assert r2.started_at is not None and r2.finished_at is not None
        assert r2.started_at <= cut_wall and r2.finished_at >= restored_wall, r2
        assert victim_name in r2.replied or victim_name in r2.dropped
        # The other two never lost their link: they trained in every round. The cut
        # device rejoined: it trained again in round 3 (which waits for three devices).
        for n in (2, 3):
            assert {"dev-1", "dev-3"} <= set(rounds[n].replied), rounds[n]
        assert victim_name in rounds[3].replied, rounds[3]

        # -- every device serves the final version ------------------------------------------
        def served() -> dict[str, int]:
            return {
                name: int(lan.python(host, SERVED_VERSION, services[name]))
                for name, host in hosts.items()
            }

        seen: dict[str, int] = {}

        def all_final() -> bool:
            seen.update(served())
            return all(v == final.version for v in seen.values())

        try:
            _wait(all_final, timeout=30, what="not every device serves the final version")
        except AssertionError:
            pytest.fail(f"devices serve {seen}, expected version {final.version} everywhere")
        # ... and said so to the cloud over MQTT before it went down.
        statuses = {d.device_id: d.serving_version for d in registry.list_devices()}
        assert statuses == {name: final.version for name in hosts}, statuses
    finally:
        registry.close()

    # -- every process we started was the real one: stopping them empties the namespaces ---
    processes.stop_all()
    for host in (cloud, *hosts.values()):
        assert lan.pids(host) == [], f"processes left in {host.netns}"
