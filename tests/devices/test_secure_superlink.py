"""A real SuperLink with TLS and SuperNode authentication, fed by flash and revoke.

Devices start their SuperNode only from what their bundle holds (``edge.toml``'s
``[flower]`` section, the CA and the device key). A key the SuperLink does not know
makes the SuperNode exit ("Failed to activate SuperNode").
"""

from __future__ import annotations

import contextlib
import time
import tomllib
from pathlib import Path

import pytest

from devices import pki
from devices.flash import flash
from devices.revoke import revoke
from devices.secure_fleet import SecureFleet, init_secure, read_registry, unregister_supernode
from edge.flower_node import FlowerError, SuperLink, SuperLinkTLS, SuperNode
from edge.process import free_port
from tests.fixtures.flower import wait_for_nodes

WAIT_S = 60.0


def _supernode_from_bundle(bundle: Path, data_dir: Path) -> SuperNode:
    flower = tomllib.loads((bundle / "edge.toml").read_text())["flower"]
    return SuperNode(
        superlink=flower["superlink"],
        data_dir=data_dir,
        root_certificates=bundle / flower["root_certificates"],
        auth_private_key=bundle / flower["auth_private_key"],
    )


def _assert_refused(node: SuperNode) -> None:
    """Start ``node`` and wait until it gives up; its log must say the SuperLink refused it."""
    with contextlib.suppress(FlowerError):  # it may exit before its runtime port opens
        node.start()
    assert node.process is not None
    deadline = time.monotonic() + WAIT_S
    while node.process.alive():
        assert time.monotonic() < deadline, "the SuperNode was not refused"
        time.sleep(0.2)
    assert "Failed to activate SuperNode" in node.process.log_tail(60)


@pytest.mark.slow
def test_registered_key_connects_unregistered_and_revoked_keys_are_refused(
    tmp_path: Path,
) -> None:
    port = free_port()
    sf: SecureFleet = init_secure(tmp_path / "cloud", fleet="vineyard", superlink_port=port)
    link = SuperLink(
        data_dir=tmp_path / "superlink",
        port=port,
        tls=SuperLinkTLS(sf.superlink_certfile, sf.superlink_keyfile, sf.ca_cert),
        enable_supernode_auth=True,
    )
    nodes: list[SuperNode] = []
    try:
        link.start()
        bundles: dict[str, Path] = {}
        for name in ("dev-a", "dev-b"):
            boot = tmp_path / f"boot-{name}"
            boot.mkdir()
            result = flash(cloud_dir=sf.data_dir, profile="rpi4", name=name,
                           cloud_host="127.0.0.1", boot=boot,
                           register_supernode=link.register_supernode)  # fmt: skip
            assert result.node_id
            bundles[name] = result.bundle
        registry = read_registry(sf)

        node_a = _supernode_from_bundle(bundles["dev-a"], tmp_path / "node-a")
        node_b = _supernode_from_bundle(bundles["dev-b"], tmp_path / "node-b")
        nodes += [node_a, node_b]
        node_a.start()
        node_b.start()
        online = wait_for_nodes(link, 2, timeout=WAIT_S)
        assert sorted(online) == sorted([registry["dev-a"].node_id, registry["dev-b"].node_id])

        # A key nobody registered: same CA, same address, refused.
        stranger_key = tmp_path / "stranger" / "supernode.key"
        pki.write_secret(stranger_key, pki.device_private_key_openssh(pki.generate_key()))
        stranger = SuperNode(
            superlink=link.address,
            data_dir=tmp_path / "node-stranger",
            root_certificates=bundles["dev-a"] / "trust" / "ca.pem",
            auth_private_key=stranger_key,
        )
        nodes.append(stranger)
        _assert_refused(stranger)

        # Revoke A: its running SuperNode is dropped, a restart is refused, B stays online.
        result = revoke(
            sf.data_dir, "dev-a", unregister_supernode=lambda nid: unregister_supernode(link, nid)
        )
        assert result.unregistered_node_id == registry["dev-a"].node_id
        deadline = time.monotonic() + WAIT_S
        while node_a.process is not None and node_a.process.alive():
            assert time.monotonic() < deadline, "the revoked SuperNode kept running"
            time.sleep(0.2)
        node_a.stop()
        again = _supernode_from_bundle(bundles["dev-a"], tmp_path / "node-a-again")
        nodes.append(again)
        _assert_refused(again)
        assert link.online_node_ids() == [registry["dev-b"].node_id]
        assert node_b.process is not None and node_b.process.alive()
        assert read_registry(sf)["dev-a"].status == "revoked"
    finally:
        for node in reversed(nodes):
            node.stop()
        link.stop()
