"""Which SuperNodes a round may sample: each device's current node, never a stale one (#20.5).

Flower knows SuperNodes by node id, and a device gets a new one every time its
SuperNode starts (``edge up`` restarting a killed SuperNode, or the whole device
restarted). A SIGKILLed SuperNode cannot unregister, so the SuperLink keeps listing its
old id as online until it missed two heartbeats (up to a minute); a message sent to it
is never answered and the round waits for its whole timeout.

:class:`DeviceNodes` is the aggregator's picture of which node is which device:

* a node is *named* when it answers a message with its ``device`` record (the identify
  query, or a train reply); of several nodes naming the same device, only the one
  that named itself last is the device's current node;
* a node sampled in a round that did not answer (timeout, or the SuperLink's "node
  unavailable" error) is *suspect*: it must answer the next identify query before it
  is sampled again, so a dead node sits out instead of stalling another round;
* a node that was asked who it is and did not answer (*silent*) sits the round out.

Pure bookkeeping: the Flower side (asking, collecting replies) is in
:mod:`cloud.aggregator`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable


class DeviceNodes:
    """Which device each SuperNode is, which is each device's newest, which are in doubt."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        #: When each node last said which device it is (a strictly increasing stamp).
        self._named_at: dict[int, int] = {}
        self._clock = itertools.count(1)
        self._suspect: set[int] = set()

    def name(self, node: int) -> str:
        """The device ``node`` said it is, or ``node-<id>`` if it never did."""
        return self.names.get(node, f"node-{node}")

    def learn(self, node: int, device: str) -> None:
        """``node`` just said it is ``device``: it is that device's newest node, and alive."""
        self.names[node] = device
        self._named_at[node] = next(self._clock)
        self._suspect.discard(node)

    def to_ask(self, node_ids: Iterable[int]) -> list[int]:
        """The nodes to ask who they are before a round: never named, or suspect."""
        return sorted(n for n in set(node_ids) if n not in self.names or n in self._suspect)

    def suspect(self, node: int) -> bool:
        """Whether ``node`` was sampled and gave no sign of life since."""
        return node in self._suspect

    def superseded(self, node: int) -> bool:
        """Whether another node named ``node``'s device after ``node`` did."""
        device = self.names.get(node)
        if device is None:
            return False
        stamp = self._named_at.get(node, 0)
        return any(
            other != node and name == device and self._named_at.get(other, 0) > stamp
            for other, name in self.names.items()
        )

    def current(self, node_ids: Iterable[int], silent: set[int]) -> list[int]:
        """The nodes worth sampling among ``node_ids``: each device's newest that answered.

        A node in ``silent`` (asked, no answer) or still suspect sits the round out; of
        several nodes naming the same device only the one that named itself last stays.
        Nodes no longer listed are forgotten.
        """
        listed = set(node_ids)
        for gone in set(self.names) - listed:
            self.names.pop(gone, None)
            self._named_at.pop(gone, None)
        self._suspect &= listed
        newest: dict[str, int] = {}
        for node in sorted(listed):
            if node in silent or node in self._suspect:
                continue
            name = self.name(node)
            other = newest.get(name)
            if other is None or self._named_at.get(node, 0) > self._named_at.get(other, 0):
                newest[name] = node
        return sorted(newest.values())

    def round_done(self, sampled: Iterable[int], alive: Iterable[int]) -> None:
        """After a round: sampled nodes that gave no sign of life become suspect.

        ``alive`` holds the nodes whose own reply arrived (a result or the device's error
        reply), not the SuperLink's "node unavailable" on their behalf.
        """
        self._suspect |= set(sampled) - set(alive)
