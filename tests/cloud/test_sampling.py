"""Which SuperNodes a round samples: a restarted device's old node never (#20.5)."""

from __future__ import annotations

from cloud.aggregator import newest_nodes


def test_a_restarted_devices_old_node_is_dropped_for_its_new_one() -> None:
    # dev-a answered as node 11 in round 1, restarted, and answered as node 42 now;
    # node 11 is still listed (the SuperLink has not missed its heartbeats yet).
    names = {11: "dev-a", 12: "dev-b", 42: "dev-a"}
    named_at = {11: 1, 12: 2, 42: 3}
    assert newest_nodes([11, 12, 42], names, named_at, silent=set()) == [12, 42]
    # Whatever order the SuperLink lists them in.
    assert newest_nodes([42, 12, 11], names, named_at, silent=set()) == [12, 42]


def test_a_node_that_did_not_say_who_it_is_sits_the_round_out() -> None:
    # Node 7 is listed but did not answer the identify query (dead, or not up yet).
    names = {12: "dev-b"}
    assert newest_nodes([7, 12], names, {12: 1}, silent={7}) == [12]


def test_distinct_devices_are_all_kept() -> None:
    names = {1: "a", 2: "b", 3: "c"}
    assert newest_nodes([3, 1, 2], names, {1: 1, 2: 2, 3: 3}, silent=set()) == [1, 2, 3]
