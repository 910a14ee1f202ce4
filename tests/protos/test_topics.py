"""Topic construction, validation and parsing."""

from __future__ import annotations

import pytest

from protos import topics


def test_topics_are_built_and_parsed_back() -> None:
    assert topics.release_manifest("f1") == "edgefl/f1/release/manifest"
    assert topics.parse(topics.release_chunk("f1", 7, 3)) == topics.ParsedTopic(
        "chunk", "f1", version=7, index=3
    )
    assert topics.parse(topics.device_status("f1", "dev-9")) == topics.ParsedTopic(
        "status", "f1", device="dev-9"
    )
    assert topics.parse(topics.device_event("f1", "dev-9")).kind == "event"
    assert topics.release_chunks_filter("f1", 7) == "edgefl/f1/release/7/chunk/+"


@pytest.mark.parametrize("name", ["", "a/b", "+", "#", "a+b", "x" * 65, "..", "dév"])
def test_names_that_could_escape_a_topic_are_refused(name: str) -> None:
    with pytest.raises(topics.TopicError):
        topics.device_status("fleet", name)


@pytest.mark.parametrize(
    "topic",
    [
        "other/f/release/manifest",
        "edgefl/f/release/0/chunk/1",
        "edgefl/f/release/x/chunk/1",
        "edgefl/f/device/d/other",
        "edgefl",
    ],
)
def test_unknown_topics_are_refused(topic: str) -> None:
    with pytest.raises(topics.TopicError):
        topics.parse(topic)


def test_acl_lines_restrict_devices_to_their_own_topics() -> None:
    lines = topics.acl_device_pattern_lines("f1")
    assert "pattern write edgefl/f1/device/%u/status" in lines
    assert all("release" not in line or line.startswith("pattern read") for line in lines)
