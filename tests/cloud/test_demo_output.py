"""The demo and `cloud up` report their own run's rounds, not the previous run's (#17.3)."""

from __future__ import annotations

from pathlib import Path

from cloud.commands import progress_line
from cloud.demo import RoundPrinter
from cloud.registry import Registry, sqlite_url


def _finished_round(reg: Registry, run: int, rnd: int) -> None:
    reg.round_started(run, rnd, sampled=["d1"])
    reg.round_reply(run, rnd, "d1", ok=True, num_examples=10, metrics={})
    reg.round_finished(run, rnd, aggregated_metrics={}, version=None, dropped=[])


def test_a_second_run_prints_only_its_own_rounds(tmp_path: Path) -> None:
    reg = Registry(sqlite_url(tmp_path / "r.db"))
    try:
        old = reg.start_run(num_rounds=10, strategy="fedavg", config={})
        for rnd in range(1, 11):
            _finished_round(reg, old, rnd)
        reg.finish_run(old, "completed")

        before = reg.latest_run()
        printer = RoundPrinter(reg, before, 3)
        # Submitted, not yet registered by the aggregator: nothing from the old run.
        assert printer.lines() == []
        assert progress_line(reg, 3, before=before) == "waiting for the run to start"

        new = reg.start_run(num_rounds=3, strategy="fedavg", config={})
        _finished_round(reg, new, 1)
        lines = printer.lines()
        assert len(lines) == 1 and "round  1/3" in lines[0]
        assert printer.lines() == []  # each round once
        assert progress_line(reg, 3, before=before).startswith(f"run {new} running")
    finally:
        reg.close()


def test_a_resumed_run_is_the_same_run(tmp_path: Path) -> None:
    reg = Registry(sqlite_url(tmp_path / "r.db"))
    try:
        run = reg.start_run(num_rounds=3, strategy="fedavg", config={})
        _finished_round(reg, run, 1)
        before = reg.latest_run()  # still running: the next submission resumes it
        assert [line.split(":")[0] for line in RoundPrinter(reg, before, 3).lines()] == [
            "    round  1/3"
        ]
    finally:
        reg.close()
