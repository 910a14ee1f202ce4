"""Every MQTT topic edgefl uses, built and validated in one place.

Layout (``{fleet}`` and ``{device}`` are validated names)::

    edgefl/{fleet}/release/manifest               retained, QoS 1: the current release
    edgefl/{fleet}/release/candidate              retained, QoS 1: a staged rollout's candidate
    edgefl/{fleet}/release/{version}/chunk/{i}    retained, QoS 1: artifact chunk i
    edgefl/{fleet}/device/{device}/status         retained, QoS 1: DeviceStatus (+ Last Will)
    edgefl/{fleet}/device/{device}/event          QoS 1: DeviceEvent (rejections, installs)

Publishing needs a concrete topic (no wildcards); subscribing may use the filters
built here. Names are restricted to ``[A-Za-z0-9_.-]{1,64}`` so that a device id
can never smuggle a ``/``, ``+`` or ``#`` into a topic or an ACL pattern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from protos.errors import CodecError

PREFIX = "edgefl"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class TopicError(CodecError):
    """A fleet or device name that cannot be used in a topic, or an unknown topic."""


def check_name(value: str, *, what: str = "name") -> str:
    if not _NAME.fullmatch(value) or value in {".", ".."}:
        raise TopicError(
            f"{what} {value!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
        )
    return value


def release_manifest(fleet: str) -> str:
    return f"{PREFIX}/{check_name(fleet, what='fleet')}/release/manifest"


def release_candidate(fleet: str) -> str:
    """A staged rollout's candidate manifest (devices that predate rollouts never read it)."""
    return f"{PREFIX}/{check_name(fleet, what='fleet')}/release/candidate"


def release_chunk(fleet: str, version: int, index: int) -> str:
    if version <= 0 or index < 0:
        raise TopicError(f"bad chunk address version={version} index={index}")
    return f"{PREFIX}/{check_name(fleet, what='fleet')}/release/{version}/chunk/{index}"


def release_chunks_filter(fleet: str, version: int) -> str:
    """Subscription filter for every chunk of one version."""
    if version <= 0:
        raise TopicError(f"bad version {version}")
    return f"{PREFIX}/{check_name(fleet, what='fleet')}/release/{version}/chunk/+"


def device_status(fleet: str, device: str) -> str:
    return f"{PREFIX}/{check_name(fleet, what='fleet')}/device/{check_name(device, what='device id')}/status"


def device_event(fleet: str, device: str) -> str:
    return f"{PREFIX}/{check_name(fleet, what='fleet')}/device/{check_name(device, what='device id')}/event"


def all_device_status_filter(fleet: str) -> str:
    return f"{PREFIX}/{check_name(fleet, what='fleet')}/device/+/status"


def all_device_event_filter(fleet: str) -> str:
    return f"{PREFIX}/{check_name(fleet, what='fleet')}/device/+/event"


def acl_device_pattern_lines(fleet: str) -> list[str]:
    """Mosquitto ACL lines (pattern form, ``%u`` = username = device id) for devices."""
    base = f"{PREFIX}/{check_name(fleet, what='fleet')}"
    return [
        f"pattern write {base}/device/%u/status",
        f"pattern write {base}/device/%u/event",
        f"pattern read {base}/release/#",
    ]


@dataclass(frozen=True)
class ParsedTopic:
    kind: str  # "manifest", "candidate", "chunk", "status", "event"
    fleet: str
    version: int = 0
    index: int = -1
    device: str = ""


def parse(topic: str) -> ParsedTopic:
    """Parse a concrete topic received from the broker; raise TopicError if unknown."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != PREFIX:
        raise TopicError(f"not an edgefl topic: {topic!r}")
    fleet = check_name(parts[1], what="fleet")
    rest = parts[2:]
    if rest == ["release", "manifest"]:
        return ParsedTopic("manifest", fleet)
    if rest == ["release", "candidate"]:
        return ParsedTopic("candidate", fleet)
    if len(rest) == 4 and rest[0] == "release" and rest[2] == "chunk":
        try:
            version, index = int(rest[1]), int(rest[3])
        except ValueError as exc:
            raise TopicError(f"bad chunk topic {topic!r}") from exc
        if version <= 0 or index < 0:
            raise TopicError(f"bad chunk topic {topic!r}")
        return ParsedTopic("chunk", fleet, version=version, index=index)
    if len(rest) == 3 and rest[0] == "device" and rest[2] in ("status", "event"):
        return ParsedTopic(rest[2], fleet, device=check_name(rest[1], what="device id"))
    raise TopicError(f"unknown edgefl topic {topic!r}")
