"""A staged rollout's state: its phases, reports and decisions, and its stored form.

:class:`Rollout` and :class:`Phase` are what :class:`cloud.rollout.RolloutController`
works on. :meth:`Rollout.to_state` turns one into a plain JSON document, which the
controller stores in the registry (table ``rollouts``) at every change, and
:meth:`Rollout.from_state` reads it back when a restarted cloud resumes
(:class:`RolloutStateError` for a document it cannot trust: malformed, an unknown
format, values of the wrong type or out of range).

Document (format 1)::

    {"format": 1, "version": 7, "served_version": 6, "round": 7, "parent_version": 6,
     "architecture_id": "…", "metrics": {…}, "index": 0, "status": "running",
     "sequence": …, "chunk_count": 1, "started_wall": …, "finished_wall": null,
     "last_manifest": "<base64 of the signed candidate manifest published last>",
     "phases": [{"number": 1, "fraction": 0.1, "min_devices": 1, "cohort_ppm": …,
                 "cohort": ["dev-1"], "started_wall": …, "decided_wall": null,
                 "reports": {"dev-1": {"candidate_accuracy": …, "served_accuracy": …,
                                       "examples": …, "candidate_error_rate": …,
                                       "served_error_rate": …, "inference_calls": …}},
                 "failed": {"dev-2": "install: …"}, "result": null | {GateResult fields}}]}

The inference figures of a report and of a result are optional (a document stored
before them has none; a device that does not report them gives none). Times are seconds
since the Unix epoch; non-finite figures are stored as null. The
package bytes are not stored (the registry holds them under the version).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

from cloud.errors import CloudError
from cloud.rollout_policy import CheckReport, GateResult, figures_so_far
from protos import codec
from protos.errors import CodecError

#: The stored document's format; another number is refused.
STATE_FORMAT = 1
#: A rollout's statuses.
STATUSES = ("running", "promoted", "halted", "rolled back", "superseded")


class RolloutStateError(CloudError, ValueError):
    """A stored rollout state that cannot be resumed (malformed, unknown format, bad value)."""


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
    #: When an empty cohort was last looked at again (monotonic; not stored).
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
            "figures": None if self.result is None else finite(self.result.figures()),
            "so_far": (
                finite(figures_so_far(self.reports, set(self.failed), self.cohort))
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

    def to_state(self) -> dict[str, Any]:
        """The stored form of this rollout (see the module docstring)."""
        last = self.last_manifest
        return {
            "format": STATE_FORMAT,
            "version": self.version,
            "served_version": self.served_version,
            "round": self.round,
            "parent_version": self.parent_version,
            "architecture_id": self.architecture_id,
            "metrics": {k: float(v) for k, v in self.metrics.items() if math.isfinite(v)},
            "index": self.index,
            "status": self.status,
            "sequence": self.sequence,
            "chunk_count": self.chunk_count,
            "started_wall": self.started_wall,
            "finished_wall": self.finished_wall,
            "last_manifest": (
                None
                if last is None
                else base64.b64encode(codec.manifest_to_bytes(last)).decode("ascii")
            ),
            "phases": [_phase_to_state(p) for p in self.phases],
        }

    @classmethod
    def from_state(cls, doc: Any) -> Rollout:
        """Read a stored rollout back; :class:`RolloutStateError` says what is wrong."""
        if not isinstance(doc, dict):
            raise RolloutStateError("the stored state is not a JSON object")
        fmt = doc.get("format")
        if fmt != STATE_FORMAT:
            raise RolloutStateError(
                f"unknown state format {fmt!r} (this edgefl reads format {STATE_FORMAT})"
            )
        now_wall, now_mono = time.time(), time.monotonic()
        phases = [_phase_from_state(p, now_wall, now_mono) for p in _get(doc, "phases", list)]
        if [p.number for p in phases] != list(range(1, len(phases) + 1)):
            raise RolloutStateError(f"phases are not numbered 1..n: {[p.number for p in phases]}")
        index = _get(doc, "index", int)
        if not 0 <= index < len(phases):
            raise RolloutStateError(f"phase index {index} is not one of {len(phases)} phases")
        status = _get(doc, "status", str)
        if status not in STATUSES:
            raise RolloutStateError(f"unknown status {status!r}")
        version = _get(doc, "version", int)
        if version < 1:
            raise RolloutStateError(f"version {version} is not ≥ 1")
        metrics = _get(doc, "metrics", dict)
        if not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()
        ):
            raise RolloutStateError("'metrics' maps names to numbers")
        last: codec.Manifest | None = None
        encoded = _get(doc, "last_manifest", str, none=True)
        if encoded is not None:
            try:
                last = codec.manifest_from_bytes(base64.b64decode(encoded, validate=True))
            except (binascii.Error, ValueError, CodecError) as exc:
                raise RolloutStateError(f"last_manifest does not decode: {exc}") from None
            if not last.candidate or last.version != version:
                raise RolloutStateError("last_manifest is not a candidate of this version")
        return cls(
            version=version,
            served_version=_get(doc, "served_version", int),
            round=_get(doc, "round", int),
            parent_version=_get(doc, "parent_version", int),
            architecture_id=_get(doc, "architecture_id", str),
            metrics={str(k): float(v) for k, v in metrics.items()},
            package=b"",
            phases=phases,
            index=index,
            status=status,
            sequence=_get(doc, "sequence", int),
            chunk_count=_get(doc, "chunk_count", int),
            last_manifest=last,
            started_wall=_get(doc, "started_wall", float),
            finished_wall=_get(doc, "finished_wall", float, none=True),
        )


def finite(values: dict[str, float]) -> dict[str, float | None]:
    """``values`` with NaN and infinities as None (JSON has neither)."""
    return {k: (v if v == v and abs(v) != float("inf") else None) for k, v in values.items()}


def _phase_to_state(ph: Phase) -> dict[str, Any]:
    result = None
    if ph.result is not None:
        result = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in dataclasses.asdict(ph.result).items()
        }
    return {
        "number": ph.number,
        "fraction": ph.fraction,
        "min_devices": ph.min_devices,
        "cohort_ppm": ph.cohort_ppm,
        "cohort": sorted(ph.cohort),
        "started_wall": ph.started_wall,
        "decided_wall": ph.decided_wall,
        "reports": {d: r.to_metrics() for d, r in sorted(ph.reports.items())},
        "failed": dict(sorted(ph.failed.items())),
        "result": result,
    }


def _get(doc: Any, key: str, kind: type | tuple[type, ...], *, none: bool = False) -> Any:
    if not isinstance(doc, dict):
        raise RolloutStateError(f"expected an object, got {type(doc).__name__}")
    if key not in doc:
        raise RolloutStateError(f"{key!r} is missing")
    value = doc[key]
    if value is None and none:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise RolloutStateError(f"{key!r} is {value!r}, not {kinds[0].__name__}")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds):
        raise RolloutStateError(f"{key!r} is {value!r}, not {kinds[0].__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RolloutStateError(f"{key!r} is not finite")
    return value


def _optional(doc: dict[str, Any], key: str, kind: type) -> Any:
    """``doc[key]`` checked like :func:`_get`, or None when missing or null."""
    return _get(doc, key, kind, none=True) if key in doc else None


def _nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _phase_from_state(doc: Any, now_wall: float, now_mono: float) -> Phase:
    started_wall = _get(doc, "started_wall", float)
    reports: dict[str, CheckReport] = {}
    for device, r in _get(doc, "reports", dict).items():
        try:
            reports[device] = CheckReport.from_metrics(device, r)
        except (KeyError, TypeError, ValueError) as exc:
            raise RolloutStateError(f"report of {device!r}: {exc}") from None
    failed = _get(doc, "failed", dict)
    if not all(isinstance(v, str) for v in failed.values()):
        raise RolloutStateError("'failed' maps devices to reasons (text)")
    cohort = _get(doc, "cohort", list)
    if not all(isinstance(d, str) for d in cohort):
        raise RolloutStateError("'cohort' is a list of device ids")
    raw = _get(doc, "result", dict, none=True)
    result = None
    if raw is not None:
        result = GateResult(
            passed=_get(raw, "passed", bool),
            reason=_get(raw, "reason", str),
            checked=_get(raw, "checked", int),
            failures=_get(raw, "failures", int),
            silent=_get(raw, "silent", int),
            accuracy_drop=_nan(_get(raw, "accuracy_drop", float, none=True)),
            candidate_accuracy=_nan(_get(raw, "candidate_accuracy", float, none=True)),
            served_accuracy=_nan(_get(raw, "served_accuracy", float, none=True)),
            # Inference figures (optional: a state stored before them has none).
            candidate_error_rate=_nan(_optional(raw, "candidate_error_rate", float)),
            served_error_rate=_nan(_optional(raw, "served_error_rate", float)),
            inference_calls=_optional(raw, "inference_calls", int) or 0,
            max_inference_error_rate=_nan(_optional(raw, "max_inference_error_rate", float)),
        )
    fraction = _get(doc, "fraction", float)
    if not 0 < fraction <= 1:
        raise RolloutStateError(f"phase fraction {fraction} is not in (0, 1]")
    return Phase(
        number=_get(doc, "number", int),
        fraction=fraction,
        min_devices=_get(doc, "min_devices", int),
        cohort_ppm=_get(doc, "cohort_ppm", int),
        cohort=set(cohort),
        # The phase's clock goes on across the restart: its soak and timeout count from
        # when it started, not from when this process read it back.
        started_at=now_mono - max(0.0, now_wall - started_wall),
        started_wall=started_wall,
        reports=reports,
        failed=dict(failed),
        result=result,
        decided_wall=_get(doc, "decided_wall", float, none=True),
    )
