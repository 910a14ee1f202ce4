"""A paho client for a subscriber that takes in thousands of small messages a second.

The fleet monitor receives ~2,000 statuses a second from 10,000 devices (#18). Through
paho 2.2 one QoS 0 PUBLISH cost ~90 µs of CPU on the network thread, in the process that
also decodes them, writes the registry and serves the web UI (one GIL): several small
``recv`` calls and one ``select`` per packet, a lock pair for the receive time, an
``MQTTMessage`` with its own ``threading.Condition``, a formatted debug line (paho formats
every log line when ``on_log`` is set), and the topic matcher. Two things here cut that:

* :class:`ReadAheadSocket` reads up to :data:`READ_AHEAD_BYTES` per ``recv`` and serves
  paho's small reads from memory;
* :class:`ReadAheadClient` takes every **whole QoS 0 PUBLISH** already read straight from
  that memory (MQTT 3.1.1: fixed header, topic, payload; no packet id, no properties, no
  acknowledgement) and hands its topic and payload to :attr:`ReadAheadClient.on_qos0`.
  Any other packet (CONNACK, SUBACK, PINGRESP, a QoS 1 PUBLISH that needs its PUBACK, a
  PUBLISH not yet wholly read) goes through paho as before, in arrival order.

``_create_socket`` and ``_packet_read`` are paho's (2.2, pinned) internals; the fleet
monitor tests run this client against a real Mosquitto over TCP and TLS.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

logger = logging.getLogger(__name__)

#: Bytes read per ``recv``. paho reads a packet with several small ``recv`` calls (type
#: byte, each length byte, the rest) and one ``select`` per packet; every one of those
#: releases the GIL, and with the monitor's worker busy each can wait for it.
READ_AHEAD_BYTES = 256 * 1024
#: Most packets paho handles from memory before it looks at the socket again (writes,
#: keepalive).
READ_AHEAD_PACKETS = 1000

#: Seconds the network thread rests after a read that took QoS 0 messages. At 2,000 a
#: second a wake-up per few messages cost ~180 µs of CPU each; resting lets a few
#: dozen gather (a status is 5 s apart per device; QoS 1 acks wait as long at most).
READ_PAUSE_S = 0.01

_PUBLISH = 0x30
#: Packet type and QoS bits of the fixed header's first byte (DUP and RETAIN left out).
_TYPE_AND_QOS = 0xF6


class ReadAheadSocket:
    """A socket whose ``recv`` reads up to :data:`READ_AHEAD_BYTES` at once and serves
    paho's small reads from memory. ``pending()`` (what paho asks of a TLS socket) counts
    the bytes held, so paho does not wait on ``select`` while any are left."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._held = bytearray()

    def fill(self) -> int:
        """Read all the socket has (up to :data:`READ_AHEAD_BYTES`) into memory; returns
        the bytes read, 0 at end of stream. Raises what ``recv`` raises when it could read
        nothing at all (nothing there yet, or an error).

        A TLS socket's ``recv`` returns one TLS record at most, and Mosquitto sends each
        message in a record of its own: hence the loop until nothing is left.
        """
        got = 0
        while got < READ_AHEAD_BYTES:
            try:
                data = self._sock.recv(READ_AHEAD_BYTES - got)
            except OSError:  # BlockingIOError, ssl.SSLWantReadError, a lost connection
                if got:
                    break  # what was read first; the next read meets the error again
                raise
            if not data:
                break  # end of stream: the next fill() returns 0
            self._held += data
            got += len(data)
        return got

    def recv(self, size: int) -> bytes:
        if not self._held and not self.fill():
            return b""
        out = bytes(self._held[:size])
        del self._held[:size]
        return out

    @property
    def held(self) -> int:
        return len(self._held)

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return len(self._held) + (inner() if inner is not None else 0)

    def take_qos0_publishes(self, limit: int) -> list[tuple[bytes, bytes]]:
        """Remove and return (topic, payload) of the whole QoS 0 PUBLISH packets at the
        front of what is held, up to ``limit``; stops at the first other, partial or
        malformed packet (paho reads and reports that one)."""
        held = self._held
        size = len(held)
        taken: list[tuple[bytes, bytes]] = []
        pos = 0
        while len(taken) < limit and pos < size and held[pos] & _TYPE_AND_QOS == _PUBLISH:
            field = _remaining_length(held, pos + 1, size)
            if field is None:
                break
            length, start = field
            end = start + length
            if end > size or length < 2:
                break  # not wholly read yet, or no room for a topic (malformed)
            topic_end = start + 2 + (held[start] << 8 | held[start + 1])
            if topic_end > end or topic_end == start + 2:
                break  # a topic longer than the packet, or an empty one: malformed
            taken.append((bytes(held[start + 2 : topic_end]), bytes(held[topic_end:end])))
            pos = end
        if pos:
            del held[:pos]
        return taken

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _remaining_length(held: bytearray, start: int, size: int) -> tuple[int, int] | None:
    """The MQTT remaining length encoded at ``held[start:]`` (1-4 bytes, 7 bits each,
    least significant first) and where it ends; None if not wholly held or too long."""
    length = 0
    for k in range(4):
        i = start + k
        if i >= size:
            return None
        byte = held[i]
        length |= (byte & 0x7F) << (7 * k)
        if not byte & 0x80:
            return length, i + 1
    return None


class ReadAheadClient(mqtt.Client):
    """paho's client, reading its socket through :class:`ReadAheadSocket`.

    With :attr:`on_qos0` set (and MQTT 3.1.1 or 3.1), every whole QoS 0 PUBLISH read so
    far goes to it as ``on_qos0(topic, payload)`` (raw bytes) instead of ``on_message``;
    ``loop_read`` then handles every packet already in memory (paho's own handles one).
    """

    #: Called on the network thread with each QoS 0 PUBLISH's topic and payload bytes.
    on_qos0: Callable[[bytes, bytes], None] | None = None
    _took_qos0 = False

    def _create_socket(self) -> Any:
        return ReadAheadSocket(super()._create_socket())  # type: ignore[misc]

    def _packet_read(self) -> mqtt.MQTTErrorCode:
        sock = self._sock
        hook = self.on_qos0
        if (
            hook is not None
            and isinstance(sock, ReadAheadSocket)
            and self._in_packet["command"] == 0  # paho is not in the middle of a packet
            and self._protocol != mqtt.MQTTv5  # an MQTT 5 PUBLISH has properties
        ):
            if not sock.held:
                with contextlib.suppress(OSError):  # nothing to read or an error: paho's
                    sock.fill()  # own read below meets it again and reports it
            taken = sock.take_qos0_publishes(READ_AHEAD_PACKETS)
            if taken:
                for topic, payload in taken:
                    try:
                        hook(topic, payload)
                    except Exception:
                        logger.exception("QoS 0 message handler failed")
                with self._msgtime_mutex:
                    self._last_bytes_received = mqtt.time_func()
                self._took_qos0 = True
                return mqtt.MQTT_ERR_SUCCESS
        return super()._packet_read()  # type: ignore[no-any-return]

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        for _ in range(READ_AHEAD_PACKETS):
            sock = self._sock
            if rc != mqtt.MQTT_ERR_SUCCESS or not isinstance(sock, ReadAheadSocket):
                break
            if not sock.held:
                break
            rc = super().loop_read(max_packets)
        if self._took_qos0:
            # A stream of small messages: let the next ones gather in the socket, so that
            # each wake-up of the network thread (select, locks, the GIL) takes many.
            self._took_qos0 = False
            time.sleep(READ_PAUSE_S)
        return rc
