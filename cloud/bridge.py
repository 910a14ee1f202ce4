"""Regional Mosquitto brokers bridged to the cloud broker: one fleet over several brokers.

Mosquitto has no clustering; its **bridge** is the way to spread devices over several
brokers. A regional broker (near its devices) opens one MQTT connection to the cloud
broker and forwards, for one fleet:

* ``edgefl/<fleet>/release/#`` **in** (cloud → region): the retained manifest and chunks,
  and the empty retained messages that clear an old release's chunks. The bridge's
  subscription makes the cloud send the retained release, which the regional broker
  stores as retained too, so its devices get it on subscribe like on the cloud broker;
* ``edgefl/<fleet>/device/#`` **out** (region → cloud): statuses (retained) and events,
  which the cloud's fleet monitor reads as if the devices were connected to it.

The bridge session is persistent (``cleansession false``, a fixed ``remote_clientid``):
QoS 1 messages published while the bridge is down are queued on the other side and
delivered when it reconnects, and a restarted regional broker re-subscribes and gets the
retained release again. ``try_private`` lets Mosquitto keep the retain flag across the
bridge. Devices connect to their regional broker exactly as they would to the cloud's.

:class:`BridgeConfig` renders the ``connection`` block that goes into the regional
broker's ``mosquitto.conf`` (:attr:`cloud.broker.BrokerConfig.bridges`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cloud.errors import CloudError
from protos import topics

#: Seconds Mosquitto waits before reconnecting a bridge that dropped: first, then at most.
RESTART_TIMEOUT_S = (1, 30)
#: Bridge keepalive bounds (seconds): Mosquitto refuses below 5; MQTT's field holds 65535.
MIN_KEEPALIVE_S = 5
MAX_KEEPALIVE_S = 65535


class BridgeError(CloudError, ValueError):
    """A bridge configuration that Mosquitto would refuse or misread."""


@dataclass(frozen=True)
class BridgeConfig:
    """One regional broker's bridge to the cloud broker, for one fleet."""

    #: The regional broker's name: the bridge connection's name and client id suffix.
    region: str
    #: The fleet whose releases and device reports cross the bridge.
    fleet: str
    #: The cloud broker's host, as the regional broker reaches it.
    remote_host: str
    #: The cloud broker's port.
    remote_port: int
    #: The bridge's username on the cloud broker (None = anonymous).
    remote_username: str | None = None
    #: Its password.
    remote_password: str | None = None
    #: PEM CA bundle of the cloud broker's TLS certificate (None = plain TCP).
    cafile: Path | None = None
    #: MQTT keepalive of the bridge connection (seconds).
    keepalive: int = 30

    def __post_init__(self) -> None:
        problems = []
        for name in ("region", "fleet"):
            try:
                topics.check_name(getattr(self, name), what=name)
            except topics.TopicError as exc:
                problems.append(str(exc))
        if not 0 < self.remote_port < 65536:
            problems.append(f"remote port {self.remote_port} is not within 1..65535")
        for name in ("remote_host", "remote_username", "remote_password"):
            value = getattr(self, name)
            if value is not None and (not value or any(c.isspace() for c in value)):
                problems.append(f"{name} must be non-empty and without whitespace")
        if not MIN_KEEPALIVE_S <= self.keepalive <= MAX_KEEPALIVE_S:
            problems.append(
                f"keepalive {self.keepalive} s is not within {MIN_KEEPALIVE_S}..{MAX_KEEPALIVE_S}"
            )
        if (self.remote_username is None) != (self.remote_password is None):
            problems.append("remote_username and remote_password go together")
        if problems:
            raise BridgeError("; ".join(problems))

    @property
    def client_id(self) -> str:
        """The bridge's client id on the cloud broker (fixed: its session persists)."""
        return f"edgefl-bridge-{self.region}"

    def render_lines(self) -> list[str]:
        """The ``connection`` block for the regional broker's ``mosquitto.conf``."""
        base = f"{topics.PREFIX}/{self.fleet}"
        lines = [
            f"connection {self.client_id}",
            f"address {self.remote_host}:{self.remote_port}",
            f"remote_clientid {self.client_id}",
            "bridge_protocol_version mqttv311",
            "try_private true",
            "cleansession false",
            "notifications false",
            f"keepalive_interval {self.keepalive}",
            f"restart_timeout {RESTART_TIMEOUT_S[0]} {RESTART_TIMEOUT_S[1]}",
            f"topic {base}/release/# in 1",
            f"topic {base}/device/# out 1",
        ]
        if self.remote_username is not None:
            lines += [
                f"remote_username {self.remote_username}",
                f"remote_password {self.remote_password}",
            ]
        if self.cafile is not None:
            lines.append(f"bridge_cafile {self.cafile}")
        return lines
