"""A real cloud (Mosquitto, SuperLink, registry, UI) and real emulated devices for e2e tests."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from cloud import config as cloud_config
from cloud.supervisor import CloudStack, init_cloud
from devices.emulate import EmulatedFleet, FleetSpec
from edge.process import connect_host, free_port
from protos.kserve import grpc_predict_v2_pb2 as kserve_pb2
from protos.kserve import grpc_predict_v2_pb2_grpc as kserve_grpc


@pytest.fixture
def cloud_settings(tmp_path: Path, mlp_model_dir: Path) -> cloud_config.CloudSettings:
    """Settings of a fresh plain-loopback cloud with fixed free ports (restartable)."""
    conf = init_cloud(tmp_path / "cloud", fleet="e2e", model_dir=mlp_model_dir)
    s = cloud_config.load(conf)
    s.broker.port = free_port()
    s.superlink.port = free_port()
    s.run = dataclasses.replace(
        s.run,
        num_rounds=3,
        min_nodes=1,
        wait_for_nodes_s=60.0,
        round_timeout_s=60.0,
        local_epochs=3,
    )
    return s


StackFactory = Callable[..., CloudStack]


@pytest.fixture
def stack_factory() -> Iterator[StackFactory]:
    stacks: list[CloudStack] = []

    def start(settings: cloud_config.CloudSettings, **kwargs: object) -> CloudStack:
        stack = CloudStack(settings, **kwargs)  # type: ignore[arg-type]
        stacks.append(stack)
        return stack.start()

    yield start
    for stack in reversed(stacks):
        stack.stop()


def fleet_spec(
    settings: cloud_config.CloudSettings, stack: CloudStack, **kwargs: object
) -> FleetSpec:
    return FleetSpec(
        fleet=settings.cloud.fleet,
        broker_host=connect_host(settings.broker.host),
        broker_port=stack.runtime_settings.broker.port,
        superlink=stack.fleet_address,
        signing_public_key=settings.signing.public_key,
        initial_package=settings.data_dir / "initial.pkg",
        card_json=(settings.model.dir / "card.json").read_text(),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def fleet_factory(tmp_path: Path) -> Iterator[Callable[..., EmulatedFleet]]:
    fleets: list[EmulatedFleet] = []

    def make(
        spec: FleetSpec, count: int, *, prefix: str = "dev", start: bool = True
    ) -> EmulatedFleet:
        fleet = EmulatedFleet(spec, tmp_path / f"devices-{prefix}", count, prefix=prefix)
        fleets.append(fleet)
        fleet.prepare()
        return fleet.start() if start else fleet

    yield make
    for fleet in reversed(fleets):
        fleet.stop()


def served_version(address: str, model: str = "digits") -> int:
    """The version the device's inference service reports in ModelMetadata (0 if none)."""
    with grpc.insecure_channel(address) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        try:
            meta = stub.ModelMetadata(kserve_pb2.ModelMetadataRequest(name=model), timeout=5)
        except grpc.RpcError:
            return 0
    return max((int(v) for v in meta.versions), default=0)


def wait_served(addresses: dict[str, str], version: int, timeout: float = 60.0) -> dict[str, int]:
    """Wait until every device serves ``version``; return what each serves at the end."""
    deadline = time.monotonic() + timeout
    seen: dict[str, int] = {}
    while time.monotonic() < deadline:
        seen = {name: served_version(addr) for name, addr in addresses.items()}
        if all(v == version for v in seen.values()):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"devices did not all reach version {version} in {timeout:.0f}s: {seen}")


def wait_for_round(stack: CloudStack, round_: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = stack.registry.latest_run()
        if run is not None and any(
            r.round == round_ and r.finished for r in stack.registry.list_rounds(run.id)
        ):
            return
        time.sleep(0.5)
    raise AssertionError(f"round {round_} did not finish in {timeout:.0f}s")


def kill_broker_back_from_autosave(
    stack: CloudStack, autosave: bytes, monkeypatch: pytest.MonkeyPatch, timeout: float = 60
) -> None:
    """SIGKILL the stack's broker; the watchdog's restart starts it from ``autosave``.

    Mosquitto saves retained messages every few seconds, so a SIGKILLed broker can come
    back with an older database. The older database is put in place as the broker starts
    again, so the race is not left to chance. Returns once the new broker process runs.
    """
    from cloud.broker import Broker

    assert stack.broker is not None and stack.broker.process is not None
    db = stack.broker.config.data_dir / "mosquitto.db"
    start = Broker.start
    restored: list[bytes] = []

    def start_from_old_autosave(self: Broker, **kwargs: object) -> Broker:
        if not restored:
            restored.append(autosave)
            db.write_bytes(autosave)
        return start(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Broker, "start", start_from_old_autosave)
    old_pid = stack.broker.process.pid
    stack.broker.process.kill()
    deadline = time.monotonic() + timeout
    while not (
        (p := stack.broker.process) is not None and p.alive() and p.pid != old_pid and restored
    ):
        assert time.monotonic() < deadline, "the watchdog did not restart the broker"
        time.sleep(0.2)
