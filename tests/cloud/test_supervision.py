"""The watchdog restarts a dead part with backoff and gives up only on repeated failure.

The parts are real processes (``sleep``) killed with SIGKILL, as a crash would.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from cloud.supervision import RestartPolicy, SupervisedPart, Watchdog
from edge.process import ManagedProcess

WAIT_S = 60.0


class SleepPart:
    """A supervised ``sleep 600``; ``fail_restarts`` makes the next restarts fail."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.process = self._spawn()
        self.pids = [self.process.pid]
        self.fail_restarts = 0

    def _spawn(self) -> ManagedProcess:
        return ManagedProcess("sleeper", ["sleep", "600"], log_path=self.tmp_path / "s.log").start()

    def restart(self) -> None:
        if self.fail_restarts:
            self.fail_restarts -= 1
            raise RuntimeError("cannot start")
        self.process.stop()
        self.process = self._spawn()
        self.pids.append(self.process.pid)

    def part(self) -> SupervisedPart:
        return SupervisedPart(
            "sleeper",
            alive=lambda: self.process.alive(),
            restart=self.restart,
            describe_exit=lambda: f"exit code {self.process.returncode()}",
        )


def _wait(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(what)


def test_a_killed_part_is_restarted_and_every_step_is_reported(tmp_path: Path) -> None:
    events: list[tuple[str, str, str]] = []
    sleeper = SleepPart(tmp_path)
    dog = Watchdog(
        policy=RestartPolicy(backoff_initial_s=0.05, max_restarts=3, window_s=60),
        on_event=lambda *e: events.append(e),
        check_interval_s=0.05,
    )
    part = dog.add(sleeper.part())
    resubmitted = threading.Event()
    part.after_restart.append(resubmitted.set)
    dog.start()
    try:
        sleeper.fail_restarts = 1  # the first attempt fails, the second works
        sleeper.process.kill()
        _wait(lambda: len(sleeper.pids) == 2 and sleeper.process.alive(), "no restart")
        assert resubmitted.wait(WAIT_S)
        kinds = [kind for _, kind, _ in events]
        assert kinds == ["died", "restart-failed", "died", "restarted"]
        assert events[0][2] == "exit code -9"
        assert not dog.failed.is_set()
    finally:
        dog.stop()
        sleeper.process.stop()


def test_repeated_failure_within_the_window_gives_up_with_a_reason(tmp_path: Path) -> None:
    events: list[tuple[str, str, str]] = []
    sleeper = SleepPart(tmp_path)
    dog = Watchdog(
        policy=RestartPolicy(backoff_initial_s=0.01, max_restarts=2, window_s=600),
        on_event=lambda *e: events.append(e),
        check_interval_s=0.02,
    )
    dog.add(sleeper.part())
    dog.start()
    try:
        for restarts in (1, 2):
            sleeper.process.kill()
            _wait(lambda n=restarts: len(sleeper.pids) == n + 1, "no restart")  # type: ignore[misc]
            _wait(lambda: sleeper.process.alive(), "restart not alive")
        sleeper.process.kill()
        assert dog.failed.wait(WAIT_S)
        assert "sleeper died 3 times within 600s; giving up" in dog.failure
        assert events[-1][1] == "gave-up"
        assert len(sleeper.pids) == 3, "no restart after giving up"
    finally:
        dog.stop()
        sleeper.process.stop()


def test_backoff_doubles_up_to_the_limit() -> None:
    policy = RestartPolicy(backoff_initial_s=0.5, backoff_max_s=3.0)
    assert [policy.backoff(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
