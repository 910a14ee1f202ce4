"""The device agent: receives signed releases over MQTT, installs them, reports telemetry.

Threads:

* paho's network thread does no work of ours: ``on_message`` only puts
  ``(topic, payload)`` on a queue;
* the **worker** thread takes everything off that queue (manifests, chunks,
  "connected" notices) and runs the state machine below, including the install and
  the periodic status report. A slow install therefore never stalls keepalives;
* :class:`~edge.mqtt_util.MqttConnection`'s supervisor reconnects with exponential
  backoff and jitter.

For every manifest: parse → same fleet → signature by the fleet key → ``sequence`` not
below the device's floor (``min_sequence``, from its bundle) and not ahead of its clock
by more than ``max_sequence_ahead_s`` → ``sequence`` newer than the last accepted one →
``version`` newer than the serving one, or a pin →
subscribe to that version's chunks, check each against its digest (garbage and empty
payloads are ignored, bad ones reported), reassemble, check size and SHA-256,
``node.install_release``, persist the sequence, report. A newer manifest arriving
mid-download supersedes the download. Every failure becomes a ``DeviceEvent`` on the
device's event topic; nothing received from the network can stop the agent.

The MQTT session is persistent (MQTT 5 session expiry, client id = device id), and the
Last Will is a retained OFFLINE status on the device's status topic. It is composed
before each connection, so it carries that moment's timestamp and serving version; the
cloud registry accepts it even though it is older than the statuses sent since. The last accepted
``sequence`` is persisted through ``node.write_state`` under ``"sequence"``; a manifest
whose install failed is not retried by the same process (a restart retries it).

Why the floor and the clock bound: the persisted sequence is lost with the state
directory, but the bundle's ``[trust] min_sequence`` (the fleet's sequence when the device
was flashed) is not, so a replayed release older than the bundle is refused even then.
The cloud issues sequences from its clock (milliseconds, made strictly increasing), so a
sequence far ahead of the device's clock was never issued: accepting it would make every
later real release look replayed. Such a manifest is refused, kept, and looked at again
as the device's clock advances (a device that booted with a stale clock catches up).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.errors import ConfigError
from edge.mqtt_util import (
    DEFAULT_KEEPALIVE,
    DEFAULT_RECONNECT_MAX_S,
    DEFAULT_RECONNECT_MIN_S,
    Endpoint,
    MqttConnection,
    make_client,
)
from protos import codec, signing, topics
from protos.errors import CodecError

logger = logging.getLogger(__name__)

#: Default seconds between two status reports.
DEFAULT_STATUS_INTERVAL_S = 5.0
#: Default seconds the broker keeps our session (and queues QoS 1 messages) while we are away.
DEFAULT_SESSION_EXPIRY_S = 7 * 24 * 3600
#: Default seconds without a new valid chunk after which the chunk subscription is renewed.
DEFAULT_DOWNLOAD_RETRY_S = 30.0
#: Bad chunks reported as events per download (more are only logged: no event floods).
MAX_CHUNK_EVENTS = 5
#: Default seconds a manifest's sequence may lie ahead of the device's clock.
DEFAULT_MAX_SEQUENCE_AHEAD_S = 24 * 3600.0
#: Key under which the last accepted manifest sequence is persisted in the node's state.
STATE_SEQUENCE_KEY = "sequence"
#: Key under which the last handled candidate sequence is persisted (staged rollouts).
STATE_CANDIDATE_SEQUENCE_KEY = "candidate_sequence"

# Event kinds (DeviceEvent.kind).
EVENT_INSTALLED = "release_installed"
EVENT_REJECTED = "release_rejected"
EVENT_INSTALL_FAILED = "install_failed"
EVENT_CHUNK_REJECTED = "chunk_rejected"
EVENT_CANDIDATE_CHECKED = "candidate_checked"
EVENT_CANDIDATE_FAILED = "candidate_failed"
EVENT_CANDIDATE_SERVED = "candidate_served"
EVENT_CANDIDATE_REVERTED = "candidate_reverted"


class ReleaseInstaller(Protocol):
    """What the agent needs from the device (``edge.node.EdgeNode`` implements it)."""

    def serving_version(self) -> int:
        """The version being served now (0 = none)."""
        ...

    def install_release(self, version: int, data: bytes, sha256: str) -> None:
        """Install a verified artifact atomically; raise on failure (old version stays)."""
        ...

    def status(self) -> codec.DeviceStatus:
        """The device's current status report."""
        ...

    def read_state(self) -> dict[str, Any]:
        """The agent's persisted state (``{}`` on first start)."""
        ...

    def write_state(self, state: dict[str, Any]) -> None:
        """Persist the agent's state durably."""
        ...


#: First and largest delay before a failed install is tried again (seconds).
INSTALL_RETRY_MIN_S = 5.0
INSTALL_RETRY_MAX_S = 120.0


@dataclass(frozen=True)
class AgentSettings:
    """How one device's agent reaches the broker and whom it trusts."""

    #: This device's id; also its MQTT client id and (with ACLs) its broker username.
    device_id: str
    #: The fleet whose releases this device installs.
    fleet: str
    #: Broker host.
    host: str
    #: Broker port.
    port: int
    #: PEM file holding the fleet's Ed25519 release-signing public key.
    signing_public_key: Path
    #: Broker username (None = anonymous).
    username: str | None = None
    #: Broker password.
    password: str | None = None
    #: PEM CA bundle for the broker's TLS certificate (None = plain TCP).
    ca_file: Path | None = None
    #: MQTT keepalive in seconds.
    keepalive: int = DEFAULT_KEEPALIVE
    #: Seconds between status reports.
    status_interval_s: float = DEFAULT_STATUS_INTERVAL_S
    #: First reconnect delay in seconds (doubles per failed attempt, with jitter).
    reconnect_min_s: float = DEFAULT_RECONNECT_MIN_S
    #: Largest reconnect delay in seconds.
    reconnect_max_s: float = DEFAULT_RECONNECT_MAX_S
    #: Seconds the broker keeps the session while the device is offline.
    session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S
    #: Seconds without chunk progress before re-subscribing to the chunks.
    download_retry_s: float = DEFAULT_DOWNLOAD_RETRY_S
    #: Lowest release sequence ever accepted, whatever the persisted state says (the
    #: bundle's ``[trust] min_sequence``); 0 = no floor beyond the persisted state.
    min_sequence: int = 0
    #: Seconds a manifest's sequence (the cloud's clock in ms) may lie ahead of ours.
    max_sequence_ahead_s: float = DEFAULT_MAX_SEQUENCE_AHEAD_S

    def __post_init__(self) -> None:
        problems = []
        for name, what in (("device_id", "device id"), ("fleet", "fleet")):
            try:
                topics.check_name(getattr(self, name), what=what)
            except topics.TopicError as exc:
                problems.append(str(exc))
        if not 0 < self.port < 65536:
            problems.append(f"port {self.port} is not within 1..65535")
        if self.status_interval_s <= 0:
            problems.append("status_interval_s must be positive")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            problems.append("need 0 < reconnect_min_s <= reconnect_max_s")
        if self.min_sequence < 0:
            problems.append(f"min_sequence must be ≥ 0, got {self.min_sequence}")
        if self.max_sequence_ahead_s <= 0:
            problems.append("max_sequence_ahead_s must be positive")
        if problems:
            raise ConfigError(problems)


@dataclass
class _Download:
    manifest: codec.Manifest
    chunks: dict[int, bytes] = dataclasses.field(default_factory=dict)
    last_progress: float = dataclasses.field(default_factory=time.monotonic)
    bad_chunks: int = 0

    @property
    def chunk_filter(self) -> str:
        return topics.release_chunks_filter(self.manifest.fleet, self.manifest.version)


_CONNECTED = "connected"
_STOP = "stop"


def _now_ms() -> int:
    return int(time.time() * 1000)


class Agent:
    """One device's MQTT agent. ``start()`` returns at once; ``stop()`` goes OFFLINE."""

    def __init__(self, settings: AgentSettings, node: ReleaseInstaller) -> None:
        self.settings = settings
        self.node = node
        self._public_key: Ed25519PublicKey = signing.load_public_key(settings.signing_public_key)
        self._manifest_topic = topics.release_manifest(settings.fleet)
        self._status_topic = topics.device_status(settings.fleet, settings.device_id)
        self._event_topic = topics.device_event(settings.fleet, settings.device_id)
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._download: _Download | None = None
        #: The candidate being downloaded (staged rollouts), separate from releases.
        self._cand_download: _Download | None = None
        self._candidate_topic = topics.release_candidate(settings.fleet)
        self._handled_candidate = 0  # highest candidate sequence handled in this process
        #: A verified release whose install failed: (manifest, artifact, retry at, delay).
        self._retry: tuple[codec.Manifest, bytes, float, float] | None = None
        self._installing = False
        self._handled_sequence = 0  # highest sequence handled in this process (incl. failures)
        #: A signed manifest whose sequence was ahead of our clock: looked at again later.
        self._ahead: bytes | None = None
        self._last_error = ""
        endpoint = Endpoint(
            host=settings.host,
            port=settings.port,
            username=settings.username,
            password=settings.password,
            ca_file=settings.ca_file,
            keepalive=settings.keepalive,
        )
        self._client = make_client(endpoint, settings.device_id)
        self._client.on_message = self._on_message
        self._conn = MqttConnection(
            self._client,
            endpoint,
            on_connected=self._on_connected,
            before_connect=self._set_will,
            clean_start=False,
            session_expiry_s=settings.session_expiry_s,
            reconnect_min_s=settings.reconnect_min_s,
            reconnect_max_s=settings.reconnect_max_s,
            name=f"agent[{settings.device_id}]",
        )
        self._worker: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Agent:
        self._worker = threading.Thread(
            target=self._run, name=f"agent-{self.settings.device_id}", daemon=True
        )
        self._worker.start()
        self._conn.start()
        return self

    def stop(self, *, timeout: float = 5.0) -> None:
        """Publish OFFLINE (retained), disconnect cleanly and stop the threads."""
        self._queue.put((_STOP, b""))
        if self._worker is not None:
            self._worker.join(timeout)
            self._worker = None
        if self._conn.connected:
            info = self._client.publish(
                self._status_topic, self._offline_payload(), qos=1, retain=True
            )
            try:
                info.wait_for_publish(timeout=timeout)
            except (ValueError, RuntimeError) as exc:
                logger.warning("could not publish the OFFLINE status: %s", exc)
        self._conn.stop(timeout=timeout)

    def wait_connected(self, timeout: float) -> bool:
        return self._conn.wait_connected(timeout)

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- paho callbacks (network / supervisor threads): no work here -------------------

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        self._queue.put((msg.topic, bytes(msg.payload)))

    def _on_connected(self, session_present: bool) -> None:
        self._queue.put((_CONNECTED, b""))

    def _set_will(self) -> None:
        self._client.will_set(self._status_topic, self._offline_payload(), qos=1, retain=True)

    # -- worker --------------------------------------------------------------------------

    def _run(self) -> None:
        next_status = time.monotonic()
        while True:
            timeout = max(0.0, next_status - time.monotonic())
            if self._download is not None or self._cand_download is not None:
                timeout = min(timeout, self.settings.download_retry_s)
            if self._retry is not None:
                timeout = min(timeout, max(0.0, self._retry[2] - time.monotonic()))
            try:
                topic, payload = self._queue.get(timeout=timeout)
            except queue.Empty:
                topic, payload = "", b""
            try:
                if topic == _STOP:
                    return
                if topic == _CONNECTED:
                    self._after_connect()
                    next_status = time.monotonic()
                elif topic:
                    self._handle_message(topic, payload)
                self._check_stalled_download()
                self._retry_failed_install()
                self._recheck_ahead()
                if time.monotonic() >= next_status:
                    self._publish_status()
                    next_status = time.monotonic() + self.settings.status_interval_s
            except Exception:
                # A bug must not kill the agent; the next message gets a fresh chance.
                logger.exception("agent worker: unexpected error")

    def _after_connect(self) -> None:
        self._client.subscribe(self._manifest_topic, qos=1)
        if self._supports_candidates():
            self._client.subscribe(self._candidate_topic, qos=1)
        for dl in (self._download, self._cand_download):
            if dl is not None:
                self._client.subscribe(dl.chunk_filter, qos=1)

    def _handle_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = topics.parse(topic)
        except topics.TopicError:
            logger.warning("ignoring a message on an unexpected topic %r", topic)
            return
        if parsed.fleet != self.settings.fleet:
            logger.warning("ignoring a message for fleet %s on %r", parsed.fleet, topic)
        elif parsed.kind == "manifest":
            self._handle_manifest(payload)
        elif parsed.kind == "candidate":
            self._handle_candidate(payload)
        elif parsed.kind == "chunk":
            self._handle_chunk(parsed.version, parsed.index, payload)
            self._handle_candidate_chunk(parsed.version, parsed.index, payload)
        else:
            logger.debug("ignoring %s message on %r", parsed.kind, topic)

    # -- manifests -----------------------------------------------------------------------

    def _last_accepted_sequence(self) -> int:
        try:
            value = self.node.read_state().get(STATE_SEQUENCE_KEY, 0)
            return int(value)
        except Exception:
            logger.exception("cannot read the agent state; assuming no release accepted")
            return 0

    def _accept_sequence(self, sequence: int) -> None:
        state = dict(self.node.read_state())
        state[STATE_SEQUENCE_KEY] = sequence
        self.node.write_state(state)

    def _handle_manifest(self, payload: bytes) -> None:
        if not payload:
            logger.info("the retained release manifest was cleared")
            return
        logger.debug("manifest payload: %r", payload)
        try:
            manifest = codec.manifest_from_bytes(payload)
        except CodecError as exc:
            self._reject(0, f"malformed manifest: {exc}")
            return
        if manifest.fleet != self.settings.fleet:
            self._reject(
                manifest.version,
                f"manifest is for fleet {manifest.fleet!r}, this device is in {self.settings.fleet!r}",
            )
            return
        try:
            signing.verify_manifest(manifest, self._public_key)
        except signing.SignatureError as exc:
            self._reject(manifest.version, f"bad signature: {exc}")
            return
        if manifest.sequence < self.settings.min_sequence:
            self._reject(
                manifest.version,
                f"replayed manifest: sequence {manifest.sequence} is below this device's "
                f"floor {self.settings.min_sequence} ([trust] min_sequence)",
            )
            return
        ahead_ms = manifest.sequence - _now_ms()
        if ahead_ms > self.settings.max_sequence_ahead_s * 1000:
            if self._ahead != payload:
                self._reject(
                    manifest.version,
                    f"sequence {manifest.sequence} is {ahead_ms / 3_600_000:.1f} h ahead of "
                    "this device's clock: never issued by the cloud (or this clock is wrong; "
                    "looked at again as it advances)",
                )
            self._ahead = payload
            return
        accepted = max(self._last_accepted_sequence(), self._handled_sequence)
        current = self._download.manifest if self._download is not None else None
        if manifest.sequence == accepted or (
            current is not None and manifest.sequence == current.sequence
        ):
            logger.debug(
                "release %d (sequence %d) already handled", manifest.version, manifest.sequence
            )
            return
        if manifest.sequence < accepted or (
            current is not None and manifest.sequence < current.sequence
        ):
            newest = max(accepted, current.sequence if current is not None else 0)
            self._reject(
                manifest.version,
                f"replayed manifest: sequence {manifest.sequence} is not newer than {newest}",
            )
            return
        serving = self.node.serving_version()
        if not manifest.pinned and manifest.version <= serving:
            if manifest.version == serving:
                # The same release republished (e.g. after a cloud restart): nothing to do.
                self._handled_sequence = manifest.sequence
                self._accept_sequence(manifest.sequence)
                self._abandon_download("release %d is already served")
                return
            self._reject(
                manifest.version,
                f"version {manifest.version} is older than the served version {serving} "
                "and not pinned",
            )
            return
        if manifest.pinned and manifest.version == serving:
            self._handled_sequence = manifest.sequence
            self._accept_sequence(manifest.sequence)
            self._abandon_download("pinned release %d is already served")
            return
        self._start_download(manifest)

    def _recheck_ahead(self) -> None:
        """Look again at a manifest that was ahead of our clock, once the clock caught up."""
        if self._ahead is None:
            return
        payload = self._ahead
        try:
            sequence = codec.manifest_from_bytes(payload).sequence
        except CodecError:
            self._ahead = None
            return
        if sequence - _now_ms() <= self.settings.max_sequence_ahead_s * 1000:
            self._ahead = None
            self._handle_manifest(payload)

    def _abandon_download(self, why: str) -> None:
        if self._download is not None:
            logger.info(why, self._download.manifest.version)
            self._client.unsubscribe(self._download.chunk_filter)
            self._download = None

    def _start_download(self, manifest: codec.Manifest) -> None:
        if self._retry is not None and self._retry[0].sequence < manifest.sequence:
            self._retry = None
        old = self._download
        if old is not None:
            logger.info(
                "release %d supersedes release %d mid-download",
                manifest.version,
                old.manifest.version,
            )
            if old.manifest.version != manifest.version:
                self._client.unsubscribe(old.chunk_filter)
        self._download = _Download(manifest)
        logger.info(
            "downloading release %d (%d bytes, %d chunks%s)",
            manifest.version,
            manifest.artifact_size,
            manifest.chunk_count,
            ", pinned" if manifest.pinned else "",
        )
        # (Re)subscribing makes the broker send the retained chunks, even for a version
        # we were already subscribed to.
        self._client.subscribe(self._download.chunk_filter, qos=1)
        self._publish_status()

    # -- chunks --------------------------------------------------------------------------

    def _handle_chunk(self, version: int, index: int, payload: bytes) -> None:
        dl = self._download
        if dl is None or version != dl.manifest.version:
            logger.debug("ignoring chunk %d of release %d (not downloading it)", index, version)
            return
        if not payload:
            logger.debug("ignoring an empty chunk %d of release %d", index, version)
            return
        if index >= dl.manifest.chunk_count:
            self._report_bad_chunk(dl, index, f"index beyond the {dl.manifest.chunk_count} chunks")
            return
        if index in dl.chunks:
            return
        digest = codec.sha256_hex(payload)
        if digest != dl.manifest.chunk_sha256[index]:
            self._report_bad_chunk(dl, index, f"digest {digest[:16]}… does not match the manifest")
            return
        dl.chunks[index] = payload
        dl.last_progress = time.monotonic()
        if len(dl.chunks) == dl.manifest.chunk_count:
            self._unsubscribe_chunks(dl, other=self._cand_download)
            self._download = None
            self._install(dl)

    def _unsubscribe_chunks(self, dl: _Download, *, other: _Download | None) -> None:
        """Drop ``dl``'s chunk subscription unless ``other`` still downloads that version."""
        if other is None or other.manifest.version != dl.manifest.version:
            self._client.unsubscribe(dl.chunk_filter)

    def _report_bad_chunk(self, dl: _Download, index: int, why: str) -> None:
        dl.bad_chunks += 1
        detail = f"chunk {index} of release {dl.manifest.version} ignored: {why}"
        logger.warning("%s", detail)
        if dl.bad_chunks <= MAX_CHUNK_EVENTS:
            self._emit_event(EVENT_CHUNK_REJECTED, detail, dl.manifest.version)

    def _check_stalled_download(self) -> None:
        for dl in (self._download, self._cand_download):
            self._check_stalled(dl)

    def _check_stalled(self, dl: _Download | None) -> None:
        if dl is None or time.monotonic() - dl.last_progress < self.settings.download_retry_s:
            return
        logger.warning(
            "release %d: %d of %d chunks after %.0f s; asking the broker again",
            dl.manifest.version,
            len(dl.chunks),
            dl.manifest.chunk_count,
            self.settings.download_retry_s,
        )
        dl.last_progress = time.monotonic()
        if self._conn.connected:
            self._client.subscribe(dl.chunk_filter, qos=1)

    # -- candidates (staged rollouts) ------------------------------------------------------

    def _supports_candidates(self) -> bool:
        return all(
            callable(getattr(self.node, name, None))
            for name in ("stage_release", "check_candidate", "activate", "has_version")
        )

    def _verified(self, payload: bytes, what: str) -> codec.Manifest | None:
        """Parse and verify a signed manifest; report and return None when it is not good."""
        try:
            manifest = codec.manifest_from_bytes(payload)
        except CodecError as exc:
            self._reject(0, f"malformed {what}: {exc}")
            return None
        if manifest.fleet != self.settings.fleet:
            self._reject(manifest.version, f"{what} is for fleet {manifest.fleet!r}")
            return None
        try:
            signing.verify_manifest(manifest, self._public_key)
        except signing.SignatureError as exc:
            self._reject(manifest.version, f"{what}: bad signature: {exc}")
            return None
        return manifest

    def _handle_candidate(self, payload: bytes) -> None:
        """A staged rollout's candidate: check, serve or revert it if our cohort is addressed.

        Same signature, floor and clock checks as a release; candidates have their own
        sequence (persisted under ``candidate_sequence``; the persisted one is taken again
        after a restart, since its download may not have finished). A device serving an older
        candidate that never got promoted returns to the fleet's served version when a
        newer candidate arrives (the newer one supersedes it).
        """
        if not payload or not self._supports_candidates():
            return
        m = self._verified(payload, "candidate")
        if m is None:
            return
        if not m.candidate:
            self._reject(m.version, "a promoted release on the candidate topic")
            return
        if m.sequence < self.settings.min_sequence or (
            m.sequence - _now_ms() > self.settings.max_sequence_ahead_s * 1000
        ):
            self._reject(m.version, f"candidate sequence {m.sequence} is out of bounds")
            return
        try:
            persisted = int(self.node.read_state().get(STATE_CANDIDATE_SEQUENCE_KEY, 0))
        except Exception:
            persisted = 0
        handled = max(persisted, self._handled_candidate)
        if m.sequence < handled:
            self._reject(m.version, f"replayed candidate: sequence {m.sequence} ≤ {handled}")
            return
        if m.sequence == self._handled_candidate:
            return  # this process has handled it already
        # ``m.sequence == persisted`` (not yet this process): taken before a restart that may
        # have cut its download or check short. Handle it again: every action is idempotent
        # (a second check only refreshes the report).
        self._handled_candidate = m.sequence
        try:
            state = dict(self.node.read_state())
            state[STATE_CANDIDATE_SEQUENCE_KEY] = m.sequence
            self.node.write_state(state)
        except Exception:
            logger.exception("candidate sequence %d not persisted", m.sequence)
        node: Any = self.node
        serving = node.serving_version()
        if serving != m.version and serving > m.served_version and m.served_version > 0:
            # We serve an older candidate that was never promoted: the newer one supersedes it.
            self._activate(m, m.served_version, EVENT_CANDIDATE_REVERTED, "superseded candidate")
            serving = node.serving_version()
        from protos import cohort

        if not cohort.in_cohort(m.fleet, self.settings.device_id, m.cohort_ppm):
            logger.debug("candidate %d phase %d: not in this cohort", m.version, m.phase)
            return
        if m.action == "revert":
            if serving == m.version:
                self._activate(m, m.served_version, EVENT_CANDIDATE_REVERTED, "rollback")
            return
        if m.action == "halt":
            return
        if node.has_version(m.version, m.artifact_sha256):
            self._candidate_ready(m)
            return
        old = self._cand_download
        if old is not None and old.manifest.version != m.version:
            self._unsubscribe_chunks(old, other=self._download)
        self._cand_download = _Download(m)
        logger.info("downloading candidate %d for phase %d (%s)", m.version, m.phase, m.action)
        self._client.subscribe(self._cand_download.chunk_filter, qos=1)

    def _handle_candidate_chunk(self, version: int, index: int, payload: bytes) -> None:
        dl = self._cand_download
        if dl is None or version != dl.manifest.version or not payload:
            return
        if index >= dl.manifest.chunk_count or index in dl.chunks:
            return
        if codec.sha256_hex(payload) != dl.manifest.chunk_sha256[index]:
            self._report_bad_chunk(dl, index, "digest does not match the candidate")
            return
        dl.chunks[index] = payload
        dl.last_progress = time.monotonic()
        if len(dl.chunks) < dl.manifest.chunk_count:
            return
        self._unsubscribe_chunks(dl, other=self._download)
        self._cand_download = None
        m = dl.manifest
        data = b"".join(dl.chunks[i] for i in range(m.chunk_count))
        node: Any = self.node
        try:
            if len(data) != m.artifact_size or codec.sha256_hex(data) != m.artifact_sha256:
                raise ValueError("reassembled candidate does not match its size and SHA-256")
            node.stage_release(m.version, data, m.artifact_sha256)
        except Exception as exc:
            logger.error("candidate %d not installed: %s", m.version, exc)
            self._emit_event(
                EVENT_CANDIDATE_FAILED, f"install: {exc}", m.version, {"phase": float(m.phase)}
            )
            return
        self._candidate_ready(m)

    def _candidate_ready(self, m: codec.Manifest) -> None:
        """The candidate is stored: check it (``check``) or serve it (``serve``)."""
        node: Any = self.node
        if m.action == "serve":
            if node.serving_version() != m.version:
                self._activate(m, m.version, EVENT_CANDIDATE_SERVED, f"phase {m.phase}")
            return
        try:
            figures = node.check_candidate(m.version, m.served_version)
        except Exception as exc:
            logger.error("candidate %d not checked: %s", m.version, exc)
            self._emit_event(
                EVENT_CANDIDATE_FAILED, f"check: {exc}", m.version, {"phase": float(m.phase)}
            )
            return
        figures["phase"] = float(m.phase)
        logger.info(
            "candidate %d phase %d: accuracy %.4f vs served %.4f on %d held-out samples",
            m.version,
            m.phase,
            figures["candidate_accuracy"],
            figures["served_accuracy"],
            int(figures["examples"]),
        )
        detail = (
            f"phase {m.phase}: candidate accuracy {figures['candidate_accuracy']:.4f}, "
            f"served version {m.served_version} {figures['served_accuracy']:.4f}"
        )
        if "candidate_error_rate" in figures:
            detail += (
                f"; inference error rate {figures['candidate_error_rate']:.4f} vs "
                f"{figures.get('served_error_rate', float('nan')):.4f} "
                f"({int(figures.get('inference_calls', 0))} calls each)"
            )
        self._emit_event(EVENT_CANDIDATE_CHECKED, detail, m.version, figures)

    def _activate(self, m: codec.Manifest, version: int, kind: str, why: str) -> None:
        node: Any = self.node
        try:
            node.activate(version)
        except Exception as exc:
            logger.error("cannot serve version %d (%s): %s", version, why, exc)
            self._emit_event(
                EVENT_CANDIDATE_FAILED,
                f"activate {version}: {exc}",
                m.version,
                {"phase": float(m.phase)},
            )
            return
        logger.info("now serving version %d (%s, candidate %d)", version, why, m.version)
        self._emit_event(
            kind, f"{why}: serving version {version}", m.version, {"phase": float(m.phase)}
        )
        self._publish_status()

    # -- install -------------------------------------------------------------------------

    def _install(self, dl: _Download) -> None:
        m = dl.manifest
        data = b"".join(dl.chunks[i] for i in range(m.chunk_count))
        self._handled_sequence = max(self._handled_sequence, m.sequence)
        if len(data) != m.artifact_size or codec.sha256_hex(data) != m.artifact_sha256:
            self._reject(
                m.version,
                f"reassembled artifact ({len(data)} bytes) does not match the manifest's "
                f"size {m.artifact_size} and SHA-256",
            )
            return
        self._try_install(m, data)

    def _try_install(self, m: codec.Manifest, data: bytes) -> bool:
        """Install a verified artifact; on failure schedule a retry (disk full, ...)."""
        self._installing = True
        self._publish_status()
        try:
            self.node.install_release(m.version, data, m.artifact_sha256)
        except Exception as exc:
            self._last_error = f"install of release {m.version} failed: {exc}"
            logger.error("%s", self._last_error, exc_info=True)
            self._emit_event(EVENT_INSTALL_FAILED, str(exc), m.version)
            delay = (
                INSTALL_RETRY_MIN_S
                if self._retry is None
                else min(self._retry[3] * 2, INSTALL_RETRY_MAX_S)
            )
            self._retry = (m, data, time.monotonic() + delay, delay)
            self._publish_status()
            return False
        finally:
            self._installing = False
        self._retry = None
        self._last_error = ""
        try:
            self._accept_sequence(m.sequence)
        except Exception:
            logger.exception("release %d installed but its sequence was not persisted", m.version)
        logger.info("installed release %d (sequence %d)", m.version, m.sequence)
        self._emit_event(
            EVENT_INSTALLED,
            f"round {m.round}{' (pinned)' if m.pinned else ''}",
            m.version,
        )
        self._publish_status()
        return True

    def _retry_failed_install(self) -> None:
        """Try a failed install again once its delay has passed (space may be back)."""
        if self._retry is None or time.monotonic() < self._retry[2]:
            return
        manifest, data, _, _ = self._retry
        if self._download is not None and self._download.manifest.sequence > manifest.sequence:
            self._retry = None  # a newer release supersedes it
            return
        logger.info("retrying the install of release %d", manifest.version)
        self._try_install(manifest, data)

    # -- reporting -----------------------------------------------------------------------

    def _reject(self, version: int, reason: str) -> None:
        logger.warning("release %d rejected: %s", version, reason)
        self._emit_event(EVENT_REJECTED, reason, version)

    def _emit_event(
        self, kind: str, detail: str, version: int, figures: dict[str, float] | None = None
    ) -> None:
        metrics = getattr(self.node, "metrics", None)  # edge.metrics.DeviceMetrics, if any
        if metrics is not None:
            metrics.release_event(kind)
        event = codec.DeviceEvent(
            device_id=self.settings.device_id,
            timestamp_ms=_now_ms(),
            kind=kind,
            detail=detail[:1000],
            version=version,
            metrics=dict(figures or {}),
        )
        self._client.publish(self._event_topic, codec.event_to_bytes(event), qos=1)

    def _current_status(self) -> codec.DeviceStatus:
        try:
            status = self.node.status()
        except Exception as exc:
            logger.exception("node.status() failed")
            return codec.DeviceStatus(
                device_id=self.settings.device_id,
                fleet=self.settings.fleet,
                serving_version=0,
                state="DEGRADED",
                timestamp_ms=_now_ms(),
                last_error=f"status unavailable: {exc}",
            )
        changes: dict[str, Any] = {
            "device_id": self.settings.device_id,
            "fleet": self.settings.fleet,
            "timestamp_ms": status.timestamp_ms or _now_ms(),
        }
        if self._installing or self._download is not None:
            changes["state"] = "UPDATING"
        if self._last_error and not status.last_error:
            changes["last_error"] = self._last_error
        return dataclasses.replace(status, **changes)

    def _publish_status(self) -> None:
        if not self._conn.connected:
            return  # a stale status queued for later is worse than none
        payload = codec.status_to_bytes(self._current_status())
        self._client.publish(self._status_topic, payload, qos=1, retain=True)

    def _offline_payload(self) -> bytes:
        try:
            serving = self.node.serving_version()
        except Exception:
            serving = 0
        return codec.status_to_bytes(
            codec.DeviceStatus(
                device_id=self.settings.device_id,
                fleet=self.settings.fleet,
                serving_version=serving,
                state="OFFLINE",
                timestamp_ms=_now_ms(),
            )
        )
