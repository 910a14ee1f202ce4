"""The operator page in a real headless Chromium against the real server.

Needs the Debian package ``chromium`` (``/usr/bin/chromium``) and Playwright's Python
API; the page must update live (EventSource), draw its charts and keep the write
actions behind the operator token, with the keyboard alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from cloud.registry import Registry
from cloud.web import WebServer, create_app
from protos import wire_keys as keys
from protos.codec import DeviceStatus

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "browser-test-token"
DEVICES = ["rpi4-kitchen", "rpi5-lab", "jetson-01"]
#: Playwright's wait limit (ms) for a live update to show up on the page.
UPDATE_WAIT_MS = 20_000


class RecordingActions:
    """WebActions that record pins (the page's effect, as the supervisor would see it)."""

    def __init__(self) -> None:
        self.pinned: list[int] = []

    def pin(self, version: int) -> str | None:
        self.pinned.append(version)
        return f"fleet pinned to v{version}"

    def start_run(self) -> str | None:
        return None

    def stop_run(self) -> str | None:
        return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def actions() -> RecordingActions:
    return RecordingActions()


@pytest.fixture
def server(registry: Registry, actions: RecordingActions) -> Iterator[WebServer]:
    app = create_app(
        registry, operator_token=TOKEN, fleet="demo", actions=actions, poll_interval=0.1
    )
    web = WebServer(app)
    web.start()
    try:
        yield web
    finally:
        web.stop()


@pytest.fixture
def page(browser: Browser, server: WebServer) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield tab
    finally:
        context.close()
    assert errors == [], errors


def _status(device: str, version: int, *, ts: int) -> DeviceStatus:
    return DeviceStatus(
        device_id=device,
        fleet="demo",
        serving_version=version,
        state="SERVING",
        timestamp_ms=int(time.time() * 1000) + ts,
        sample_count=300,
        cpu_percent=9.5,
        rss_bytes=61_000_000,
        disk_free_bytes=7_500_000_000,
        profile=device.split("-")[0],
        last_metrics={"accuracy": 0.9},
    )


def _write_round(reg: Registry, run: int, rnd: int) -> None:
    """What the ServerApp records for one round: replies, a version, metrics."""
    reg.round_started(run, rnd, sampled=DEVICES)
    for i, device in enumerate(DEVICES):
        reg.round_reply(
            run,
            rnd,
            device,
            ok=True,
            num_examples=300,
            metrics={
                keys.TRAIN_LOSS: 2.0 * 0.6**rnd + 0.05 * i,
                keys.TRAIN_ACCURACY: 1 - 0.8 * 0.55**rnd - 0.02 * i,
            },
        )
    version = reg.add_version(
        package=f"weights after round {rnd}".encode(),
        architecture_id="mlp",
        round=rnd,
        run_id=run,
        parent_version=rnd - 1 or None,
        metrics={keys.EVAL_ACCURACY: 1 - 0.85 * 0.5**rnd},
    )
    reg.round_finished(
        run, rnd, aggregated_metrics={keys.TRAIN_LOSS: 2.0 * 0.6**rnd}, version=version.version, dropped=[]
    )
    reg.record_evaluation(
        run, rnd, {keys.EVAL_ACCURACY: 1 - 0.85 * 0.5**rnd, keys.EVAL_LOSS: 1.9 * 0.6**rnd}
    )


def test_round_counter_and_charts_follow_a_live_run(
    page: Page, server: WebServer, registry: Registry, tmp_path: Path
) -> None:
    run = registry.start_run(num_rounds=4, strategy="fedavg", config={"lr": 0.05})
    registry.record_evaluation(run, 0, {keys.EVAL_ACCURACY: 0.1, keys.EVAL_LOSS: 2.3})
    page.goto(server.url)
    counter = page.locator("#round-counter")
    expect(counter).to_have_text("Round 0 / 4", timeout=UPDATE_WAIT_MS)
    page.evaluate("window.__loadedOnce = true")

    # The "ServerApp": another Registry on the same database, in another thread, writing
    # one round each time the page has shown the previous one.
    writer = Registry(registry.url)
    go = threading.Event()
    failures: list[BaseException] = []

    def server_app() -> None:
        try:
            for rnd in (1, 2, 3):
                if not go.wait(timeout=60):
                    return
                go.clear()
                _write_round(writer, run, rnd)
                for i, device in enumerate(DEVICES):
                    writer.upsert_device_status(_status(device, rnd, ts=1_000 * rnd + i))
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    thread = threading.Thread(target=server_app, daemon=True)
    thread.start()
    try:
        for rnd in (1, 2, 3):
            go.set()
            expect(counter).to_have_text(f"Round {rnd} / 4", timeout=UPDATE_WAIT_MS)
    finally:
        go.set()
        thread.join(timeout=60)
        writer.close()
    assert failures == []
    assert page.evaluate("window.__loadedOnce === true"), "the page reloaded"
    expect(counter).to_have_attribute("aria-live", "polite")

    accuracy = page.locator('svg[data-chart="accuracy"]')
    # Test accuracy of rounds 0..3 on the server line; 3 devices x 3 rounds besides.
    expect(accuracy.locator('g[data-series="Test (server)"] circle.point')).to_have_count(
        4, timeout=UPDATE_WAIT_MS
    )
    expect(accuracy.locator("g.device circle.point")).to_have_count(9)
    loss = page.locator('svg[data-chart="loss"]')
    expect(loss.locator('g[data-series="Train (aggregated)"] circle.point')).to_have_count(3)
    expect(loss.locator('g[data-series="Test (server)"] circle.point')).to_have_count(4)
    # The cards read the API's typed fields: eval_accuracy, eval_loss, train_loss of round 3.
    expect(page.locator("#metric-accuracy")).to_have_text("89.4 %")
    expect(page.locator("#metric-loss")).to_have_text(f"{1.9 * 0.6**3:.3f}")
    expect(page.locator("#metric-train-loss")).to_have_text(f"{2.0 * 0.6**3:.3f}")
    assert "round 3" in (accuracy.get_attribute("aria-label") or "")
    expect(page.locator("#rounds-table tbody tr")).to_have_count(4)  # rounds 0..3
    expect(page.locator("#models-table tbody tr")).to_have_count(3)
    expect(page.locator("#count-replied")).to_have_text("3 / 3")
    expect(page.locator("#round-progress")).to_have_attribute("aria-valuenow", "75")
    expect(page.locator("#devices-table tbody tr")).to_have_count(3)
    expect(page.locator("#spread-text")).to_contain_text("3 of 3 online devices serve v3")

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "ui-live-run.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def _two_versions(registry: Registry) -> None:
    run = registry.start_run(num_rounds=2, strategy="fedavg", config={})
    _write_round(registry, run, 1)
    _write_round(registry, run, 2)
    registry.set_current(2, pinned=False)


def test_pin_without_token_is_refused_on_the_page(
    page: Page, server: WebServer, registry: Registry, actions: RecordingActions
) -> None:
    _two_versions(registry)
    page.goto(server.url)
    rollback = page.locator("#pin-v1")
    expect(rollback).to_have_text("Roll back", timeout=UPDATE_WAIT_MS)
    rollback.click()
    message = page.locator("#action-message")
    expect(message).to_be_visible()
    expect(message).to_have_attribute("role", "alert")
    expect(message).to_contain_text("refused")
    expect(message).to_contain_text("401")
    assert actions.pinned == []

    # A wrong token is refused too.
    page.fill("#operator-token", "not-the-token")
    page.press("#operator-token", "Enter")
    rollback.click()
    expect(message).to_contain_text("token is wrong")
    assert actions.pinned == []


def test_keyboard_reaches_and_activates_the_pin_button(
    page: Page, server: WebServer, registry: Registry, actions: RecordingActions
) -> None:
    _two_versions(registry)
    page.goto(server.url)
    expect(page.locator("#pin-v2")).to_be_visible(timeout=UPDATE_WAIT_MS)
    page.get_by_label("Operator token").fill(TOKEN)
    page.keyboard.press("Enter")  # submits the token form
    expect(page.locator("#action-message")).to_contain_text("Token saved")

    focused = ""
    for _ in range(15):
        page.keyboard.press("Tab")
        focused = page.evaluate("document.activeElement.id")
        if focused.startswith("pin-v"):
            break
    assert focused == "pin-v2", f"Tab stopped at {focused!r}"
    assert page.evaluate("document.activeElement.matches(':focus-visible')")
    page.keyboard.press("Enter")
    expect(page.locator("#action-message")).to_have_text(
        "fleet pinned to v2", timeout=UPDATE_WAIT_MS
    )
    assert actions.pinned == [2]
    # The pin button is a labelled button for assistive technology too.
    expect(page.get_by_role("button", name="Pin fleet to version 2")).to_be_visible()
