"""Shared paho-mqtt plumbing: client construction, TLS/credentials, reconnect with backoff.

Every edgefl MQTT client that publishes or keeps a session (device agent, cloud
publisher) speaks **MQTT 5.0**. We chose 5.0 over 3.1.1 because it gives us, on every
broker we target (Mosquitto ≥ 1.6, EMQX, AWS IoT Core, HiveMQ):

* a bounded persistent session (``Session Expiry Interval``) instead of 3.1.1's
  "forever or nothing" ``clean_session=False``;
* reason codes on PUBACK, so a publish refused by an ACL or by a broker's
  ``message_size_limit`` is reported to the publisher instead of silently dropped.

The cloud's fleet monitor only receives, on a clean session, and needs neither: it
speaks 3.1.1 (``make_client(protocol=...)``), because paho decodes every MQTT 5 PUBLISH's
properties, which was about half of the monitor's CPU per received status (#18).

:class:`MqttConnection` owns the connection of a long-lived client. Paho's own
reconnect loop doubles its delay without jitter, so a whole fleet that lost its broker
would reconnect in lock-step; we disable it (``reconnect_on_failure=False``) and run
our own supervisor thread with exponential backoff and jitter
(:func:`backoff_delay`). Paho's network thread (``loop_start``) still does all socket
I/O, so ``publish``/``subscribe`` may be called from any thread.
"""

from __future__ import annotations

import itertools
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.errors import EdgeError

logger = logging.getLogger(__name__)

#: The MQTT protocol version every edgefl client speaks.
PROTOCOL = mqtt.MQTTv5
#: Default seconds between keepalive PINGs.
DEFAULT_KEEPALIVE = 30
#: Default first reconnect delay (seconds).
DEFAULT_RECONNECT_MIN_S = 0.5
#: Default largest reconnect delay (seconds).
DEFAULT_RECONNECT_MAX_S = 30.0

_client_counter = itertools.count(1)


class MqttError(EdgeError, RuntimeError):
    """A connection that could not be made or a request the broker refused."""


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach the broker."""

    host: str
    port: int
    #: Username for broker authentication (Mosquitto ``password_file``); None = anonymous.
    username: str | None = None
    #: Password for ``username``.
    password: str | None = None
    #: PEM CA bundle that signed the broker's certificate; set it to use TLS.
    ca_file: Path | str | None = None
    #: Seconds between keepalive PINGs; the broker declares us dead after 1.5 times that.
    keepalive: int = DEFAULT_KEEPALIVE


def unique_client_id(prefix: str) -> str:
    """A client id unlikely to collide with another process's (prefix + pid + counter)."""
    import os

    return f"{prefix}-{os.getpid()}-{next(_client_counter)}-{random.randrange(1 << 32):08x}"


def make_client(
    endpoint: Endpoint,
    client_id: str,
    *,
    client_class: type[mqtt.Client] = mqtt.Client,
    protocol: mqtt.MQTTProtocolVersion = PROTOCOL,
) -> mqtt.Client:
    """A paho client (MQTT 5 unless told) with credentials and TLS set, no auto-reconnect."""
    client = client_class(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        reconnect_on_failure=False,
    )
    if endpoint.username is not None:
        client.username_pw_set(endpoint.username, endpoint.password)
    if endpoint.ca_file is not None:
        client.tls_set(ca_certs=str(endpoint.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.on_log = _log_paho
    return client


def _log_paho(client: mqtt.Client, _userdata: object, level: int, buf: str) -> None:
    """Route paho's own messages to our logger: its errors as warnings, the rest at DEBUG.

    paho reports "Client is not connected" as an error after every clean disconnect;
    that one is logged at DEBUG too.
    """
    serious = level in (mqtt.MQTT_LOG_ERR, mqtt.MQTT_LOG_WARNING)
    if serious and not buf.startswith("Client is not connected"):
        logger.warning("paho: %s", buf)
    else:
        logger.debug("paho: %s", buf)


def connect_properties(session_expiry_s: int) -> Properties | None:
    """CONNECT properties asking the broker to keep our session ``session_expiry_s``."""
    if session_expiry_s <= 0:
        return None
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = int(session_expiry_s)
    return props


def backoff_delay(
    attempt: int, min_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): exponential with equal jitter.

    The ceiling doubles from ``min_s`` up to ``max_s``; the delay is drawn uniformly from
    ``[ceiling/2, ceiling]``, so it never drops below half the ceiling (no hammering)
    and two devices that lost the broker together drift apart.
    """
    ceiling = min(max_s, min_s * (2 ** min(attempt, 30)))
    draw = (rng or random).uniform(0.0, ceiling / 2)
    return ceiling / 2 + draw


def reason_failed(reason_code: Any) -> bool:
    """True if a paho reason code (v5 ReasonCode or a plain int) denotes a failure."""
    is_failure = getattr(reason_code, "is_failure", None)
    if is_failure is not None:
        return bool(is_failure)
    return int(reason_code) >= 0x80


class MqttConnection:
    """Keeps one paho client connected: connect, watch, back off with jitter, reconnect.

    ``on_connected(session_present)`` runs on paho's network thread after every
    successful CONNACK; keep it short (subscribe, enqueue work). ``before_connect()``
    runs on the supervisor thread before every attempt (e.g. to refresh the Last Will).
    The owner sets ``client.on_message`` and friends itself.
    """

    def __init__(
        self,
        client: mqtt.Client,
        endpoint: Endpoint,
        *,
        on_connected: Callable[[bool], None] | None = None,
        before_connect: Callable[[], None] | None = None,
        clean_start: bool = True,
        session_expiry_s: int = 0,
        reconnect_min_s: float = DEFAULT_RECONNECT_MIN_S,
        reconnect_max_s: float = DEFAULT_RECONNECT_MAX_S,
        name: str = "mqtt",
    ) -> None:
        self.client = client
        self.endpoint = endpoint
        self._on_connected = on_connected
        self._before_connect = before_connect
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s
        self._min_s = reconnect_min_s
        self._max_s = reconnect_max_s
        self._name = name
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect

    # -- paho callbacks (network thread) ---------------------------------------------

    def _handle_connect(
        self, _c: mqtt.Client, _u: object, flags: Any, reason_code: Any, _p: object
    ) -> None:
        if reason_failed(reason_code):
            logger.warning("%s: broker refused the connection: %s", self._name, reason_code)
            self._wake.set()
            return
        self._connected.set()
        session_present = bool(getattr(flags, "session_present", False))
        logger.info(
            "%s: connected to %s:%d (session present: %s)",
            self._name,
            self.endpoint.host,
            self.endpoint.port,
            session_present,
        )
        if self._on_connected is not None:
            try:
                self._on_connected(session_present)
            except Exception:
                logger.exception("%s: on_connected hook failed", self._name)

    def _handle_disconnect(
        self, _c: mqtt.Client, _u: object, _flags: Any, reason_code: Any, _p: object
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._wake.set()
        if was and not self._stop.is_set():
            logger.warning("%s: connection lost: %s", self._name, reason_code)

    # -- supervisor ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def start(self) -> None:
        if self._thread is not None:
            raise MqttError(f"{self._name}: already started")
        self._thread = threading.Thread(
            target=self._supervise, name=f"{self._name}-supervisor", daemon=True
        )
        self._thread.start()

    def _supervise(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            if self._before_connect is not None:
                try:
                    self._before_connect()
                except Exception:
                    logger.exception("%s: before_connect hook failed", self._name)
            self._wake.clear()
            had_session = False
            # MQTT 3.1.1 has neither clean start nor properties (its session is the
            # client's clean_session, set when it was made).
            v5: dict[str, Any] = (
                {
                    "clean_start": self._clean_start,
                    "properties": connect_properties(self._session_expiry_s),
                }
                if self.client.protocol == mqtt.MQTTv5
                else {}
            )
            try:
                self.client.connect(
                    self.endpoint.host,
                    self.endpoint.port,
                    keepalive=self.endpoint.keepalive,
                    **v5,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                logger.warning(
                    "%s: cannot connect to %s:%d: %s",
                    self._name,
                    self.endpoint.host,
                    self.endpoint.port,
                    exc,
                )
            else:
                self.client.loop_start()
                while not self._stop.is_set() and not self._wake.is_set():
                    self._wake.wait(1.0)
                    if self._connected.is_set():
                        had_session = True
                if self._connected.is_set():
                    had_session = True
                if self._stop.is_set():
                    return  # stop() disconnects and joins paho's thread
                self.client.loop_stop()
            if had_session:
                attempt = 0
            delay = backoff_delay(attempt, self._min_s, self._max_s, self._rng)
            attempt += 1
            logger.info("%s: reconnecting in %.2f s", self._name, delay)
            self._stop.wait(delay)

    def stop(self, *, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no Last Will) and stop both threads."""
        self._stop.set()
        self._wake.set()
        try:
            self.client.disconnect()
        except Exception:  # already disconnected: nothing to close
            logger.debug("%s: disconnect raised", self._name, exc_info=True)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.client.loop_stop()
        self._connected.clear()


def wait_for_mids(
    infos: list[mqtt.MQTTMessageInfo], failures: dict[int, Any], deadline: float
) -> list[str]:
    """Wait until every message is acknowledged or ``deadline`` (monotonic) passes.

    Returns a list of problems (empty when all PUBACKs arrived without a failure
    reason code); ``failures`` maps message ids to failing reason codes, filled by the
    owner's ``on_publish``.
    """
    problems: list[str] = []
    for info in infos:
        remaining = deadline - time.monotonic()
        try:
            info.wait_for_publish(timeout=max(remaining, 0.0))
        except (ValueError, RuntimeError) as exc:
            problems.append(f"message {info.mid}: {exc}")
            continue
        if not info.is_published():
            problems.append(f"message {info.mid}: no PUBACK before the deadline")
        elif info.mid in failures:
            problems.append(f"message {info.mid}: broker refused it ({failures[info.mid]})")
    return problems
