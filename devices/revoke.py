"""Revoke a device: from now on the broker and the SuperLink refuse it.

``edgefl devices revoke NAME`` removes the device's password line and ACL block and
asks the running broker to reload (Mosquitto rereads both files on SIGHUP; other
clients stay connected, and a connected client whose user vanished is dropped). The
device's SuperNode key is unregistered from the SuperLink (``flwr supernode
unregister``), or, when no SuperLink runs, at the next ``edgefl cloud up``
(:func:`devices.secure_fleet.sync_supernode_registrations`). The registry keeps the
record, marked revoked, so the history stays visible; the name may be flashed again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from devices.flash import resolve_cloud_data_dir
from devices.secure_fleet import SecureFleet, revoke_device, set_node_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RevokeResult:
    """What :func:`revoke` did."""

    name: str
    fleet: str
    #: The node id that was unregistered from the SuperLink (None if there was none).
    unregistered_node_id: str | None = None
    broker_reloaded: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


def revoke(
    cloud_dir: Path,
    name: str,
    *,
    reload: Callable[[], bool | None] | None = None,
    unregister_supernode: Callable[[str], None] | None = None,
) -> RevokeResult:
    """Revoke device ``name`` of the secure fleet in ``cloud_dir``.

    ``reload`` asks the running broker to reread its files; ``unregister_supernode``
    removes a node id from the running SuperLink. Without them the files change and
    the rest happens at the next ``cloud up``.
    """
    sf = SecureFleet.load(resolve_cloud_data_dir(cloud_dir))
    before = revoke_device(sf, name)
    notes: list[str] = []
    reloaded = False
    if reload is not None:
        reloaded = reload() is not False
    if not reloaded:
        notes.append("no running broker was reloaded: the change applies at its next start")
    unregistered: str | None = None
    if before.node_id:
        if unregister_supernode is not None:
            unregister_supernode(before.node_id)
            set_node_id(sf, name, None)
            unregistered = before.node_id
        else:
            notes.append(
                f"no SuperLink reachable: node {before.node_id} is unregistered at the "
                "next `edgefl cloud up`"
            )
    logger.info("revoked %s (node %s)", name, before.node_id)
    return RevokeResult(
        name=name,
        fleet=sf.fleet,
        unregistered_node_id=unregistered,
        broker_reloaded=reloaded,
        notes=tuple(notes),
    )
