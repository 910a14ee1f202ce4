"""An outsider with nothing but the fleet CA certificate tries to take over a secure fleet.

A real secure cloud (Mosquitto with TLS + ACL, the SuperLink with SuperNode auth behind
the nginx fleet proxy) trains two flashed devices. Then the outsider, with a private
``FLWR_HOME`` whose only secret-free ingredient is ``trust/ca.pem`` from a device
bundle, points ``flwr`` at the fleet port and tries to submit its own Flower App
(a ServerApp and a ClientApp that each write a marker file and copy the fleet signing
key), list and stop runs, list, register and unregister SuperNodes, and call the
Runtime API directly. Every attempt must be refused with the proxy's message, no marker
may appear, the SuperLink must know only the operator's run, the devices must keep
serving the operator's version, and the UI's event list must show the refusals.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import tarfile
import time
from pathlib import Path

import httpx
import pytest
from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE

from cloud import config as cloud_config
from cloud.proxy import REFUSAL_DETAIL
from cloud.supervisor import PROXY_EVENT_SOURCE, REFUSED_EVENT_KIND, init_cloud
from devices import pki
from devices.emulate import EmulatedFleet
from devices.flash import flash
from edge.flower_node import write_flwr_config
from edge.process import free_port, tool_env
from tests.e2e.conftest import fleet_spec, served_version, wait_served

pytestmark = pytest.mark.slow

OUTSIDER_MODULE = '''\
"""A stranger's Flower App: both halves try to leave a mark and steal the signing key."""
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

MARKERS = Path({markers!r})
KEY = Path({key!r})


def _leave_a_mark(who: str) -> None:
    MARKERS.mkdir(parents=True, exist_ok=True)
    try:
        stolen = KEY.read_text()
    except OSError as exc:
        stolen = f"could not read the key: {{exc}}"
    (MARKERS / f"{{who}}.marker").write_text(stolen)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    _leave_a_mark("serverapp")


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    _leave_a_mark("clientapp")
    return Message(msg.content, reply_to=msg)
'''

OUTSIDER_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "takeover"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "takeover_app:server"
clientapp = "takeover_app:client"

[tool.flwr.app.config]
rounds = 1
"""


def _outsider_app(root: Path, markers: Path, key: Path) -> Path:
    app = root / "takeover"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(OUTSIDER_PYPROJECT)
    (app / "takeover_app.py").write_text(OUTSIDER_MODULE.format(markers=str(markers), key=str(key)))
    return app


def _ca_from_bundle(bundle: Path, dest: Path) -> Path:
    """The outsider's only ingredient: ``trust/ca.pem`` from a device bundle."""
    with tarfile.open(bundle) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("trust/ca.pem"))
        data = tar.extractfile(member).read()  # type: ignore[union-attr]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


def _flwr(home: Path, *args: str, cwd: Path) -> tuple[dict[str, object], str]:
    res = subprocess.run(
        ["flwr", *args, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env=tool_env({"FLWR_HOME": str(home)}),
    )
    out = res.stdout + res.stderr
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        doc = {"success": res.returncode == 0}
    return doc, out


def test_an_outsider_with_the_fleet_ca_cannot_control_the_fleet(
    tmp_path: Path, mlp_model_dir: Path, stack_factory
) -> None:
    conf = init_cloud(
        tmp_path / "cloud",
        fleet="guarded",
        model_dir=mlp_model_dir,
        secure=True,
        broker_port=free_port(),
        superlink_port=free_port(),
    )
    s = cloud_config.load(conf)
    assert s.proxy.enabled, "cloud init --secure puts the proxy in front of the SuperLink"
    s.run.num_rounds = 1
    s.run.min_nodes = 2
    s.run.local_epochs = 1
    bundles = []
    for name in ("gate-a", "gate-b"):
        out = tmp_path / f"{name}.tar.gz"
        flash(cloud_dir=s.data_dir, profile="rpi4", name=name, cloud_host="127.0.0.1", out=out)
        bundles.append(out)

    stack = stack_factory(s)
    assert stack.proxy is not None and stack.superlink is not None
    fleet_port = s.superlink.port
    assert stack.fleet_address == f"127.0.0.1:{fleet_port}"
    assert stack.superlink.port != fleet_port
    # The SuperLink itself (Control API included) listens on loopback only.
    assert _listen_addresses(stack.superlink.port) == {"127.0.0.1"}

    fleet = EmulatedFleet(fleet_spec(s, stack, scheme="iid"), tmp_path / "emulated", 0)
    try:
        fleet.from_bundles(bundles)
        fleet.start()
        operator_run = stack.submit_run()
        assert stack.wait_for_run(timeout=300) == "finished:completed"
        served = stack.registry.latest_version().version
        addresses = {d.name: d.address for d in fleet.devices}
        wait_served(addresses, served, timeout=60)
        stack.record_refusals()  # nothing refused so far: the devices' traffic all passed
        assert [e for e in stack.registry.list_events() if e.kind == REFUSED_EVENT_KIND] == []

        # -- the outsider -------------------------------------------------------------
        outsider = tmp_path / "outsider"
        ca = _ca_from_bundle(bundles[0], outsider / "ca.pem")
        home = outsider / "flwr-home"
        write_flwr_config(home, address=f"127.0.0.1:{fleet_port}", root_certificates=ca)
        markers = outsider / "markers"
        app = _outsider_app(outsider, markers, s.signing.private_key)
        key = pki.generate_key()
        pki.write_public(outsider / "mallory.pub", pki.device_public_key_openssh(key))
        node_ids = [str(n["node-id"]) for n in stack.superlink.nodes()]
        attempts = {
            "run": ("run", str(app), "edgefl"),
            "ls": ("ls", "edgefl"),
            "stop": ("stop", operator_run, "edgefl"),
            "supernode ls": ("supernode", "list", "edgefl"),
            "supernode register": (
                "supernode",
                "register",
                str(outsider / "mallory.pub"),
                "edgefl",
            ),
            "supernode unregister": ("supernode", "unregister", node_ids[0], "edgefl"),
        }
        for what, args in attempts.items():
            doc, out = _flwr(home, *args, cwd=outsider)
            assert doc.get("success") is False, (what, out[-1500:])
            assert REFUSAL_DETAIL in out, (what, out[-1500:])
        ctx = ssl.create_default_context(cafile=str(ca))
        with httpx.Client(base_url=f"https://127.0.0.1:{fleet_port}", verify=ctx) as client:
            for path in ("/v1/runtime/acquire-task", "/v1/control/start-run", "/docs"):
                res = client.post(path, content=b"")
                assert res.status_code == 403 and res.json()["detail"] == REFUSAL_DETAIL, path
            # A Fleet call reaches the SuperLink, which refuses an unsigned one itself.
            unsigned = client.post(
                "/v1/fleet/pull-messages",
                content=b"",
                headers={"content-type": PROTOBUF_MEDIA_TYPE},
            )
            assert unsigned.status_code == 401, unsigned.text

        # Give anything that might have been started a chance to run, then look.
        time.sleep(8)
        assert not markers.exists() or list(markers.iterdir()) == [], "outsider code ran"
        runs = json.loads(stack.superlink.flwr("list", "edgefl", "--format", "json").stdout)["runs"]
        assert [str(r["run-id"]) for r in runs] == [operator_run]
        assert sorted(str(n["node-id"]) for n in stack.superlink.nodes()) == sorted(node_ids)
        assert {name: served_version(addr) for name, addr in addresses.items()} == {
            name: served for name in addresses
        }
        assert stack.registry.latest_version().version == served

        # The UI shows the refused attempts as events.
        deadline = time.monotonic() + 30
        refused: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            events = httpx.get(f"{stack.web.url}/api/events", params={"limit": 200}).json()
            refused = [e for e in events if e["kind"] == REFUSED_EVENT_KIND]
            if any("/v1/control/start-run" in str(e["detail"]) for e in refused) and any(
                "/v1/control/register-node" in str(e["detail"]) for e in refused
            ):
                break
            time.sleep(1.0)
        details = " | ".join(str(e["detail"]) for e in refused)
        for path in ("start-run", "list-runs", "stop-run", "list-nodes", "register-node",
                     "unregister-node"):  # fmt: skip
            assert f"/v1/control/{path} from 127.0.0.1 refused" in details, details
        assert "/v1/runtime/acquire-task" in details
        assert all(e["device_id"] == PROXY_EVENT_SOURCE for e in refused)
    finally:
        fleet.stop()


def _listen_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp{,6})."""
    found: set[str] = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.partition(":")
            if state != "0A" or int(hexport, 16) != port:
                continue
            if width == 8:
                raw = bytes.fromhex(addr)[::-1]
                found.add(".".join(str(b) for b in raw))
            else:
                found.add("ipv6:" + addr)
    return found
