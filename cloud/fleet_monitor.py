"""Watch a fleet over MQTT: every device's status and events, decoded.

:class:`FleetMonitor` subscribes to ``topics.all_device_status_filter`` and
``topics.all_device_event_filter``, decodes payloads with :mod:`protos.codec` and hands
them to the callbacks (the device registry and the UI wire themselves in there). It also
keeps the latest status per device and recent events, so tests and the demo can wait
for the fleet to converge (:meth:`FleetMonitor.wait_for_fleet_version`).

Paho's network thread does no work of ours: ``on_message`` only queues the message, so
its PUBACK goes out at once. Mosquitto keeps at most 20 unacknowledged messages in flight
per client and queues the rest up to ``max_queued_messages``; acknowledging only after a
registry write made a release to a few hundred devices overflow that queue and Mosquitto
dropped statuses and events (issue 18). A **worker** thread decodes the queued messages
in batches and calls the callbacks; :attr:`FleetMonitor.backlog` is how many wait.

Statuses are subscribed with QoS 0, events with QoS 1. A status is periodic and retained:
the next one (or the retained one, on a new subscription) supersedes any that is lost, so
it needs no acknowledgement; at QoS 1, Mosquitto's in-flight window and one PUBACK round
trip per status capped what the monitor received. Events (installs, rejections) are not
periodic and keep QoS 1.

**10,000 devices** (one status every 5 s each: 2,000 a second) are what the receive
path is built for (issue 18, ``benchmarks/bench_telemetry.py``). Measured there, the
monitor received ~1,100-1,450 statuses/s and Mosquitto kept the rest *in its own
per-client output queue*: QoS 0 messages to a connected client are queued (up to
``max_queued_messages``), not dropped, and that queue shows neither in
``$SYS/broker/store/messages/count`` nor in ``$SYS/broker/publish/messages/sent``
(counted when written), only in the broker's memory and in the gap between what the
devices sent and what the monitor received. The receive path was the limit: paho decodes
every MQTT 5 PUBLISH's properties, and reads a packet with several small ``recv`` calls
and one ``select`` each, all releasing and retaking the GIL the worker also needs. So the
monitor speaks MQTT 3.1.1 (:data:`PROTOCOL`; it only receives, on a clean session) with
:class:`cloud.mqtt_read_ahead.ReadAheadClient`, which reads its socket ahead and takes
each QoS 0 PUBLISH (a status) straight from that buffer into the monitor's queue,
without paho's per-message objects, locks and log formatting (~90 µs of CPU per status
on the network thread before, ~13 µs after, #18); its worker **coalesces** each
batch (:meth:`FleetMonitor._coalesce`): a monitor that falls behind hands on only every
device's latest status, counting the others in :attr:`FleetMonitor.superseded`. Every
received message is counted exactly once: ``received == statuses_handled +
events_handled + superseded + malformed + ignored + backlog``.

Malformed payloads (anyone who may publish on the broker can send them) are logged and
dropped; a callback that raises is logged and does not stop the monitor.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar, cast

import paho.mqtt.client as mqtt

from cloud.errors import CloudError
from cloud.mqtt_read_ahead import ReadAheadClient
from edge.mqtt_util import (
    DEFAULT_RECONNECT_MAX_S,
    DEFAULT_RECONNECT_MIN_S,
    Endpoint,
    MqttConnection,
    make_client,
    unique_client_id,
)
from protos import codec, topics
from protos.errors import CodecError

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: How many recent events the monitor keeps in memory.
EVENT_HISTORY = 1000
#: Most messages the worker takes off the queue for one batch of callbacks. Large enough
#: that a monitor behind by more than a status interval finds each device's statuses in
#: one batch and keeps only the last (see ``FleetMonitor._coalesce``): 10,000 devices
#: send 2,000 a second at the default interval.
MAX_BATCH = 50_000
#: Subscription QoS of device statuses (periodic, retained: superseded, never acknowledged).
STATUS_QOS = 0
#: Subscription QoS of device events (one-off: acknowledged, queued while the cloud is away).
EVENT_QOS = 1
#: MQTT version of the monitor's connection. It only receives, on a clean session, so it
#: needs nothing of MQTT 5; paho's decoding of every MQTT 5 PUBLISH's properties took
#: about half of its receive CPU (~120 µs per status at 5, ~55 µs at 3.1.1, #18).
PROTOCOL = mqtt.MQTTv311
#: Seconds the worker keeps collecting after a batch's first message. A registry write
#: costs about a millisecond per transaction whatever its size: taking messages one by
#: one as they trickle in spent ~0.5 ms of CPU per status and kept paho's network thread
#: from the GIL; collecting for a moment makes batches of hundreds at 2,000 statuses/s.
BATCH_WAIT_S = 0.05
#: Most parsed topics the worker remembers (two per device; cleared when full).
TOPIC_CACHE = 50_000
#: Largest status or event payload decoded (bytes); a real one is a few hundred. The
#: broker's own limit is per message on every topic and must fit release chunks.
MAX_REPORT_BYTES = 64 * 1024

_STOP = ("", b"")
_STATUS_SUFFIX = "/" + topics.device_status("f", "d").rsplit("/", 1)[-1]


class FleetTimeout(CloudError, TimeoutError):
    """The fleet did not reach the awaited state in time."""


def _ignore(_value: object) -> None:
    return None


class FleetMonitor:
    """Subscribes to every device's status and events in one fleet."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        fleet: str,
        on_status: Callable[[codec.DeviceStatus], None] = _ignore,
        on_event: Callable[[codec.DeviceEvent], None] = _ignore,
        on_status_batch: Callable[[list[codec.DeviceStatus]], None] | None = None,
        on_event_batch: Callable[[list[codec.DeviceEvent]], None] | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        client_id: str | None = None,
        reconnect_min_s: float = DEFAULT_RECONNECT_MIN_S,
        reconnect_max_s: float = DEFAULT_RECONNECT_MAX_S,
    ) -> None:
        self.fleet = topics.check_name(fleet, what="fleet")
        self._on_status = on_status
        self._on_event = on_event
        #: Called once per batch with the statuses decoded in it, oldest first (the
        #: registry writes them in one transaction); ``on_status`` is then not called.
        self._on_status_batch = on_status_batch
        #: The same for events; ``on_event`` is then not called.
        self._on_event_batch = on_event_batch
        self._inbox: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        endpoint = Endpoint(
            host=host, port=port, username=username, password=password, ca_file=ca_file
        )
        self._client = cast(
            ReadAheadClient,
            make_client(
                endpoint,
                client_id or unique_client_id(f"edgefl-monitor-{fleet}"),
                client_class=ReadAheadClient,
                protocol=PROTOCOL,
            ),
        )
        self._client.on_message = self._on_message
        self._client.on_qos0 = self._on_qos0
        self._conn = MqttConnection(
            self._client,
            endpoint,
            on_connected=self._subscribe,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
            name=f"monitor[{fleet}]",
        )
        self._cond = threading.Condition()
        self._parsed: dict[str, topics.ParsedTopic] = {}  # worker thread only
        self._statuses: dict[str, codec.DeviceStatus] = {}
        self._events: collections.deque[codec.DeviceEvent] = collections.deque(maxlen=EVENT_HISTORY)
        # Counters, each written by one thread only. Every received message ends up in
        # exactly one: received == statuses_handled + events_handled + superseded
        # + malformed + ignored + backlog.
        #: Messages the broker delivered (statuses and events, any topic).
        self.received = 0
        #: Statuses decoded and handed to the callbacks.
        self.statuses_handled = 0
        #: Events decoded and handed to the callbacks.
        self.events_handled = 0
        #: Statuses left out because a later one of the same device came in the same batch.
        self.superseded = 0
        #: Payloads that are not a valid status or event (or too large), logged and dropped.
        self.malformed = 0
        #: Messages on topics that are not a device's status or event, or empty, dropped.
        self.ignored = 0

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, *, wait_s: float | None = 10.0) -> FleetMonitor:
        """Connect in the background; with ``wait_s``, wait that long for the first CONNACK."""
        self._worker = threading.Thread(
            target=self._work, name=f"monitor-{self.fleet}", daemon=True
        )
        self._worker.start()
        self._conn.start()
        if wait_s is not None and not self._conn.wait_connected(wait_s):
            logger.warning("fleet monitor not connected after %.0f s; still trying", wait_s)
        return self

    def stop(self, *, timeout: float = 10.0) -> None:
        """Disconnect, then let the worker finish what is queued (up to ``timeout``)."""
        self._conn.stop()
        if self._worker is not None:
            self._inbox.put(_STOP)
            self._worker.join(timeout)
            self._worker = None

    @property
    def backlog(self) -> int:
        """Messages received but not yet handled (a growing backlog: the cloud falls behind)."""
        return self._inbox.qsize()

    def __enter__(self) -> FleetMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- network thread ------------------------------------------------------------------

    def _subscribe(self, _session_present: bool) -> None:
        self._client.subscribe(
            [
                (topics.all_device_status_filter(self.fleet), STATUS_QOS),
                (topics.all_device_event_filter(self.fleet), EVENT_QOS),
            ]
        )

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        self.received += 1
        self._inbox.put((msg.topic, bytes(msg.payload)))

    def _on_qos0(self, topic: bytes, payload: bytes) -> None:
        # Statuses, straight from the read-ahead buffer (cloud.mqtt_read_ahead). A topic
        # that is not UTF-8 (Mosquitto refuses those) keeps its bytes as surrogates and
        # is then counted as ignored, not a device's.
        self.received += 1
        self._inbox.put((topic.decode("utf-8", "surrogateescape"), payload))

    # -- worker --------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = [self._inbox.get()]
            if batch[0] != _STOP:
                # Collect for a moment, then take what came (a timed ``get`` per message
                # cost more than the rest of the queueing).
                time.sleep(BATCH_WAIT_S)
            while len(batch) < MAX_BATCH and batch[-1] != _STOP:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in batch
            try:
                self._handle_batch([m for m in batch if m != _STOP])
            except Exception:
                # A bug must not kill the monitor; the next batch gets a fresh chance.
                logger.exception("fleet monitor worker: unexpected error")
            if stop:
                return

    def _coalesce(self, batch: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """The batch without statuses that a later status on the same topic supersedes.

        A status is the device's whole state and the next one replaces it, so only the
        last of a device's statuses in a batch is decoded and handed on (events all are).
        A monitor that fell behind thus catches up with the fleet's current state in
        one batch instead of replaying each stale status; :attr:`superseded` counts those
        left out. The retained OFFLINE Last Will is a status too: whichever of it and a
        device's own status came last is kept, as handling both in order would leave.
        """
        last: dict[str, int] = {}
        for i, (topic, _payload) in enumerate(batch):
            if topic.endswith(_STATUS_SUFFIX):
                last[topic] = i
        kept = [
            m for i, m in enumerate(batch) if not m[0].endswith(_STATUS_SUFFIX) or last[m[0]] == i
        ]
        self.superseded += len(batch) - len(kept)
        return kept

    def _handle_batch(self, batch: list[tuple[str, bytes]]) -> None:
        statuses: list[codec.DeviceStatus] = []
        events: list[codec.DeviceEvent] = []
        for topic, payload in self._coalesce(batch):
            decoded = self._decode(topic, payload)
            if isinstance(decoded, codec.DeviceStatus):
                statuses.append(decoded)
            elif isinstance(decoded, codec.DeviceEvent):
                events.append(decoded)
        self.statuses_handled += len(statuses)
        self.events_handled += len(events)
        if not statuses and not events:
            return
        with self._cond:
            for status in statuses:
                self._statuses[status.device_id] = status
            self._events.extend(events)
            self._cond.notify_all()
        if statuses and self._on_status_batch is not None:
            self._deliver(self._on_status_batch, statuses)
        elif statuses:
            for status in statuses:
                self._deliver(self._on_status, status)
        if events and self._on_event_batch is not None:
            self._deliver(self._on_event_batch, events)
        else:
            for event in events:
                self._deliver(self._on_event, event)

    def _parse(self, topic: str) -> topics.ParsedTopic:
        """``topics.parse``, remembered: each device's topic comes back every interval."""
        parsed = self._parsed.get(topic)
        if parsed is None:
            parsed = topics.parse(topic)
            if len(self._parsed) >= TOPIC_CACHE:  # made-up topics must not grow it
                self._parsed.clear()
            self._parsed[topic] = parsed
        return parsed

    def _decode(self, topic: str, payload: bytes) -> codec.DeviceStatus | codec.DeviceEvent | None:
        try:
            parsed = self._parse(topic)
        except topics.TopicError as exc:
            self.ignored += 1
            logger.warning("ignoring message on %r: %s", topic, exc)
            return None
        if not payload:
            # An empty retained message clears a topic (e.g. a removed device's status).
            self.ignored += 1
            logger.debug("ignoring empty payload on %s", topic)
            return None
        if len(payload) > MAX_REPORT_BYTES:
            self.malformed += 1
            logger.warning(
                "ignoring %d bytes on %s: over the %d bytes a device report may have",
                len(payload),
                topic,
                MAX_REPORT_BYTES,
            )
            return None
        try:
            if parsed.kind == "status":
                status = codec.status_from_bytes(payload)
                self._check_sender(parsed.device, status.device_id, topic)
                return status
            if parsed.kind == "event":
                event = codec.event_from_bytes(payload)
                self._check_sender(parsed.device, event.device_id, topic)
                return event
        except CodecError as exc:
            self.malformed += 1
            logger.warning("malformed payload on %s: %s", topic, exc)
            logger.debug("payload on %s: %r", topic, payload)
            return None
        self.ignored += 1  # another kind of device topic: not subscribed, not ours
        return None

    @staticmethod
    def _check_sender(topic_device: str, claimed: str, topic: str) -> None:
        if topic_device != claimed:
            raise CodecError(f"device id {claimed!r} in the payload differs from the topic {topic}")

    @staticmethod
    def _deliver(callback: Callable[[_T], None], value: _T) -> None:
        try:
            callback(value)
        except Exception:
            logger.exception("fleet monitor callback %r failed", callback)

    # -- queries -------------------------------------------------------------------------

    def statuses(self) -> dict[str, codec.DeviceStatus]:
        """The latest status of every device seen so far."""
        with self._cond:
            return dict(self._statuses)

    def events(self) -> list[codec.DeviceEvent]:
        """The most recent events (oldest first)."""
        with self._cond:
            return list(self._events)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until ``predicate()`` (called with the monitor's lock held) is true."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FleetTimeout(f"{what} not reached within {timeout:.0f} s")
                self._cond.wait(remaining)

    def wait_for_fleet_version(
        self, version: int, device_ids: Iterable[str], timeout: float
    ) -> dict[str, codec.DeviceStatus]:
        """Return once every listed device reports serving ``version`` (and is not OFFLINE).

        Raises :class:`FleetTimeout` naming the devices that did not get there.
        """
        wanted = list(device_ids)

        def lagging() -> list[str]:
            return [
                d
                for d in wanted
                if (s := self._statuses.get(d)) is None
                or s.serving_version != version
                or s.state == "OFFLINE"
            ]

        try:
            self.wait_for(lambda: not lagging(), timeout, f"version {version} on {wanted}")
        except FleetTimeout as exc:
            with self._cond:
                seen = {
                    d: (s.serving_version, s.state) if (s := self._statuses.get(d)) else None
                    for d in lagging()
                }
            raise FleetTimeout(f"{exc}; lagging (version, state): {seen}") from None
        with self._cond:
            return {d: self._statuses[d] for d in wanted}

    def wait_for_event(
        self, predicate: Callable[[codec.DeviceEvent], bool], timeout: float
    ) -> codec.DeviceEvent:
        """The first kept event matching ``predicate``, waiting up to ``timeout`` for it."""
        found: list[codec.DeviceEvent] = []

        def match() -> bool:
            found[:] = [e for e in self._events if predicate(e)][:1]
            return bool(found)

        try:
            self.wait_for(match, timeout, "a matching device event")
        except FleetTimeout as exc:
            recent = [(e.device_id, e.kind, e.detail[:80]) for e in list(self._events)[-10:]]
            raise FleetTimeout(f"{exc}; recent events: {recent}") from None
        return found[0]

    def wait_for_status(
        self, device_id: str, predicate: Callable[[codec.DeviceStatus], bool], timeout: float
    ) -> codec.DeviceStatus:
        """The latest status of ``device_id`` once it satisfies ``predicate``."""

        def match() -> bool:
            s = self._statuses.get(device_id)
            return s is not None and predicate(s)

        self.wait_for(match, timeout, f"status of {device_id}")
        with self._cond:
            return self._statuses[device_id]
