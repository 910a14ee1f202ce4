"""The one wrapper of Flower's JSON CLI, against a real SuperLink: documents or FlowerError."""

from __future__ import annotations

import pytest

from edge.flower_node import FlowerError, SuperLink


def test_a_listing_is_the_document_flower_printed(superlink: SuperLink) -> None:
    doc = superlink.flwr_json("list", "edgefl")
    assert doc["success"] is True and doc["runs"] == []
    assert superlink.nodes() == []


def test_failures_are_flower_errors_with_flowers_reason(superlink: SuperLink) -> None:
    # Flower answers in JSON with success false: its error message is kept.
    with pytest.raises(FlowerError, match=r"flwr supernode unregister failed: .+"):
        superlink.unregister_supernode("4242")
    # No JSON at all (an unknown command): stdout and stderr are kept.
    with pytest.raises(FlowerError, match=r"flwr no-such-command: .*"):
        superlink.flwr_json("no-such-command")
    with pytest.raises(FlowerError, match="no answer within 0 s"):
        superlink.flwr_json("list", "edgefl", timeout=0.01)


def test_the_status_of_an_unknown_run_is_unknown(superlink: SuperLink) -> None:
    assert superlink.run_status("987654321") == "unknown"
