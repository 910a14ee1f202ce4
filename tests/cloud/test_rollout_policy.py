"""The [rollout] section, cohort positions and the gate maths, with hand-computed figures."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import pytest

from cloud import config as cloud_config
from cloud.rollout_policy import CheckReport, evaluate_gate, figures_so_far, phases_of
from protos import cohort


def test_default_policy_is_immediate_and_valid() -> None:
    s = cloud_config.from_dict({})
    assert s.rollout.policy == "immediate"
    assert phases_of(s.rollout) == [(0.1, 1), (0.5, 2), (1.0, 1)]


def test_staged_policy_round_trips_through_toml(tmp_path: Path) -> None:
    doc = {
        "rollout": {
            "policy": "staged",
            "phases": "0.25, 1.0",
            "min_devices": "1, 0",
            "max_accuracy_drop": 0.02,
            "soak_s": 1,
            "phase_timeout_s": 30,
            "silent_devices": "failure",
            "on_failure": "halt",
        }
    }
    s = cloud_config.from_dict(doc)
    assert phases_of(s.rollout) == [(0.25, 1), (1.0, 0)]
    assert s.rollout.soak_s == 1.0 and s.rollout.on_failure == "halt"
    conf = tmp_path / "cloud.toml"
    conf.write_text(cloud_config.to_toml(s))
    again = cloud_config.load(conf)
    assert again.rollout == s.rollout


def test_environment_overrides_phases_as_a_comma_list() -> None:
    s = cloud_config.from_dict(
        {}, env={"EDGEFL_ROLLOUT_PHASES": "0.5, 1", "EDGEFL_ROLLOUT_MIN_DEVICES": "2,1"}
    )
    assert phases_of(s.rollout) == [(0.5, 2), (1.0, 1)]


def test_every_rollout_problem_is_reported_at_once() -> None:
    with pytest.raises(cloud_config.ConfigError) as info:
        cloud_config.from_dict(
            {
                "rollout": {
                    "policy": "gradual",
                    "phases": "0.5, 0.2, 1.0",
                    "min_devices": "1",
                    "max_accuracy_drop": -0.1,
                    "max_install_failures": -1,
                    "soak_s": 50,
                    "phase_timeout_s": 10,
                    "silent_devices": "maybe",
                    "on_failure": "panic",
                }
            }
        )
    text = str(info.value)
    for needle in (
        "rollout.policy 'gradual'",
        "strictly ascending",
        "one count per phase",
        "max_accuracy_drop",
        "max_install_failures",
        "soak_s must not exceed",
        "silent_devices",
        "on_failure",
    ):
        assert needle in text, needle


@pytest.mark.parametrize(
    ("phases", "needle"),
    [("", "at least one phase"), ("0.5", "end with 1.0"), ("0, 1", "fractions in (0, 1]")],
)
def test_bad_phase_lists_are_refused(phases: str, needle: str) -> None:
    with pytest.raises(
        cloud_config.ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")
    ):
        count = len([p for p in phases.split(",") if p.strip()])
        cloud_config.from_dict(
            {"rollout": {"phases": phases, "min_devices": ", ".join(["1"] * count)}}
        )


def test_a_non_number_in_phases_is_a_clear_error() -> None:
    with pytest.raises(cloud_config.ConfigError, match=r"rollout.phases: 'half' is not a number"):
        cloud_config.from_dict({"rollout": {"phases": "half, 1.0"}})
    with pytest.raises(cloud_config.ConfigError, match=r"\[rollout\] phases: must be str"):
        cloud_config.from_dict({"rollout": {"phases": [0.5, 1.0]}})


def test_cohort_position_is_the_documented_hash() -> None:
    digest = hashlib.sha256(b"demo/dev-001").digest()
    expected = (int.from_bytes(digest[:8], "big") * 1_000_000) >> 64
    assert cohort.position("demo", "dev-001") == expected
    assert cohort.position("demo", "dev-001") == cohort.position("demo", "dev-001")
    assert cohort.position("other", "dev-001") != cohort.position("demo", "dev-001")


def test_cohort_positions_are_roughly_uniform() -> None:
    devices = [f"d{i}" for i in range(2000)]
    below = cohort.members("f", devices, 100_000)
    assert 140 < len(below) < 260  # ~10 % of 2000


def test_bound_takes_the_fraction_of_devices_in_cohort_order() -> None:
    devices = [f"dev-{i}" for i in range(5)]
    ordered = sorted(devices, key=lambda d: cohort.position("e2e", d))
    # 10 % of 5 devices rounds up to one device; the minimum of 2 pulls in a second one.
    one = cohort.bound_for("e2e", devices, 0.1, 0)
    assert cohort.members("e2e", devices, one) == [ordered[0]]
    assert one == cohort.position("e2e", ordered[0]) + 1
    bound = cohort.bound_for("e2e", devices, 0.1, 2)
    assert cohort.members("e2e", devices, bound) == sorted(ordered[:2])
    assert cohort.members("e2e", devices, cohort.bound_for("e2e", devices, 0.5, 1)) == sorted(
        ordered[:3]
    )
    assert cohort.bound_for("e2e", devices, 1.0, 1) == cohort.SCALE
    assert cohort.members("e2e", devices, cohort.SCALE) == sorted(devices)
    # Phases are cumulative: a device in a lower bound's cohort is in every higher one.
    assert set(cohort.members("e2e", devices, bound)) <= set(
        cohort.members("e2e", devices, cohort.bound_for("e2e", devices, 0.5, 3))
    )


def _policy(**changes: object) -> cloud_config.RolloutSection:
    return dataclasses.replace(cloud_config.RolloutSection(policy="staged"), **changes)  # type: ignore[arg-type]


def test_gate_weights_the_drop_by_check_samples() -> None:
    reports = {
        "a": CheckReport("a", candidate_accuracy=0.90, served_accuracy=0.92, examples=100),
        "b": CheckReport("b", candidate_accuracy=0.80, served_accuracy=0.90, examples=300),
    }
    result = evaluate_gate(_policy(max_accuracy_drop=0.05), reports, set(), {"a", "b"})
    # served (0.92*100 + 0.90*300)/400 = 0.905; candidate (90 + 240)/400 = 0.825
    assert math.isclose(result.served_accuracy, 0.905)
    assert math.isclose(result.candidate_accuracy, 0.825)
    assert math.isclose(result.accuracy_drop, 0.08)
    assert not result.passed and "drops by 0.0800" in result.reason
    assert evaluate_gate(_policy(max_accuracy_drop=0.1), reports, set(), {"a", "b"}).passed


def test_gate_counts_failures_and_silent_devices_as_the_policy_says() -> None:
    reports = {"a": CheckReport("a", 0.9, 0.9, 50)}
    cohort_ids = {"a", "b", "c"}
    ignore = evaluate_gate(_policy(silent_devices="ignore"), reports, set(), cohort_ids)
    assert ignore.passed and ignore.silent == 2 and ignore.failures == 0
    counted = evaluate_gate(
        _policy(silent_devices="failure", max_install_failures=1), reports, set(), cohort_ids
    )
    assert not counted.passed and counted.failures == 2
    failed = evaluate_gate(_policy(max_install_failures=0), reports, {"b"}, cohort_ids)
    assert not failed.passed and failed.failures == 1 and failed.silent == 1


def test_figures_so_far_of_an_open_phase() -> None:
    reports = {
        "a": CheckReport("a", candidate_accuracy=0.90, served_accuracy=0.92, examples=100),
        "b": CheckReport("b", candidate_accuracy=0.80, served_accuracy=0.90, examples=300),
    }
    so_far = figures_so_far(reports, {"c"}, {"a", "b", "c", "d", "e"})
    assert (so_far["checked"], so_far["failures"], so_far["pending"]) == (2.0, 1.0, 2.0)
    assert math.isclose(so_far["served_accuracy"], 0.905)
    assert math.isclose(so_far["candidate_accuracy"], 0.825)
    assert math.isclose(so_far["accuracy_drop"], 0.08)
    nothing = figures_so_far({}, set(), {"a"})
    assert nothing["pending"] == 1.0 and math.isnan(nothing["accuracy_drop"])


def test_gate_without_any_check_fails() -> None:
    result = evaluate_gate(_policy(), {}, set(), {"a"})
    assert not result.passed and result.checked == 0 and "no device" in result.reason


def test_check_reports_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError):
        CheckReport.from_metrics(
            "a", {"candidate_accuracy": 1.5, "served_accuracy": 0.9, "examples": 3}
        )
    with pytest.raises(KeyError):
        CheckReport.from_metrics("a", {"served_accuracy": 0.9, "examples": 3})
