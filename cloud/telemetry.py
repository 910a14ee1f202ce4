"""What the cloud believes of device telemetry: the gate between the fleet monitor and the registry.

Anyone who may publish on the broker can claim anything in a status or an event. The
registry therefore only records reports that pass these rules (#15):

* **Known devices only.** A status or event from a device the cloud does not know is
  dropped (logged, counted in :attr:`TelemetryGate.dropped`), so it cannot list a ghost
  device as online. *Known* means: in a secure fleet, a device enrolled with
  ``edgefl devices flash`` and not revoked (``devices/registry.json``, reread when it
  changes); in the default fleet, a device that has answered in a federated round (the
  aggregator recorded its reply) or that the registry already lists. So in the default
  fleet a new device appears once it has trained in a round; its statuses before that
  are not recorded.
* **Timestamps bounded by receive time** (:data:`cloud.registry.MAX_STATUS_AHEAD_MS`):
  enforced by :meth:`cloud.registry.Registry.upsert_device_status`.
* **Versions the registry does not know are flagged.** A ``release_installed`` event
  for such a version is recorded as sent and followed by an ``unknown_version`` alert
  event; the web UI marks a device serving such a version (:mod:`cloud.web.app`).

In a secure fleet the broker adds what the cloud cannot check itself: each device may
publish only on its own topics, and its client id is its user name (see
:mod:`cloud.broker`), so no device can speak for, or knock off, another.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cloud.registry import InvalidRecordError, Registry
from protos import codec

logger = logging.getLogger(__name__)

#: Event kind recorded when a device claims a version the registry does not know.
EVENT_UNKNOWN_VERSION = "unknown_version"
#: The agent's event kind for an installed release (``edge.agent.EVENT_INSTALLED``).
EVENT_INSTALLED = "release_installed"
#: Least seconds between two reloads of the known devices after a miss.
REFRESH_S = 1.0
#: Least seconds between two warnings about the same unknown device (it reports every few
#: seconds; one line a minute says it is still there without flooding the log).
WARN_EVERY_S = 60.0


def enrolled_devices(data_dir: Path) -> Callable[[], set[str]]:
    """The active devices of a secure fleet, reread when ``devices/registry.json`` changes."""
    from devices.secure_fleet import ACTIVE, SecureFleet, read_registry

    sf = SecureFleet.load(data_dir)
    cache: dict[str, object] = {"mtime": None, "names": set()}

    def names() -> set[str]:
        try:
            mtime = sf.registry_file.stat().st_mtime_ns
        except FileNotFoundError:
            return set()
        if mtime != cache["mtime"]:
            cache["names"] = {n for n, rec in read_registry(sf).items() if rec.status == ACTIVE}
            cache["mtime"] = mtime
        return cache["names"]  # type: ignore[return-value]

    return names


class TelemetryGate:
    """Records statuses and events of known devices in the registry, flags unknown versions.

    ``known`` returns the device ids to accept (a secure fleet's enrolled devices);
    without it, the registry's own :meth:`~cloud.registry.Registry.known_device_ids`
    decide (the default fleet). Thread-safe; wire :meth:`on_status` and :meth:`on_event`
    into :class:`cloud.fleet_monitor.FleetMonitor`.
    """

    def __init__(self, registry: Registry, *, known: Callable[[], set[str]] | None = None) -> None:
        self.registry = registry
        self._enrolled = known
        self._lock = threading.Lock()
        self._known: set[str] = set()
        self._versions: set[int] = set()
        self._known_at = self._versions_at = -REFRESH_S
        #: Reports dropped because their device is not known.
        self.dropped = 0
        self._warned_at: dict[str, float] = {}

    def _is_known(self, device_id: str) -> bool:
        if self._enrolled is not None:
            return device_id in self._enrolled()
        with self._lock:
            if device_id not in self._known and time.monotonic() - self._known_at >= REFRESH_S:
                self._known = self.registry.known_device_ids()
                self._known_at = time.monotonic()
            return device_id in self._known

    def knows_version(self, version: int) -> bool:
        """Whether the registry has this version (0, "no model yet", always counts)."""
        if version == 0:
            return True
        with self._lock:
            if version in self._versions:
                return True
            if time.monotonic() - self._versions_at >= REFRESH_S:
                self._versions = self.registry.version_numbers()
                self._versions_at = time.monotonic()
            return version in self._versions

    def _drop(self, what: str, device_id: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        with self._lock:
            last = self._warned_at.get(device_id)
            if last is not None and now - last < WARN_EVERY_S:
                return
            if len(self._warned_at) >= 10_000:  # a flood of made-up ids must not grow this
                self._warned_at.clear()
            self._warned_at[device_id] = now
        logger.warning(
            "ignoring a %s from %r: not a device of this fleet (in the default fleet a "
            "device is known once it has answered a round; said again at most every %.0f s)",
            what,
            device_id,
            WARN_EVERY_S,
        )

    def on_statuses(self, statuses: list[codec.DeviceStatus]) -> None:
        """Record a batch of statuses (oldest first) in one registry transaction."""
        admitted = []
        for status in statuses:
            if self._is_known(status.device_id):
                admitted.append(status)
            else:
                self._drop("status", status.device_id)
        if admitted:
            # Statuses dated too far ahead are logged and skipped by the registry.
            self.registry.upsert_device_statuses(admitted)

    def on_status(self, status: codec.DeviceStatus) -> None:
        if not self._is_known(status.device_id):
            self._drop("status", status.device_id)
            return
        try:
            self.registry.upsert_device_status(status)
        except InvalidRecordError as exc:
            logger.warning("refusing a status: %s", exc)

    def on_events(self, events: list[codec.DeviceEvent]) -> None:
        """Record a batch of events; flag installs of versions the registry does not know."""
        admitted = []
        for event in events:
            if self._is_known(event.device_id):
                admitted.append(event)
            else:
                self._drop("event", event.device_id)
        if not admitted:
            return
        self.registry.record_events(admitted)
        alerts = [
            self._unknown_version_event(e)
            for e in admitted
            if e.kind == EVENT_INSTALLED and not self.knows_version(e.version)
        ]
        if alerts:
            self.registry.record_events(alerts)

    def on_event(self, event: codec.DeviceEvent) -> None:
        self.on_events([event])

    @staticmethod
    def _unknown_version_event(event: codec.DeviceEvent) -> codec.DeviceEvent:
        detail = (
            f"{event.device_id} reports installing version {event.version}, which the "
            "registry does not know: a release this cloud did not issue"
        )
        logger.error("%s", detail)
        return codec.DeviceEvent(
            device_id=event.device_id,
            timestamp_ms=int(time.time() * 1000),
            kind=EVENT_UNKNOWN_VERSION,
            detail=detail,
            version=event.version,
        )
