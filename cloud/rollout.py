"""Staged rollouts: a new global version is served fleet-wide only after its phases pass.

Under ``[rollout] policy = "staged"`` the release signer (:mod:`cloud.signer`) hands each
round's checked version to :class:`RolloutController` instead of publishing it to the
whole fleet. The controller runs inside ``cloud up`` (a thread beside the signer) and
drives the phases of ``[rollout] phases``:

1. **check**: a signed *candidate* (``phase`` n, ``action = "check"``, the cohort bound
   of phase n, the fleet's served version) goes out, retained, on
   ``topics.release_candidate``; its chunks on the usual chunk topics. Devices of the
   cohort (:mod:`protos.cohort`) store it beside the served version, evaluate both on
   the held-out part of their local data (accuracy, and the share of inference calls
   that raised or gave non-finite outputs) and report ``candidate_checked`` (or
   ``candidate_failed``) events.
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
``rollout rolled back``, ``rollout superseded``; ``rollout resumed`` and ``rollout
republished`` for restarts) whose detail is a JSON object with the
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
**Cloud restarts.** Every change of a rollout is stored in the registry
(:meth:`cloud.registry.Registry.save_rollout`, the document of
:meth:`cloud.rollout_state.Rollout.to_state`); a restarted cloud resumes the running
rollout where it was (:meth:`RolloutController.resume`, ``rollout resumed``), and the
aggregator's release of the same version again finds it running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cloud.config import CloudSettings
from cloud.errors import CloudError
from cloud.registry import Registry
from cloud.rollout_policy import CheckReport, evaluate_gate, phases_of
from cloud.rollout_state import Phase, Rollout, RolloutStateError, finite
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
        self._republish_reason = "the broker restarted"

    @property
    def staged(self) -> bool:
        return self.policy.policy == "staged"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> RolloutController:
        """Resume the stored rollouts (:meth:`resume`), then run the phases in a thread."""
        self.resume()
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

    def resume(self) -> None:
        """Load the rollouts a previous cloud stored in the registry (called by :meth:`start`).

        The newest stored rollout that is still running goes on where it was: same
        phase, cohort and reports, its clock counted from the phase's stored start (a
        phase whose timeout passed while the cloud was down is decided at the first
        tick), and its candidate is published again (``rollout resumed``, then
        ``rollout republished``). It is not resumed, with a warning, when the policy is
        no longer staged or its version is no longer in the registry (marked
        ``halted``), or the fleet already serves it or a newer one (marked ``promoted``
        or ``superseded``). A stored state that cannot be read (malformed, an unknown
        format) is skipped with a warning; the cloud starts either way.
        """
        try:
            stored = self.registry.list_rollouts(HISTORY + 1)
        except Exception as exc:  # a registry problem must not stop the cloud's start
            logger.warning("rollout: stored rollouts not read (%s); none resumed", exc)
            return
        loaded: list[Rollout] = []
        for row in stored:  # newest first
            try:
                r = Rollout.from_state(json.loads(row.state_json))
                if r.version != row.version:
                    raise RolloutStateError(f"it names version {r.version}")
            except (ValueError, RolloutStateError) as exc:
                logger.warning(
                    "rollout: the stored state of version %d is ignored: %s", row.version, exc
                )
                continue
            loaded.append(r)
        if not loaded:
            return
        newest = loaded[0]
        with self._lock:
            for r in loaded[1:]:
                if r.status == "running":  # only the newest can be: a newer one superseded it
                    r.status, r.finished_wall = "superseded", time.time()
                    self._save(r)
            self._history = [r for r in reversed(loaded) if r.status != "running"][-HISTORY:]
            if newest.status == "running":
                self._resume_running(newest)
            self._active = newest
            # The broker may have restarted with the cloud: the candidate topic goes back.
            self._republish_pending = True
            self._republish_reason = "the cloud restarted"

    def _resume_running(self, r: Rollout) -> None:
        why = self._why_not_resumed(r)
        if why is not None:
            status, reason = why
            logger.warning("rollout of version %d not resumed: %s", r.version, reason)
            r.status, r.finished_wall = status, time.time()
            self._record(f"rollout {status}", r.version, {"reason": reason})
            self._retire(r)
            return
        ph = r.phase
        logger.info(
            "rollout of version %d resumed in phase %d (%d of %d devices answered)",
            r.version,
            ph.number,
            len(set(ph.reports) | set(ph.failed)),
            len(ph.cohort),
        )
        self._record(
            "rollout resumed",
            r.version,
            {
                "phase": ph.number,
                "cohort": sorted(ph.cohort),
                "checked": sorted(ph.reports),
                "failed": sorted(ph.failed),
                "elapsed_s": round(max(0.0, time.time() - ph.started_wall), 3),
            },
        )

    def _why_not_resumed(self, r: Rollout) -> tuple[str, str] | None:
        """(status to mark, reason) when a stored running rollout must not go on."""
        from cloud.registry import NotFoundError

        if not self.staged:
            return "halted", f"the rollout policy is now {self.policy.policy!r}"
        try:
            self.registry.get_version(r.version)
        except NotFoundError:
            return "halted", f"version {r.version} is no longer in the registry"
        current = self.registry.current()
        if current is not None and current.version == r.version:
            return "promoted", "the fleet already serves it"
        if current is not None and current.version > r.version:
            return "superseded", f"the fleet serves the newer version {current.version}"
        return None

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
            before = (dict(ph.reports), dict(ph.failed))
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
            if (ph.reports, ph.failed) != before:
                self._save(r)

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
            self._republish_reason = "the broker restarted"
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
            self._save(r)
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
                "reason": self._republish_reason,
            },
        )
        logger.info(
            "rollout of version %d (%s): candidate topic put back (%s: %s)",
            r.version,
            r.status,
            self._republish_reason,
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
            result = evaluate_gate(
                self.policy, ph.reports, set(ph.failed), ph.cohort, phase=ph.number
            )
            ph.result = result
            ph.decided_wall = time.time()
            figures = {
                "phase": ph.number,
                "fraction": ph.fraction,
                "cohort": sorted(ph.cohort),
                "reason": result.reason,
                "timed_out": not complete,
                **finite(result.figures()),
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
        self._save(r)
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
        self._save(r)
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
        self._save(r)

    def _save(self, r: Rollout) -> None:
        """Store ``r``'s state in the registry (a cloud that restarts resumes from it)."""
        try:
            self.registry.save_rollout(r.version, r.status, r.to_state())
        except Exception:  # the rollout goes on in memory; the next change tries again
            logger.exception("rollout: the state of version %d was not stored", r.version)

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
