"""The operator page in a real headless Chromium during a real federated run.

Not a registry written by the test: Flower's SuperLink runs the ServerApp, emulated
devices train, and the page must follow the run live, without reloading.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from tests.cloud.test_web_browser import CHROMIUM, CHROMIUM_ARGS
from tests.e2e.conftest import fleet_spec

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def test_the_page_follows_a_live_run(cloud_settings, stack_factory, fleet_factory) -> None:
    s = cloud_settings
    s.run = dataclasses.replace(s.run, num_rounds=3, min_nodes=2, local_epochs=2)
    stack = stack_factory(s)
    fleet_factory(fleet_spec(s, stack, scheme="iid"), 2)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(stack.web.url)
            page.evaluate("window.__loadedOnce = true")
            stack.submit_run()
            counter = page.locator("#round-counter")
            for rnd in (1, 2, 3):
                expect(counter).to_contain_text(f"Round {rnd} / 3", timeout=180_000)
            stack.wait_for_run(timeout=300)
            accuracy = page.locator('svg[data-chart="accuracy"]')
            # Server-side test accuracy of versions for rounds 0..3.
            expect(accuracy.locator("circle.point")).not_to_have_count(0, timeout=30_000)
            points = accuracy.locator('g[data-series="Test (server)"] circle.point')
            expect(points).to_have_count(4, timeout=30_000)
            assert page.evaluate("window.__loadedOnce === true"), "the page reloaded"
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "ui-real-run.png"), full_page=True)
        finally:
            browser.close()

    # A write action without the operator token is refused by the real server.
    response = httpx.post(f"{stack.web.url}/api/models/1/pin", timeout=10)
    assert response.status_code == 401
