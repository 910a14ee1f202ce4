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
* ``candidate_error_rate`` = the candidate's inference calls that raised or gave
  non-finite outputs, over all its calls in the phase's checks (each device makes one
  call per held-out sample and reports its rate and ``inference_calls``);
  ``served_error_rate`` the same for the served version, for comparison. A report
  without these figures (a device from before them) does not count towards the rates;
  with none, the rates are unknown (NaN, ``null`` in JSON) and this rule does not apply;
* the gate passes iff at least one device checked the candidate, ``failures`` ≤
  ``max_install_failures``, ``candidate_error_rate`` ≤ the phase's
  ``max_inference_error_rate`` and ``accuracy_drop`` ≤ ``max_accuracy_drop``; a failing
  gate's reason names the first rule broken, in that order.
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


def error_rate_limits(section: Any) -> tuple[float, ...]:
    """``max_inference_error_rate`` of every phase of a valid section."""
    limits = parse_list(section.max_inference_error_rate, float)
    count = len(parse_list(section.phases, float))
    return limits * count if len(limits) == 1 else limits


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
    try:
        rates = parse_list(section.max_inference_error_rate, float)
    except ValueError as exc:
        p.append(
            f"rollout.max_inference_error_rate: {exc} (write rates like \"0\" or \"0, 0, 0.01\")"
        )
    else:
        if len(rates) not in (1, len(phases)):
            p.append(
                "rollout.max_inference_error_rate needs one rate for every phase or one per "
                f"phase ({len(phases)}), got {list(rates)}"
            )
        elif any(not (0 <= r <= 1) for r in rates):  # NaN fails this too
            p.append(f"rollout.max_inference_error_rate must be rates in [0, 1], got {list(rates)}")
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
    """One device's shadow check of a candidate: both versions on its held-out split.

    The inference figures are optional (``None``/0 from a device that does not report
    them): ``candidate_error_rate`` and ``served_error_rate`` are shares of
    ``inference_calls`` calls per version that raised or gave non-finite outputs.
    """

    device_id: str
    candidate_accuracy: float
    served_accuracy: float
    examples: int
    candidate_error_rate: float | None = None
    served_error_rate: float | None = None
    inference_calls: int = 0

    @classmethod
    def from_metrics(cls, device_id: str, metrics: Mapping[str, Any]) -> CheckReport:
        """From a ``candidate_checked`` event's metrics (KeyError/ValueError if incomplete)."""

        def rate(key: str) -> float | None:
            value = metrics.get(key)
            return None if value is None else float(value)

        report = cls(
            device_id,
            float(metrics["candidate_accuracy"]),
            float(metrics["served_accuracy"]),
            int(metrics["examples"]),
            rate("candidate_error_rate"),
            rate("served_error_rate"),
            int(metrics.get("inference_calls") or 0),
        )
        values = [report.candidate_accuracy, report.served_accuracy]
        rates = (report.candidate_error_rate, report.served_error_rate)
        values += [r for r in rates if r is not None]
        rates_without_calls = report.candidate_error_rate is not None and report.inference_calls < 1
        if (
            not all(math.isfinite(v) and 0 <= v <= 1 for v in values)
            or report.examples < 1
            or report.inference_calls < 0
            or rates_without_calls
        ):
            raise ValueError(f"check report of {device_id} is out of range: {dict(metrics)}")
        return report

    def to_metrics(self) -> dict[str, float | int]:
        """The figures :meth:`from_metrics` reads (the optional ones only when known)."""
        out: dict[str, float | int] = {
            "candidate_accuracy": self.candidate_accuracy,
            "served_accuracy": self.served_accuracy,
            "examples": self.examples,
        }
        if self.candidate_error_rate is not None:
            out["candidate_error_rate"] = self.candidate_error_rate
            out["inference_calls"] = self.inference_calls
        if self.served_error_rate is not None:
            out["served_error_rate"] = self.served_error_rate
        return out


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
    candidate_error_rate: float = float("nan")
    served_error_rate: float = float("nan")
    inference_calls: int = 0
    max_inference_error_rate: float = float("nan")

    def figures(self) -> dict[str, float]:
        return {
            "checked": float(self.checked),
            "failures": float(self.failures),
            "silent": float(self.silent),
            "accuracy_drop": self.accuracy_drop,
            "candidate_accuracy": self.candidate_accuracy,
            "served_accuracy": self.served_accuracy,
            "candidate_error_rate": self.candidate_error_rate,
            "served_error_rate": self.served_error_rate,
            "inference_calls": float(self.inference_calls),
            "max_inference_error_rate": self.max_inference_error_rate,
        }


def _accuracies(good: Mapping[str, CheckReport]) -> tuple[float, float]:
    """(served, candidate) accuracy weighted by check samples; NaN without checks."""
    total = sum(r.examples for r in good.values())
    if not total:
        return float("nan"), float("nan")
    cand = sum(r.candidate_accuracy * r.examples for r in good.values()) / total
    served = sum(r.served_accuracy * r.examples for r in good.values()) / total
    return served, cand


def _error_rates(good: Mapping[str, CheckReport]) -> tuple[float, float, int]:
    """(served, candidate) inference error rate over all reported calls, and the calls
    per version; NaN rates when no report carries them."""
    rated = [r for r in good.values() if r.candidate_error_rate is not None]
    calls = sum(r.inference_calls for r in rated)
    if not calls:
        return float("nan"), float("nan"), 0
    cand = sum((r.candidate_error_rate or 0.0) * r.inference_calls for r in rated) / calls
    served_rated = [r for r in rated if r.served_error_rate is not None]
    served_calls = sum(r.inference_calls for r in served_rated)
    served = (
        sum((r.served_error_rate or 0.0) * r.inference_calls for r in served_rated) / served_calls
        if served_calls
        else float("nan")
    )
    return served, cand, calls


def figures_so_far(
    reports: Mapping[str, CheckReport], failed: set[str], cohort: set[str]
) -> dict[str, float]:
    """The figures of a phase not decided yet: what its reports say so far.

    Like :meth:`GateResult.figures`, with ``pending`` (devices of the phase that have
    not answered yet) instead of ``silent``; failures count only reported ones.
    """
    good = {d: r for d, r in reports.items() if d not in failed}
    served, cand = _accuracies(good)
    served_rate, cand_rate, calls = _error_rates(good)
    return {
        "checked": float(len(good)),
        "failures": float(len(failed)),
        "pending": float(len(cohort - set(good) - failed)),
        "accuracy_drop": served - cand,
        "candidate_accuracy": cand,
        "served_accuracy": served,
        "candidate_error_rate": cand_rate,
        "served_error_rate": served_rate,
        "inference_calls": float(calls),
    }


def evaluate_gate(
    section: Any,
    reports: Mapping[str, CheckReport],
    failed: set[str],
    cohort: set[str],
    phase: int = 1,
) -> GateResult:
    """Decide phase number ``phase`` from its reports (see the module docstring for the rule)."""
    good = {d: r for d, r in reports.items() if d not in failed}
    silent = len(cohort - set(good) - failed)
    failures = len(failed) + (silent if section.silent_devices == "failure" else 0)
    served, cand = _accuracies(good)
    drop = served - cand
    served_rate, cand_rate, calls = _error_rates(good)
    limits = error_rate_limits(section)
    max_rate = limits[min(max(phase, 1), len(limits)) - 1]
    if not good:
        passed, reason = False, "no device of the phase checked the candidate"
    elif failures > section.max_install_failures:
        passed = False
        reason = f"{failures} install/check failures > {section.max_install_failures} allowed"
    elif cand_rate > max_rate:  # False for NaN: no report carries the rates
        passed = False
        reason = (
            f"inference error rate {cand_rate:.4f} of the candidate (served version "
            f"{served_rate:.4f}, {calls} calls each) > {max_rate} allowed"
        )
    elif drop > section.max_accuracy_drop:
        passed = False
        reason = (
            f"local accuracy drops by {drop:.4f} (served {served:.4f}, candidate {cand:.4f}) "
            f"> {section.max_accuracy_drop} allowed"
        )
    else:
        passed = True
        reason = f"{len(good)} checks: accuracy {served:.4f} -> {cand:.4f}, {failures} failures"
        if calls:
            reason += f", inference error rate {cand_rate:.4f} (served {served_rate:.4f})"
    return GateResult(
        passed,
        reason,
        len(good),
        failures,
        silent,
        drop,
        cand,
        served,
        cand_rate,
        served_rate,
        calls,
        max_rate,
    )
