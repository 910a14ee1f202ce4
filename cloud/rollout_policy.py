"""The rollout policy (``[rollout]`` in cloud.toml) and the gate a phase must pass.

Pure logic, no I/O: :mod:`cloud.rollout` runs the phases, this module says whether the
policy is valid (:func:`policy_problems`) and whether a phase's reports pass its gate
(:func:`evaluate_gate`).

Gate of a phase, decided once every device of the phase has reported and ``soak_s``
has passed, or at ``phase_timeout_s`` with whatever reports arrived:

* ``failures`` = devices whose install or check of the candidate failed, plus (when
  ``silent_devices = "failure"``) devices of the phase that reported nothing;
* ``accuracy_drop`` = served accuracy minus candidate accuracy, averaged over the
  checks weighted by each device's number of check samples;
* the gate passes iff at least one device checked the candidate, ``failures`` ≤
  ``max_install_failures`` and ``accuracy_drop`` ≤ ``max_accuracy_drop``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T", int, float)

POLICIES = ("immediate", "staged")
SILENT_RULES = ("ignore", "failure")
ON_FAILURE = ("halt", "rollback")


def parse_list(text: str, kind: type[T]) -> tuple[T, ...]:
    """``"0.1, 0.5, 1.0"`` → ``(0.1, 0.5, 1.0)``; ValueError names the bad item."""
    out: list[T] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        try:
            number = float(item)
        except ValueError:
            raise ValueError(f"{item!r} is not a number") from None
        if kind is int:
            if not number.is_integer():
                raise ValueError(f"{item!r} is not an integer")
            out.append(kind(int(number)))
        else:
            out.append(kind(number))
    return tuple(out)


def phases_of(section: Any) -> list[tuple[float, int]]:
    """``(fraction, min_devices)`` of every phase of a valid section."""
    return list(
        zip(
            parse_list(section.phases, float),
            parse_list(section.min_devices, int),
            strict=True,
        )
    )


def policy_problems(section: Any) -> list[str]:
    """Every problem of a ``[rollout]`` section (a :class:`cloud.config.RolloutSection`)."""
    p: list[str] = []
    if section.policy not in POLICIES:
        p.append(f"rollout.policy {section.policy!r} is not one of {', '.join(POLICIES)}")
    phases: tuple[float, ...] = ()
    mins: tuple[int, ...] = ()
    try:
        phases = parse_list(section.phases, float)
    except ValueError as exc:
        p.append(f"rollout.phases: {exc} (write fractions like \"0.1, 0.5, 1.0\")")
        return p
    try:
        mins = parse_list(section.min_devices, int)
    except ValueError as exc:
        p.append(f"rollout.min_devices: {exc} (write counts like \"1, 2, 1\")")
        return p
    if not phases:
        p.append("rollout.phases needs at least one phase")
    elif any(not (0 < f <= 1) or not math.isfinite(f) for f in phases):
        p.append(f"rollout.phases must be fractions in (0, 1], got {list(phases)}")
    elif any(b <= a for a, b in itertools.pairwise(phases)):
        p.append(f"rollout.phases must be strictly ascending, got {list(phases)}")
    elif phases[-1] != 1.0:
        p.append(f"rollout.phases must end with 1.0 (the whole fleet), got {list(phases)}")
    if len(mins) != len(phases):
        p.append(f"rollout.min_devices needs one count per phase ({len(phases)}), got {list(mins)}")
    elif any(m < 0 for m in mins):
        p.append(f"rollout.min_devices must be ≥ 0, got {list(mins)}")
    if not (0 <= section.max_accuracy_drop <= 1) or not math.isfinite(section.max_accuracy_drop):
        p.append("rollout.max_accuracy_drop must be in [0, 1]")
    if section.max_install_failures < 0:
        p.append("rollout.max_install_failures must be ≥ 0")
    if not (section.soak_s >= 0 and math.isfinite(section.soak_s)):
        p.append("rollout.soak_s must be ≥ 0")
    if not (section.phase_timeout_s > 0 and math.isfinite(section.phase_timeout_s)):
        p.append("rollout.phase_timeout_s must be positive")
    elif section.soak_s > section.phase_timeout_s:
        p.append("rollout.soak_s must not exceed rollout.phase_timeout_s")
    if section.silent_devices not in SILENT_RULES:
        p.append(f"rollout.silent_devices must be one of {', '.join(SILENT_RULES)}")
    if section.on_failure not in ON_FAILURE:
        p.append(f"rollout.on_failure must be one of {', '.join(ON_FAILURE)}")
    return p


@dataclass(frozen=True)
class CheckReport:
    """One device's shadow check of a candidate: both versions on its check split."""

    device_id: str
    candidate_accuracy: float
    served_accuracy: float
    examples: int

    @classmethod
    def from_metrics(cls, device_id: str, metrics: Mapping[str, float]) -> CheckReport:
        """From a ``candidate_checked`` event's metrics (KeyError/ValueError if incomplete)."""
        report = cls(
            device_id,
            float(metrics["candidate_accuracy"]),
            float(metrics["served_accuracy"]),
            int(metrics["examples"]),
        )
        values = (report.candidate_accuracy, report.served_accuracy)
        if not all(math.isfinite(v) and 0 <= v <= 1 for v in values) or report.examples < 1:
            raise ValueError(f"check report of {device_id} is out of range: {dict(metrics)}")
        return report


@dataclass(frozen=True)
class GateResult:
    """The figures of a phase and its decision."""

    passed: bool
    reason: str
    checked: int
    failures: int
    silent: int
    accuracy_drop: float
    candidate_accuracy: float
    served_accuracy: float

    def figures(self) -> dict[str, float]:
        return {
            "checked": float(self.checked),
            "failures": float(self.failures),
            "silent": float(self.silent),
            "accuracy_drop": self.accuracy_drop,
            "candidate_accuracy": self.candidate_accuracy,
            "served_accuracy": self.served_accuracy,
        }


def _accuracies(good: Mapping[str, CheckReport]) -> tuple[float, float]:
    """(served, candidate) accuracy weighted by check samples; NaN without checks."""
    total = sum(r.examples for r in good.values())
    if not total:
        return float("nan"), float("nan")
    cand = sum(r.candidate_accuracy * r.examples for r in good.values()) / total
    served = sum(r.served_accuracy * r.examples for r in good.values()) / total
    return served, cand


def figures_so_far(
    reports: Mapping[str, CheckReport], failed: set[str], cohort: set[str]
) -> dict[str, float]:
    """The figures of a phase not decided yet: what its reports say so far.

    Like :meth:`GateResult.figures`, with ``pending`` (devices of the phase that have
    not answered yet) instead of ``silent``; failures count only reported ones.
    """
    good = {d: r for d, r in reports.items() if d not in failed}
    served, cand = _accuracies(good)
    return {
        "checked": float(len(good)),
        "failures": float(len(failed)),
        "pending": float(len(cohort - set(good) - failed)),
        "accuracy_drop": served - cand,
        "candidate_accuracy": cand,
        "served_accuracy": served,
    }


def evaluate_gate(
    section: Any,
    reports: Mapping[str, CheckReport],
    failed: set[str],
    cohort: set[str],
) -> GateResult:
    """Decide a phase from its reports (see the module docstring for the rule)."""
    good = {d: r for d, r in reports.items() if d not in failed}
    silent = len(cohort - set(good) - failed)
    failures = len(failed) + (silent if section.silent_devices == "failure" else 0)
    served, cand = _accuracies(good)
    drop = served - cand
    if not good:
        passed, reason = False, "no device of the phase checked the candidate"
    elif failures > section.max_install_failures:
        passed = False
        reason = f"{failures} install/check failures > {section.max_install_failures} allowed"
    elif drop > section.max_accuracy_drop:
        passed = False
        reason = (
            f"local accuracy drops by {drop:.4f} (served {served:.4f}, candidate {cand:.4f}) "
            f"> {section.max_accuracy_drop} allowed"
        )
    else:
        passed = True
        reason = f"{len(good)} checks: accuracy {served:.4f} -> {cand:.4f}, {failures} failures"
    return GateResult(passed, reason, len(good), failures, silent, drop, cand, served)
