"""Publish signed model releases to a fleet over MQTT.

A release goes out in two steps so that a device never sees a manifest whose chunks
are missing:

1. every chunk of the artifact (``codec.split_chunks``), retained, QoS 1, on
   ``topics.release_chunk(fleet, version, i)`` — and we wait for every PUBACK;
2. the signed :class:`~protos.codec.Manifest`, retained, QoS 1, on
   ``topics.release_manifest(fleet)``.

Then the retained chunks of the release it replaces are cleared (zero-length retained
publishes), so the broker holds one artifact per fleet. The previous release is read
back from the retained manifest at :meth:`Publisher.connect`, so a restarted cloud
still clears what its predecessor published, and its ``sequence`` keeps increasing.

Chunks default to 256 KiB: well under EMQX's 1 MB default and, with
``chunk_size=96 * 1024``, under AWS IoT Core's 128 KB PUBLISH limit.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.errors import CloudError
from edge.mqtt_util import Endpoint, make_client, reason_failed, unique_client_id, wait_for_mids
from protos import codec, signing, topics
from protos.errors import CodecError

logger = logging.getLogger(__name__)

#: Default bytes per chunk.
DEFAULT_CHUNK_SIZE = 256 * 1024
#: Default seconds to wait for the CONNACK, for SUBACKs and for all PUBACKs of a release.
DEFAULT_TIMEOUT_S = 30.0
#: A retained manifest whose sequence is further ahead of our clock was not issued by us
#: (sequences are the cloud's clock in ms); devices use the same bound by default.
MAX_SEQUENCE_AHEAD_S = 24 * 3600.0


class PublishError(CloudError, RuntimeError):
    """The broker refused, or did not acknowledge in time, part of a release."""


@dataclass(frozen=True)
class PreviousRelease:
    """What the retained manifest says was published last."""

    version: int
    chunk_count: int
    sequence: int


class Publisher:
    """Publishes signed releases for one fleet. Not thread-safe: one caller at a time."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        fleet: str,
        signing_key: Ed25519PrivateKey,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        client_id: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.fleet = topics.check_name(fleet, what="fleet")
        self.chunk_size = chunk_size
        self.timeout_s = timeout_s
        self._key = signing_key
        self._endpoint = Endpoint(
            host=host, port=port, username=username, password=password, ca_file=ca_file
        )
        self._client = make_client(
            self._endpoint, client_id or unique_client_id(f"edgefl-publisher-{fleet}")
        )
        self._client.on_connect = self._on_connect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._lock = threading.Lock()
        self._connack = threading.Event()
        self._connack_code: Any = None
        self._acked_subs: set[int] = set()
        self._sub_event = threading.Condition(self._lock)
        self._failures: dict[int, Any] = {}
        self._retained_manifest: bytes | None = None
        self.previous: PreviousRelease | None = None
        self._last_sequence = 0
        self._connected = False

    # -- paho callbacks (network thread) -------------------------------------------------

    def _on_connect(
        self, _c: mqtt.Client, _u: object, _f: Any, reason_code: Any, _p: object
    ) -> None:
        self._connack_code = reason_code
        self._connack.set()

    def _on_publish(
        self, _c: mqtt.Client, _u: object, mid: int, reason_code: Any, _p: object
    ) -> None:
        if reason_failed(reason_code):
            with self._lock:
                self._failures[mid] = reason_code

    def _on_subscribe(
        self, _c: mqtt.Client, _u: object, mid: int, reason_codes: Any, _p: object
    ) -> None:
        with self._sub_event:
            self._acked_subs.add(mid)
            self._sub_event.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == topics.release_manifest(self.fleet) and msg.payload:
            self._retained_manifest = bytes(msg.payload)

    # -- connection ----------------------------------------------------------------------

    def connect(self) -> Publisher:
        """Connect and read the retained manifest (the release published last)."""
        self._open()
        self._read_previous_release()
        return self

    def _open(self) -> None:
        self._connack.clear()
        try:
            self._client.connect(self._endpoint.host, self._endpoint.port, keepalive=60)
        except OSError as exc:
            raise PublishError(
                f"cannot reach the MQTT broker at {self._endpoint.host}:{self._endpoint.port}: {exc}"
            ) from exc
        self._client.loop_start()
        if not self._connack.wait(self.timeout_s):
            self.close()
            raise PublishError(f"no CONNACK from the broker within {self.timeout_s:.0f} s")
        if reason_failed(self._connack_code):
            self.close()
            raise PublishError(f"the broker refused the connection: {self._connack_code}")
        self._connected = True

    def _ensure_connected(self) -> None:
        """Reconnect once if the broker went away since the last release (e.g. restarted)."""
        if not self._connected:
            raise PublishError("publish_release() before connect()")
        if self._client.is_connected():
            return
        logger.warning("fleet %s: connection to the broker lost; reconnecting", self.fleet)
        self._client.loop_stop()
        self._open()

    def _subscribe_and_wait(self, topic: str) -> None:
        result, mid = self._client.subscribe(topic, qos=1)
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise PublishError(f"cannot subscribe to {topic}: {mqtt.error_string(result)}")
        deadline = time.monotonic() + self.timeout_s
        with self._sub_event:
            while mid not in self._acked_subs:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PublishError(f"no SUBACK for {topic} within {self.timeout_s:.0f} s")
                self._sub_event.wait(remaining)

    def _read_previous_release(self) -> None:
        manifest_topic = topics.release_manifest(self.fleet)
        self._subscribe_and_wait(manifest_topic)
        # Barrier: the broker queues the retained messages of a subscription before it
        # reads our next packet, so once the SUBACK of a second SUBSCRIBE is back the
        # retained manifest (if any) has been delivered.
        self._subscribe_and_wait(manifest_topic)
        self._client.unsubscribe(manifest_topic)
        raw = self._retained_manifest
        if raw is None:
            logger.info("fleet %s: no release published yet", self.fleet)
            return
        try:
            manifest = codec.manifest_from_bytes(raw)
            signing.verify_manifest(manifest, self._key.public_key())
        except CodecError as exc:
            logger.warning(
                "fleet %s: the retained manifest is not ours (%s); ignoring it", self.fleet, exc
            )
            return
        self.previous = PreviousRelease(manifest.version, manifest.chunk_count, manifest.sequence)
        ahead_ms = manifest.sequence - int(time.time() * 1000)
        if ahead_ms > MAX_SEQUENCE_AHEAD_S * 1000:
            # Signed with our key, yet from a clock far ahead of ours: we never issued it
            # (devices refuse it too). Continuing from it would make our own releases look
            # replayed to every device that did accept it, so it only gets its chunks cleared.
            logger.warning(
                "fleet %s: the retained manifest (version %d) carries sequence %d, %.1f h "
                "ahead of this clock: not issued by this cloud; not continuing from it",
                self.fleet,
                manifest.version,
                manifest.sequence,
                ahead_ms / 3_600_000,
            )
            return
        self._last_sequence = manifest.sequence
        logger.info(
            "fleet %s: last published release is version %d (%d chunks, sequence %d)",
            self.fleet,
            manifest.version,
            manifest.chunk_count,
            manifest.sequence,
        )

    def close(self) -> None:
        """Disconnect (after the PUBACKs already awaited) and stop the network thread."""
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self._connected = False

    def __enter__(self) -> Publisher:
        return self.connect()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- publishing ----------------------------------------------------------------------

    def _next_sequence(self) -> int:
        seq = max(self._last_sequence + 1, int(time.time() * 1000))
        self._last_sequence = seq
        return seq

    def _publish_all(self, messages: list[tuple[str, bytes]], what: str) -> None:
        with self._lock:
            self._failures.clear()
        infos = []
        for topic, payload in messages:
            info = self._client.publish(topic, payload, qos=1, retain=True)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise PublishError(
                    f"cannot publish {what} on {topic}: {mqtt.error_string(info.rc)}"
                )
            infos.append(info)
        problems = wait_for_mids(infos, self._failures, time.monotonic() + self.timeout_s)
        if problems:
            shown = "; ".join(problems[:5])
            raise PublishError(
                f"{what}: {len(problems)} of {len(messages)} messages failed: {shown}"
            )

    def _publish_chunks(self, version: int, chunks: list[bytes], what: str) -> None:
        self._publish_all(
            [(topics.release_chunk(self.fleet, version, i), c) for i, c in enumerate(chunks)],
            what,
        )

    def _manifest(
        self,
        package: bytes,
        chunks: list[bytes],
        version: int,
        parent_version: int,
        round: int,
        architecture_id: str,
        metrics: dict[str, float] | None,
        **fields: Any,
    ) -> codec.Manifest:
        """The manifest of ``package`` split into ``chunks``; ``fields`` are its role's own
        (``pinned`` for a release; phase, cohort, action and served version for a candidate)."""
        return codec.Manifest(
            fleet=self.fleet,
            version=version,
            parent_version=parent_version,
            round=round,
            created_at_ms=0,
            architecture_id=architecture_id,
            artifact_sha256=codec.sha256_hex(package),
            artifact_size=len(package),
            chunk_size=self.chunk_size,
            chunk_sha256=tuple(codec.sha256_hex(c) for c in chunks),
            metrics=dict(metrics or {}),
            **fields,
        )

    def _signed(self, unsigned: codec.Manifest) -> codec.Manifest:
        """``unsigned`` stamped (time, next sequence), signed, and checked as a device would."""
        manifest = signing.sign_manifest(
            dataclasses.replace(
                unsigned, created_at_ms=int(time.time() * 1000), sequence=self._next_sequence()
            ),
            self._key,
        )
        codec.manifest_from_bytes(codec.manifest_to_bytes(manifest))
        return manifest

    def publish_release(
        self,
        *,
        version: int,
        parent_version: int,
        round: int,
        package: bytes,
        architecture_id: str,
        metrics: dict[str, float] | None = None,
        pinned: bool = False,
    ) -> codec.Manifest:
        """Publish ``package`` as ``version``: chunks, then the signed manifest, then cleanup.

        Raises :class:`PublishError` if any message is refused or not acknowledged
        within ``timeout_s``; in that case the manifest is not published (when a chunk
        failed) and the previous release stays the current one.
        """
        if not package:
            raise ValueError("package is empty")
        self._ensure_connected()
        chunks = codec.split_chunks(package, self.chunk_size)
        self._publish_chunks(version, chunks, f"release {version} chunks")
        manifest = self._signed(
            self._manifest(
                package, chunks, version, parent_version, round, architecture_id, metrics,
                pinned=pinned,
            )
        )  # fmt: skip
        self._publish_all(
            [(topics.release_manifest(self.fleet), codec.manifest_to_bytes(manifest))],
            f"release {version} manifest",
        )
        logger.info(
            "fleet %s: published release %d (%d bytes in %d chunks, sequence %d%s)",
            self.fleet,
            version,
            len(package),
            len(chunks),
            manifest.sequence,
            ", pinned" if pinned else "",
        )
        previous = self.previous
        self.previous = PreviousRelease(version, len(chunks), manifest.sequence)
        if previous is not None and previous.version != version:
            self._clear_chunks(previous.version, previous.chunk_count, keep_from=None)
        elif previous is not None and previous.chunk_count > len(chunks):
            # Same version republished with fewer chunks: drop only the surplus.
            self._clear_chunks(version, previous.chunk_count, keep_from=len(chunks))
        return manifest

    def publish_candidate(
        self,
        *,
        version: int,
        parent_version: int,
        round: int,
        package: bytes,
        architecture_id: str,
        metrics: dict[str, float] | None,
        phase: int,
        cohort_ppm: int,
        action: str,
        served_version: int,
        with_chunks: bool,
    ) -> codec.Manifest:
        """Publish a staged rollout's candidate on ``topics.release_candidate`` (retained).

        With ``with_chunks`` the artifact's chunks go out first (retained, on the same
        chunk topics a release uses); later actions of the same candidate only re-sign
        and republish the manifest. The retained release and its chunks are untouched.
        """
        if not package:
            raise ValueError("package is empty")
        if phase < 1:
            raise ValueError(f"a candidate's phase is >= 1, got {phase}")
        self._ensure_connected()
        chunks = codec.split_chunks(package, self.chunk_size)
        if with_chunks:
            self._publish_chunks(version, chunks, f"candidate {version} chunks")
        manifest = self._signed(
            self._manifest(
                package, chunks, version, parent_version, round, architecture_id, metrics,
                phase=phase, cohort_ppm=cohort_ppm, action=action,
                served_version=served_version,
            )
        )  # fmt: skip
        self._publish_all(
            [(topics.release_candidate(self.fleet), codec.manifest_to_bytes(manifest))],
            f"candidate {version} manifest",
        )
        logger.info(
            "fleet %s: candidate %d phase %d %s (cohort < %d ppm, sequence %d)",
            self.fleet,
            version,
            phase,
            action,
            cohort_ppm,
            manifest.sequence,
        )
        return manifest

    def republish_candidate(self, manifest: codec.Manifest) -> None:
        """Publish a candidate manifest signed earlier again, unchanged (same sequence).

        Puts a broker that lost it (restarted from an older autosave) back in the state
        it had; a device that already handled that sequence ignores it.
        """
        if not manifest.candidate:
            raise ValueError(f"version {manifest.version}: not a candidate manifest")
        self._ensure_connected()
        self._publish_all(
            [(topics.release_candidate(self.fleet), codec.manifest_to_bytes(manifest))],
            f"candidate {manifest.version} manifest",
        )

    def clear_candidate(self, version: int, chunk_count: int, *, keep_chunks: bool) -> None:
        """Clear the retained candidate manifest and, unless kept, its chunks."""
        self._ensure_connected()
        self._publish_all([(topics.release_candidate(self.fleet), b"")], "clearing the candidate")
        if not keep_chunks and chunk_count > 0:
            self._clear_chunks(version, chunk_count, keep_from=None)

    def _clear_chunks(self, version: int, count: int, *, keep_from: int | None) -> None:
        start = keep_from or 0
        try:
            self._publish_all(
                [(topics.release_chunk(self.fleet, version, i), b"") for i in range(start, count)],
                f"clearing release {version} chunks",
            )
        except PublishError as exc:
            # The new release is out; stale retained chunks only cost broker memory.
            logger.warning("fleet %s: %s", self.fleet, exc)
        else:
            logger.info(
                "fleet %s: cleared %d retained chunks of release %d",
                self.fleet,
                count - start,
                version,
            )
