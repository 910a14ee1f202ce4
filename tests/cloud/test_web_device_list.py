"""The device list with 10,000 devices in the registry, in a real headless Chromium.

Issue 18: the page must stay usable at fleet scale: it shows one page of devices, pages
through them and filters by id and state on the server, never loading the whole fleet.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from cloud.registry import Registry, sqlite_url
from cloud.web import WebServer, create_app
from protos.codec import DeviceStatus
from tests.cloud.test_web_browser import CHROMIUM, CHROMIUM_ARGS, UPDATE_WAIT_MS

pytestmark = pytest.mark.browser

PI = 9_990
JETSONS = 10
#: The page writes ranges with an en dash between the numbers.
DASH = "\u2013"
#: pi-00000, pi-00007, ... are offline.
OFFLINE = len(range(0, PI, 7))


def _status(device: str, state: str) -> DeviceStatus:
    return DeviceStatus(
        device_id=device,
        fleet="big",
        serving_version=3,
        state=state,
        timestamp_ms=int(time.time() * 1000),
        sample_count=300,
        profile=device.split("-")[0],
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    registry = Registry(sqlite_url(tmp_path_factory.mktemp("big") / "registry.db"))
    statuses = [_status(f"pi-{i:05d}", "OFFLINE" if i % 7 == 0 else "SERVING") for i in range(PI)]
    statuses += [_status(f"jetson-{i:02d}", "SERVING") for i in range(JETSONS)]
    for start in range(0, len(statuses), 1000):
        registry.upsert_device_statuses(statuses[start : start + 1000])
    assert registry.count_devices() == 10_000
    web = WebServer(create_app(registry, operator_token=None, fleet="big"))
    web.start()
    try:
        yield web
    finally:
        web.stop()
        registry.close()


@pytest.fixture
def page(server: WebServer) -> Iterator[Page]:
    with sync_playwright() as pw:
        browser: Browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        tab = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            yield tab
        finally:
            browser.close()
        assert errors == [], errors


def _ids(page: Page) -> list[str]:
    return page.locator("#devices-table tbody th[scope=row]").all_inner_texts()


def test_ten_thousand_devices_are_paged_and_filtered_on_the_server(
    page: Page, server: WebServer
) -> None:
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "/api/devices" in r.url else None)
    page.goto(server.url)
    rng = page.locator("#devices-range")
    expect(rng).to_have_text(f"1{DASH}50 of 10,000", timeout=UPDATE_WAIT_MS)
    assert len(_ids(page)) == 50
    # By id: the ten jetsons sort first, then pi-00000 onwards.
    assert _ids(page)[:11] == [f"jetson-{i:02d}" for i in range(10)] + ["pi-00000"]
    expect(page.locator("#devices-prev")).to_be_disabled()
    expect(page.locator("#spread-text")).to_have_text(f"{10_000 - OFFLINE} of 10000 devices online")

    page.locator("#devices-next").click()
    expect(rng).to_have_text(f"51{DASH}100 of 10,000", timeout=UPDATE_WAIT_MS)
    assert _ids(page)[0] == "pi-00040"
    page.locator("#devices-prev").click()
    expect(rng).to_have_text(f"1{DASH}50 of 10,000", timeout=UPDATE_WAIT_MS)

    page.locator("#device-search").fill("jetson")
    expect(rng).to_have_text(f"1{DASH}10 of 10", timeout=UPDATE_WAIT_MS)
    assert _ids(page) == [f"jetson-{i:02d}" for i in range(10)]
    expect(page.locator("#devices-next")).to_be_disabled()

    page.locator("#device-search").fill("")
    page.locator("#device-state").select_option("OFFLINE")
    expect(rng).to_have_text(f"1{DASH}50 of {OFFLINE:,}", timeout=UPDATE_WAIT_MS)
    badges = page.locator("#devices-table tbody .badge").all_inner_texts()
    assert [b.lower() for b in badges] == ["offline"] * 50
    assert _ids(page)[:3] == ["pi-00000", "pi-00007", "pi-00014"]

    page.locator("#device-search").fill("jetson")
    expect(rng).to_have_text("no match", timeout=UPDATE_WAIT_MS)
    expect(page.locator("#devices-table tbody")).to_contain_text("No device matches the filter.")

    # Every request asked the server for one page, never the whole fleet.
    assert requests and all("limit=50" in url for url in requests), requests
