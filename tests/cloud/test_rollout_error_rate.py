"""The inference error-rate gate of ``[rollout]``: its setting and its maths, hand-computed."""

from __future__ import annotations

import dataclasses
import math

import pytest

from cloud import config as cloud_config
from cloud.rollout_policy import CheckReport, error_rate_limits, evaluate_gate, figures_so_far
from cloud.rollout_state import Phase, _phase_from_state, _phase_to_state


def _policy(**changes: object) -> cloud_config.RolloutSection:
    return dataclasses.replace(cloud_config.RolloutSection(policy="staged"), **changes)  # type: ignore[arg-type]


def _report(device: str, cand_rate: float | None, served_rate: float | None, calls: int):
    return CheckReport(
        device, 0.9, 0.9, calls, cand_rate, served_rate, calls if cand_rate is not None else 0
    )


def test_default_allows_no_error_in_any_phase_and_one_rate_per_phase_is_accepted() -> None:
    s = cloud_config.from_dict({})
    assert error_rate_limits(s.rollout) == (0.0, 0.0, 0.0)
    s = cloud_config.from_dict({"rollout": {"max_inference_error_rate": "0, 0.01, 0.02"}})
    assert error_rate_limits(s.rollout) == (0.0, 0.01, 0.02)
    s = cloud_config.from_dict({}, env={"EDGEFL_ROLLOUT_MAX_INFERENCE_ERROR_RATE": "0.05"})
    assert error_rate_limits(s.rollout) == (0.05, 0.05, 0.05)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("0, 0.1", "needs one rate for every phase or one per phase (3), got [0.0, 0.1]"),
        ("1.5", "must be rates in [0, 1], got [1.5]"),
        ("-0.1, 0, 0", "must be rates in [0, 1]"),
        ("nan", "must be rates in [0, 1]"),
        ("a lot", "rollout.max_inference_error_rate: 'a lot' is not a number"),
    ],
)
def test_bad_error_rate_limits_are_clear_errors(value: str, needle: str) -> None:
    with pytest.raises(cloud_config.ConfigError) as info:
        cloud_config.from_dict({"rollout": {"max_inference_error_rate": value}})
    assert needle in str(info.value)


def test_a_number_instead_of_a_list_text_is_a_type_error() -> None:
    with pytest.raises(cloud_config.ConfigError, match="max_inference_error_rate"):
        cloud_config.from_dict({"rollout": {"max_inference_error_rate": 0.1}})


def test_gate_fails_on_the_call_weighted_error_rate_before_accuracy() -> None:
    reports = {
        "a": _report("a", 0.0, 0.0, 100),
        "b": _report("b", 0.1, 0.0, 300),  # 30 of 300 calls erred
    }
    result = evaluate_gate(_policy(max_inference_error_rate="0.05"), reports, set(), {"a", "b"})
    # (0 * 100 + 0.1 * 300) / 400 = 0.075
    assert math.isclose(result.candidate_error_rate, 0.075)
    assert result.served_error_rate == 0.0 and result.inference_calls == 400
    assert not result.passed
    assert result.reason == (
        "inference error rate 0.0750 of the candidate (served version 0.0000, 400 calls each) "
        "> 0.05 allowed"
    )
    figures = result.figures()
    assert figures["candidate_error_rate"] == 0.075 and figures["max_inference_error_rate"] == 0.05
    assert evaluate_gate(
        _policy(max_inference_error_rate="0.08"), reports, set(), {"a", "b"}
    ).passed


def test_each_phase_has_its_own_limit() -> None:
    reports = {"a": _report("a", 0.02, 0.0, 50)}
    policy = _policy(max_inference_error_rate="0, 0.05, 0.05")
    assert not evaluate_gate(policy, reports, set(), {"a"}, phase=1).passed
    assert evaluate_gate(policy, reports, set(), {"a"}, phase=2).passed


def test_reports_without_inference_figures_are_not_counted() -> None:
    old = CheckReport.from_metrics(
        "old", {"candidate_accuracy": 0.9, "served_accuracy": 0.9, "examples": 40}
    )
    assert old.candidate_error_rate is None and old.inference_calls == 0
    alone = evaluate_gate(_policy(), {"old": old}, set(), {"old"})
    assert alone.passed and math.isnan(alone.candidate_error_rate)
    mixed = evaluate_gate(
        _policy(), {"old": old, "b": _report("b", 0.5, 0.0, 20)}, set(), {"old", "b"}
    )
    assert not mixed.passed and math.isclose(mixed.candidate_error_rate, 0.5)
    assert mixed.inference_calls == 20
    so_far = figures_so_far({"old": old}, set(), {"old", "c"})
    assert math.isnan(so_far["candidate_error_rate"]) and so_far["inference_calls"] == 0


def test_error_figures_out_of_range_are_refused() -> None:
    base = {"candidate_accuracy": 0.9, "served_accuracy": 0.9, "examples": 40}
    with pytest.raises(ValueError):
        CheckReport.from_metrics("a", {**base, "candidate_error_rate": 1.5, "inference_calls": 40})
    with pytest.raises(ValueError):
        CheckReport.from_metrics("a", {**base, "candidate_error_rate": 0.5})  # no calls
    report = CheckReport.from_metrics(
        "a", {**base, "candidate_error_rate": 1.0, "served_error_rate": 0.0, "inference_calls": 40}
    )
    assert (report.candidate_error_rate, report.served_error_rate, report.inference_calls) == (
        1.0,
        0.0,
        40,
    )


def test_the_stored_phase_keeps_the_figures_and_reads_older_documents() -> None:
    ph = Phase(1, 0.5, 1, cohort_ppm=500_000, cohort={"a", "b"}, started_wall=1000.0)
    ph.reports = {"a": _report("a", 1.0, 0.0, 36), "b": CheckReport("b", 0.8, 0.9, 20)}
    ph.result = evaluate_gate(_policy(), ph.reports, set(), ph.cohort)
    doc = _phase_to_state(ph)
    again = _phase_from_state(doc, now_wall=1001.0, now_mono=50.0)
    assert again.reports == ph.reports and again.result is not None
    assert again.result.candidate_error_rate == 1.0 and again.result.inference_calls == 36
    # A phase stored before the inference figures existed still loads.
    for key in (
        "candidate_error_rate",
        "served_error_rate",
        "inference_calls",
        "max_inference_error_rate",
    ):
        del doc["result"][key]
    for r in doc["reports"].values():
        for key in ("candidate_error_rate", "served_error_rate", "inference_calls"):
            r.pop(key, None)
    older = _phase_from_state(doc, now_wall=1001.0, now_mono=50.0)
    assert older.result is not None and math.isnan(older.result.candidate_error_rate)
    assert older.reports["a"].candidate_error_rate is None
