"""Staged rollouts: a new global version is served fleet-wide only after its phases pass.

Under ``[rollout] policy = "staged"`` the release signer (:mod:`cloud.signer`) hands each
round's checked version to :class:`RolloutController` instead of publishing it to the
whole fleet. The controller runs inside ``cloud up`` (a thread beside the signer) and
drives the phases of ``[rollout] phases``:

1. **check**: a signed *candidate* (``phase`` n, ``action = "check"``, the cohort bound
   of phase n, the fleet's served version) goes out, retained, on
   ``topics.release_candidate``; its chunks on the usual chunk topics. Devices of the
   cohort (:mod:`protos.cohort`) store it beside the served version, evaluate both on
   their local data and report ``candidate_checked`` (or ``candidate_failed``) events.
   The phase's cohort, as the controller counts it, is the devices online at the start
   of the phase whose cohort position is below the bound. A phase that begins with no
   device online (a fresh fleet's first round) takes its cohort when devices come
   online, and its check goes out again with that bound.
2. **gate**: once every device of the cohort answered and ``soak_s`` passed, or at
   ``phase_timeout_s``, :func:`cloud.rollout_policy.evaluate_gate` decides.
3. **pass**: ``action = "serve"`` for the phase's cohort (those devices serve the
   candidate), then the next phase's check. When the last phase passes, the version is
   released fleet-wide exactly like an immediate release (the retained manifest, the
   registry's current version) and the candidate topic is cleared: devices that were
   offline or outside every cohort get it from the retained release.
4. **fail**: ``on_failure = "rollback"`` publishes ``action = "revert"`` to the whole
   fleet (every device serving the candidate serves the fleet's version again);
   ``"halt"`` publishes ``action = "halt"`` (devices keep what they serve). Either way
   the fleet-wide release does not move.

Every decision is a registry event from ``cloud`` (kinds ``rollout started``, ``rollout
phase passed``, ``rollout phase failed``, ``rollout promoted``, ``rollout halted``,
``rollout rolled back``, ``rollout superseded``) whose detail is a JSON object with the
figures.

**Broker restarts.** A SIGKILLed Mosquitto comes back from its last autosave, which may
have lost the candidate or its chunks, or hold an older one. The cloud's watchdog then
calls :meth:`RolloutController.republish`, which puts the candidate topic back as the
controller left it (``rollout republished``; retried at every tick until the broker
takes it).

**Training continues** while a rollout runs. A newer candidate **supersedes** an older
one still in its phases: the older rollout ends (``rollout superseded``), the newer one
starts at phase 1, and devices that serve the older, never-promoted candidate return to
the fleet's served version when the newer candidate reaches them. So in a run whose
rounds are shorter than a rollout, the fleet is promoted to the run's last versions
only. The very first version of a fleet (nothing served yet) is released at once.
The controller keeps its state in memory: after a cloud restart the aggregator releases
the pending version again and its rollout starts over at phase 1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cloud.config import CloudSettings
from cloud.errors import CloudError
from cloud.registry import Registry
from cloud.rollout_policy import CheckReport, GateResult, evaluate_gate, figures_so_far, phases_of
from protos import codec, cohort

logger = logging.getLogger(__name__)

#: Source of the registry events the controller records.
EVENT_SOURCE = "cloud"
#: Seconds between two looks at the running phase.
TICK_S = 0.25
#: Seconds between two looks for online devices while a phase's cohort is empty.
RETAKE_S = 1.0
#: Finished rollouts kept for ``status`` (newest last).
HISTORY = 20

#: Event kind of the candidate topic put back after a broker restart.
REPUBLISHED_EVENT_KIND = "rollout republished"

CHECKED = "candidate_checked"
FAILED = "candidate_failed"


class RolloutError(CloudError, RuntimeError):
    """An operator action that does not apply (no such rollout, already decided)."""


@dataclass
class Phase:
    """One phase of a rollout and what happened in it."""

    number: int
    fraction: float
    min_devices: int
    cohort_ppm: int = 0
    cohort: set[str] = field(default_factory=set)
    started_at: float = 0.0
    started_wall: float = 0.0
    reports: dict[str, CheckReport] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    result: GateResult | None = None
    decided_wall: float | None = None
    #: When an empty cohort was last looked at again (monotonic).
    retaken_at: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "phase": self.number,
            "fraction": self.fraction,
            "cohort_ppm": self.cohort_ppm,
            "cohort": sorted(self.cohort),
            "checked": sorted(self.reports),
            "failed": dict(self.failed),
            "started_at": self.started_wall,
            "decided_at": self.decided_wall,
            "passed": None if self.result is None else self.result.passed,
            "reason": None if self.result is None else self.result.reason,
            "figures": None if self.result is None else _finite(self.result.figures()),
            "so_far": (
                _finite(figures_so_far(self.reports, set(self.failed), self.cohort))
                if self.result is None
                else None
            ),
        }


@dataclass
class Rollout:
    """One candidate version going through the phases."""

    version: int
    served_version: int
    round: int
    parent_version: int
    architecture_id: str
    metrics: dict[str, float]
    package: bytes
    phases: list[Phase]
    index: int = 0
    status: str = "running"  # running, promoted, halted, rolled back, superseded
    sequence: int = 0
    chunk_count: int = 0
    #: The candidate manifest published last: what the candidate topic holds.
    last_manifest: codec.Manifest | None = None
    started_wall: float = field(default_factory=time.time)
    finished_wall: float | None = None

    @property
    def phase(self) -> Phase:
        return self.phases[self.index]

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "served_version": self.served_version,
            "round": self.round,
            "status": self.status,
            "phase": self.phase.number,
            "phase_count": len(self.phases),
            "started_at": self.started_wall,
            "finished_at": self.finished_wall,
            "phases": [p.summary() for p in self.phases[: self.index + 1]],
        }


def _finite(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if v == v and abs(v) != float("inf") else None) for k, v in values.items()}


class RolloutController:
    """Runs staged rollouts for one fleet (one at a time; see the module docstring).

    ``publisher()`` returns a connected-on-enter :class:`cloud.publisher.Publisher`
    signing with the fleet key; ``promote(version)`` releases a version fleet-wide
    (the signer's own release path) and returns its sequence.
    """

    def __init__(
        self,
        settings: CloudSettings,
        registry: Registry,
        *,
        publisher: Callable[[], Any],
        promote: Callable[[int], int],
        online_devices: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.settings = settings
        self.policy = settings.rollout
        self.registry = registry
        self._publisher_factory = publisher
        self._promote = promote
        self._online = online_devices or self._online_from_registry
        self._lock = threading.RLock()
        self._active: Rollout | None = None
        self._history: list[Rollout] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pub: Any = None
        self._republish_pending = False

    @property
    def staged(self) -> bool:
        return self.policy.policy == "staged"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> RolloutController:
        self._thread = threading.Thread(target=self._run, name="rollout", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            self._close_publisher()

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # a bug or a broker outage must not end the controller
                logger.exception("rollout: tick failed (tried again)")

    # -- what the signer, the monitor and the operator call ------------------------------

    def submit(self, version: int) -> int:
        """Start the rollout of a checked, registered ``version``; returns its sequence.

        Idempotent for the running candidate. Raises what publishing raises (the signer
        maps it to "retry"): nothing changes then.
        """
        with self._lock:
            active = self._active
            if active is not None and active.version == version and active.status == "running":
                return active.sequence
            current = self.registry.current()
            v = self.registry.get_version(version)
            rollout = Rollout(
                version=version,
                served_version=0 if current is None else current.version,
                round=v.round,
                parent_version=v.parent_version or 0,
                architecture_id=v.architecture_id,
                metrics=dict(v.metrics),
                package=self.registry.version_bytes(version),
                phases=[Phase(i + 1, f, m) for i, (f, m) in enumerate(phases_of(self.policy))],
            )
            self._begin_phase(rollout, with_chunks=True)
            if active is not None and active.status == "running":
                self._finish(active, "superseded", {"by": version})
                self._clear_chunks(active)
            self._active = rollout
            self._record(
                "rollout started",
                version,
                {"served_version": rollout.served_version, "phases": self.policy.phases},
            )
            return rollout.sequence

    def on_events(self, events: Iterable[codec.DeviceEvent]) -> None:
        """Device events from the fleet monitor: the running phase's checks and failures."""
        with self._lock:
            r = self._active
            if r is None or r.status != "running":
                return
            ph = r.phase
            for e in events:
                if e.version != r.version or e.kind not in (CHECKED, FAILED):
                    continue
                if int(e.metrics.get("phase", -1)) != ph.number:
                    continue
                if e.device_id not in ph.cohort:
                    # Only the devices counted at the phase's start (known to the registry,
                    # online, below the bound) decide it.
                    logger.info("rollout: report of %s outside the phase's cohort", e.device_id)
                    continue
                if e.kind == FAILED:
                    ph.failed[e.device_id] = e.detail
                    ph.reports.pop(e.device_id, None)
                    continue
                try:
                    ph.reports[e.device_id] = CheckReport.from_metrics(e.device_id, e.metrics)
                except (KeyError, ValueError) as exc:
                    ph.failed[e.device_id] = f"unusable report: {exc}"

    def republish(self) -> int | None:
        """After a broker restart: put the candidate topic back as this controller left it.

        A SIGKILLed Mosquitto comes back from its last autosave, which may hold no
        candidate, an older one, or none of its chunks. A running candidate goes out
        again, chunks first, with the current phase's ``check`` under a new sequence
        (devices of the phase that had checked it check it again, which only refreshes
        their report; the phase keeps its start and its timeout). A finished rollout's
        last manifest (``revert`` or ``halt``) goes out again unchanged, same sequence,
        so only devices that missed it act on it; after a promotion the candidate topic
        is cleared. Returns the new sequence of a running candidate, else None. If the
        broker cannot be reached, the controller's thread tries again at every tick
        until it succeeds. Recorded as ``rollout republished``.
        """
        with self._lock:
            self._republish_pending = True
            return self._republish_if_pending()

    def _republish_if_pending(self) -> int | None:
        if not self._republish_pending:
            return None
        r = self._active
        last = None if r is None else r.last_manifest
        if r is None or last is None:
            self._republish_pending = False
            return None
        sequence: int | None = None
        if r.status == "running":
            manifest = self._publish(r, r.phase, "check", with_chunks=True)
            r.sequence = sequence = manifest.sequence
            action = "check"
        elif r.status == "promoted":
            with self._publisher() as pub:
                pub.clear_candidate(r.version, r.chunk_count, keep_chunks=True)
            action = "clear"
        else:
            with self._publisher() as pub:
                pub.republish_candidate(last)
            action = last.action
        self._republish_pending = False
        self._record(
            REPUBLISHED_EVENT_KIND,
            r.version,
            {
                "status": r.status,
                "phase": r.phase.number,
                "action": action,
                "sequence": sequence if sequence is not None else last.sequence,
                "reason": "the broker restarted",
            },
        )
        logger.info(
            "rollout of version %d (%s): candidate topic put back after a broker restart (%s)",
            r.version,
            r.status,
            action,
        )
        return sequence

    def tick(self) -> None:
        """Decide the running phase when its time has come (called by the thread)."""
        with self._lock:
            self._republish_if_pending()
            r = self._active
            if r is None or r.status != "running":
                return
            ph = r.phase
            if not ph.cohort:
                self._retake_cohort(r)
            elapsed = time.monotonic() - ph.started_at
            answered = set(ph.reports) | set(ph.failed)
            # An empty cohort (nobody online) waits for the timeout: devices may come back
            # (the phase takes them as its cohort when they do).
            complete = bool(ph.cohort) and ph.cohort <= answered and elapsed >= self.policy.soak_s
            if not complete and elapsed < self.policy.phase_timeout_s:
                return
            result = evaluate_gate(self.policy, ph.reports, set(ph.failed), ph.cohort)
            ph.result = result
            ph.decided_wall = time.time()
            figures = {
                "phase": ph.number,
                "fraction": ph.fraction,
                "cohort": sorted(ph.cohort),
                "reason": result.reason,
                "timed_out": not complete,
                **_finite(result.figures()),
            }
            if not result.passed:
                self._record("rollout phase failed", r.version, figures)
                logger.warning(
                    "rollout of version %d: phase %d failed: %s",
                    r.version,
                    ph.number,
                    result.reason,
                )
                self._fail(r, figures)
                return
            self._record("rollout phase passed", r.version, figures)
            logger.info(
                "rollout of version %d: phase %d passed: %s", r.version, ph.number, result.reason
            )
            if r.index + 1 < len(r.phases):
                self._publish(r, ph, "serve", with_chunks=False)
                r.index += 1
                self._begin_phase(r, with_chunks=False)
            else:
                self._promote_fleet(r, "last phase passed")

    def promote(self, version: int) -> int:
        """Operator: release the running candidate fleet-wide now, skipping its phases."""
        with self._lock:
            r = self._running(version)
            return self._promote_fleet(r, "promoted by the operator")

    def halt(self, version: int) -> None:
        """Operator: stop the running candidate where it is (devices keep what they serve)."""
        with self._lock:
            r = self._running(version)
            self._publish(r, r.phase, "halt", with_chunks=False)
            self._finish(r, "halted", {"by": "operator"})

    def status(self) -> dict[str, Any]:
        """The running rollout (if any) and the recent finished ones, as plain data."""
        with self._lock:
            return {
                "policy": self.policy.policy,
                "active": None if self._active is None else self._active.summary(),
                "history": [r.summary() for r in self._history],
            }

    # -- internals (under the lock) ------------------------------------------------------

    def _running(self, version: int) -> Rollout:
        r = self._active
        if r is None or r.version != version or r.status != "running":
            raise RolloutError(f"version {version} has no rollout in progress")
        return r

    def _online_from_registry(self) -> list[str]:
        return [d.device_id for d in self.registry.list_devices() if d.online]

    def _begin_phase(self, r: Rollout, *, with_chunks: bool) -> None:
        ph = r.phase
        online = set(self._online())
        ph.cohort_ppm = max(
            1, cohort.bound_for(self.settings.cloud.fleet, online, ph.fraction, ph.min_devices)
        )
        ph.cohort = set(cohort.members(self.settings.cloud.fleet, online, ph.cohort_ppm))
        ph.started_at = time.monotonic()
        ph.started_wall = time.time()
        manifest = self._publish(r, ph, "check", with_chunks=with_chunks)
        r.sequence = manifest.sequence
        r.chunk_count = manifest.chunk_count
        logger.info(
            "rollout of version %d: phase %d checks on %d devices (%s)",
            r.version,
            ph.number,
            len(ph.cohort),
            ", ".join(sorted(ph.cohort)) or "none online",
        )

    def _retake_cohort(self, r: Rollout) -> None:
        """A phase begun with nobody online takes its cohort once devices are online.

        In a fresh default fleet a device is known only after it answered a round, so
        the first round's candidate can begin before the registry sees any device. The
        phase keeps its start (soak and timeout count from it) and publishes its check
        again for the new cohort (no chunks: they went out with the first check).
        Looked at every ``RETAKE_S`` while the cohort is empty.
        """
        ph = r.phase
        now = time.monotonic()
        if now - ph.retaken_at < RETAKE_S:
            return
        ph.retaken_at = now
        online = set(self._online())
        if not online:
            return
        fleet = self.settings.cloud.fleet
        bound = max(1, cohort.bound_for(fleet, online, ph.fraction, ph.min_devices))
        members = set(cohort.members(fleet, online, bound))
        if not members:
            return
        ph.cohort_ppm, ph.cohort = bound, members
        manifest = self._publish(r, ph, "check", with_chunks=False)
        r.sequence = manifest.sequence
        logger.info(
            "rollout of version %d: phase %d checks on %d devices that came online (%s)",
            r.version,
            ph.number,
            len(members),
            ", ".join(sorted(members)),
        )

    def _fail(self, r: Rollout, figures: dict[str, Any]) -> None:
        if self.policy.on_failure == "rollback":
            # Everyone serving the candidate (earlier phases) returns to the served version.
            self._publish(r, r.phase, "revert", with_chunks=False, cohort_ppm=cohort.SCALE)
            self._finish(r, "rolled back", figures)
        else:
            self._publish(r, r.phase, "halt", with_chunks=False)
            self._finish(r, "halted", figures)
        self._clear_chunks(r)

    def _promote_fleet(self, r: Rollout, why: str) -> int:
        sequence = self._promote(r.version)
        r.status = "promoted"
        r.finished_wall = time.time()
        try:
            with self._publisher() as pub:
                pub.clear_candidate(r.version, r.chunk_count, keep_chunks=True)
        except Exception:
            logger.exception("rollout: the candidate topic was not cleared")
        self._record("rollout promoted", r.version, {"reason": why, "sequence": sequence})
        self._retire(r)
        return sequence

    def _finish(self, r: Rollout, status: str, figures: dict[str, Any]) -> None:
        r.status = status
        r.finished_wall = time.time()
        self._record(f"rollout {status}", r.version, figures)
        self._retire(r)

    def _retire(self, r: Rollout) -> None:
        self._history.append(r)
        del self._history[:-HISTORY]
        r.package = b""  # the registry keeps it; the history keeps figures only

    def _clear_chunks(self, r: Rollout) -> None:
        current = self.registry.current()
        if current is not None and current.version == r.version:
            return
        try:
            with self._publisher() as pub:
                pub._clear_chunks(r.version, r.chunk_count, keep_from=None)
        except Exception:
            logger.exception("rollout: chunks of candidate %d not cleared", r.version)

    @contextlib.contextmanager
    def _publisher(self) -> Iterator[Any]:
        """The controller's one long-lived publisher; dropped (reconnected later) on errors."""
        if self._pub is None:
            self._pub = self._publisher_factory().connect()
        try:
            yield self._pub
        except BaseException:
            self._close_publisher()
            raise

    def _close_publisher(self) -> None:
        if self._pub is not None:
            try:
                self._pub.close()
            except Exception:
                logger.debug("closing the rollout publisher failed", exc_info=True)
            self._pub = None

    def _publish(
        self,
        r: Rollout,
        ph: Phase,
        action: str,
        *,
        with_chunks: bool,
        cohort_ppm: int | None = None,
    ) -> codec.Manifest:
        if not r.package:
            r.package = self.registry.version_bytes(r.version)
        ppm = ph.cohort_ppm if cohort_ppm is None else cohort_ppm
        with self._publisher() as pub:
            manifest: codec.Manifest = pub.publish_candidate(
                version=r.version,
                parent_version=r.parent_version,
                round=r.round,
                package=r.package,
                architecture_id=r.architecture_id,
                metrics=r.metrics,
                phase=ph.number,
                cohort_ppm=ppm,
                action=action,
                served_version=r.served_version,
                with_chunks=with_chunks,
            )
        r.last_manifest = manifest
        return manifest

    def _record(self, kind: str, version: int, figures: dict[str, Any]) -> None:
        try:
            self.registry.record_event(
                codec.DeviceEvent(
                    device_id=EVENT_SOURCE,
                    timestamp_ms=int(time.time() * 1000),
                    kind=kind,
                    detail=json.dumps({"version": version, **figures}, sort_keys=True),
                    version=version,
                )
            )
        except Exception:
            logger.exception("rollout: could not record %r for version %d", kind, version)
