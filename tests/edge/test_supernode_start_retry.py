"""A SuperNode that aborts while starting is started again (real SuperLink and SuperNode).

Flower 1.42's ``flower-supernode`` has been seen to abort at start-up ("epoll_wait
error: Bad file descriptor", exit -6) where a rerun started normally. Before, the
device's ``edge up`` then failed to start at all. Here the first start runs a process
that aborts the same way (SIGABRT before it listens); the supervisor must start the
real SuperNode next and see it connect. The device supervisor (``edge up``) and the device
benchmark's old-design node both start their SuperNode this way.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from edge.errors import EdgeError
from edge.flower_node import START_ATTEMPTS, SuperNode
from tests.fixtures.flower import wait_for_nodes

ABORT = [sys.executable, "-c", "import os; os.abort()"]


@dataclasses.dataclass
class AbortingSuperNode(SuperNode):
    """A real SuperNode whose first ``aborts`` starts run a process that aborts instead."""

    aborts: int = 1
    starts: int = 0

    def argv(self) -> list[str]:
        self.starts += 1
        return ABORT if self.starts <= self.aborts else super().argv()


def test_an_aborted_start_is_retried_and_the_node_connects(superlink, tmp_path: Path) -> None:
    node = AbortingSuperNode(superlink=superlink.address, data_dir=tmp_path / "node")
    try:
        node.start_with_retries(fixed_port=False)
        assert node.starts == 2
        assert wait_for_nodes(superlink, 1)
        assert node.process is not None and node.process.returncode() is None
    finally:
        node.stop()


def test_a_node_that_keeps_aborting_is_an_error_after_the_last_try(
    superlink, tmp_path: Path
) -> None:
    node = AbortingSuperNode(
        superlink=superlink.address, data_dir=tmp_path / "node", aborts=START_ATTEMPTS
    )
    try:
        with pytest.raises(EdgeError, match="exited with code -6"):
            node.start_with_retries(fixed_port=True)
        assert node.starts == START_ATTEMPTS
    finally:
        node.stop()
