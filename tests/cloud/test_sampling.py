"""Which SuperNodes a round samples: a restarted device's old node never (#20.5)."""

from __future__ import annotations

from cloud.sampling import DeviceNodes


def _named(*pairs: tuple[int, str]) -> DeviceNodes:
    nodes = DeviceNodes()
    for node, device in pairs:
        nodes.learn(node, device)
    return nodes


def test_a_restarted_devices_old_node_is_dropped_for_its_new_one() -> None:
    # dev-a answered as node 11 in round 1, restarted, and answered as node 42 now;
    # node 11 is still listed (the SuperLink has not missed its heartbeats yet).
    nodes = _named((11, "dev-a"), (12, "dev-b"), (42, "dev-a"))
    assert nodes.current([11, 12, 42], silent=set()) == [12, 42]
    # Whatever order the SuperLink lists them in.
    assert nodes.current([42, 12, 11], silent=set()) == [12, 42]
    assert nodes.superseded(11) and not nodes.superseded(42) and not nodes.superseded(12)


def test_a_device_named_again_by_its_old_node_does_not_tie_with_its_new_one() -> None:
    # What the device-kill e2e run showed: nodes named again after their train replies
    # got stamps a new node could equal (a count of named nodes, not a clock), and the
    # old node of dev-2 (13) won the tie against its new one (99).
    nodes = _named((12, "dev-1"), (13, "dev-2"))  # identify, round 1
    nodes.learn(13, "dev-2")  # train replies, round 1
    nodes.learn(12, "dev-1")
    nodes.learn(13, "dev-2")  # train reply, round 2 (dev-1's node 12 died meanwhile)
    nodes.learn(99, "dev-2")  # dev-2 restarted: its new node answers the identify query
    nodes.learn(50, "dev-1")
    assert nodes.current([12, 13, 50, 99], silent=set()) == [50, 99]


def test_a_node_that_did_not_say_who_it_is_sits_the_round_out() -> None:
    # Node 7 is listed but did not answer the identify query (dead, or not up yet).
    nodes = _named((12, "dev-b"))
    assert nodes.to_ask([7, 12]) == [7]
    assert nodes.current([7, 12], silent={7}) == [12]


def test_a_sampled_node_that_never_answered_must_answer_again_before_it_is_sampled() -> None:
    nodes = _named((1, "a"), (2, "b"), (3, "c"))
    # Round: 1 trained, 2's own error reply came back, 3 did not answer (killed).
    nodes.round_done(sampled=[1, 2, 3], alive=[1, 2])
    assert nodes.to_ask([1, 2, 3]) == [3]
    assert nodes.suspect(3) and not nodes.suspect(2) and not nodes.suspect(1)
    assert nodes.current([1, 2, 3], silent={3}) == [1, 2]
    # Still in doubt the round after, until it answers.
    assert nodes.current([1, 2, 3], silent=set()) == [1, 2]
    nodes.learn(3, "c")
    assert nodes.to_ask([1, 2, 3]) == []
    assert nodes.current([1, 2, 3], silent=set()) == [1, 2, 3]


def test_nodes_no_longer_listed_are_forgotten() -> None:
    nodes = _named((1, "a"), (2, "b"))
    nodes.round_done(sampled=[2], alive=[])
    assert nodes.current([1], silent=set()) == [1]
    assert nodes.name(2) == "node-2"
    # Listed again (e.g. a SuperLink that restarted with its state): asked again.
    assert nodes.to_ask([1, 2]) == [2]


def test_distinct_devices_are_all_kept() -> None:
    nodes = _named((1, "a"), (2, "b"), (3, "c"))
    assert nodes.current([3, 1, 2], silent=set()) == [1, 2, 3]
