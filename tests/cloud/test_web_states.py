# ruff: noqa: F811 - the fixtures of test_web_browser are imported by name
"""What the operator page says about the fleet, checked in a real headless Chromium.

Loading is not shown as an empty fleet; device states are the ones devices report
(the guide's SERVING / TRAINING / UPDATING / DEGRADED / OFFLINE); counts print as
integers; the models table shows run and round; the rollout card follows the fleet
target, the pinned version while pinned; nothing is cut off at 1400 px. Screenshots
go to ``test-artifacts/``.
"""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import Page, Route, expect

from cloud.registry import Registry
from protos.codec import DeviceStatus
from tests.cloud.test_web_browser import (  # noqa: F401 - fixtures used by name
    ARTIFACTS,
    UPDATE_WAIT_MS,
    actions,
    browser,
    page,
    server,
)

pytestmark = pytest.mark.browser

STATES = ["SERVING", "TRAINING", "UPDATING", "DEGRADED", "OFFLINE"]


def _status(device: str, version: int, state: str = "SERVING", **extra: object) -> DeviceStatus:
    fields: dict[str, object] = dict(
        device_id=device,
        fleet="demo",
        serving_version=version,
        state=state,
        timestamp_ms=int(time.time() * 1000),
        sample_count=178,
        cpu_percent=4.0,
        rss_bytes=60_000_000,
        disk_free_bytes=5_000_000_000,
        profile="rpi4",
    )
    fields.update(extra)
    return DeviceStatus(**fields)  # type: ignore[arg-type]


def _version(reg: Registry, run: int, rnd: int) -> int:
    return reg.add_version(
        package=f"run {run} round {rnd}".encode(),
        architecture_id="mlp",
        round=rnd,
        run_id=run,
        parent_version=None,
        metrics={"eval-accuracy": 0.5 + rnd / 10},
    ).version


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 5_000


def test_loading_is_not_shown_as_an_empty_fleet(page: Page, server, registry: Registry) -> None:
    held: list[Route] = []
    released = False

    def hold(route: Route) -> None:
        if released:
            route.continue_()
        else:
            held.append(route)

    page.route("**/api/**", hold)
    page.goto(server.url)
    expect(page.locator("#round-counter")).to_have_text("Loading…")
    expect(page.locator("#devices-table tbody")).to_have_text("Loading…")
    expect(page.locator("#models-table tbody")).to_have_text("Loading…")
    expect(page.locator("body")).to_have_attribute("data-loading", "")
    _shot(page, "ui-loading.png")

    released = True
    for route in held:
        route.continue_()
    expect(page.locator("#round-counter")).to_have_text("No run yet", timeout=UPDATE_WAIT_MS)
    expect(page.locator("#devices-table tbody")).to_have_text(
        "No device has reported yet.", timeout=UPDATE_WAIT_MS
    )
    expect(page.locator("body")).not_to_have_attribute("data-loading", "")
    _shot(page, "ui-empty.png")


def test_device_states_are_the_reported_ones_and_counts_are_integers(
    page: Page,
    server,
    registry: Registry,
) -> None:
    for i, state in enumerate(STATES):
        registry.upsert_device_status(
            _status(
                f"dev-{i}",
                1,
                state,
                last_metrics={"examples": 178.0, "steps": 30.0, "loss": 0.25},
                last_error="disk full" if state == "DEGRADED" else "",
            )
        )
    page.goto(server.url)
    rows = page.locator("#devices-table tbody tr")
    expect(rows).to_have_count(len(STATES), timeout=UPDATE_WAIT_MS)
    api = {d["device_id"]: d["state"] for d in page.request.get(server.url + "/api/devices").json()}
    for i, state in enumerate(STATES):
        row = page.locator(f'#devices-table tr[data-device="dev-{i}"]')
        expect(row.locator("td .badge")).to_have_text(state)
        assert api[f"dev-{i}"] == state
    metrics = page.locator('#devices-table tr[data-device="dev-0"] td').nth(4)
    expect(metrics).to_have_text("examples 178 · loss 0.250 · steps 30")
    _shot(page, "ui-device-states.png")

    # A state change reported by a device shows up live.
    registry.upsert_device_status(_status("dev-0", 1, "TRAINING"))
    expect(page.locator('#devices-table tr[data-device="dev-0"] td .badge')).to_have_text(
        "TRAINING", timeout=UPDATE_WAIT_MS
    )


def test_models_show_run_and_round_and_the_rollout_card_follows_a_pin(
    page: Page,
    server,
    registry: Registry,
) -> None:
    run1 = registry.start_run(num_rounds=10, strategy="fedavg", config={})
    versions = [_version(registry, run1, rnd) for rnd in (9, 10)]
    registry.finish_run(run1, "completed")
    run2 = registry.start_run(num_rounds=10, strategy="fedavg", config={})
    versions.append(_version(registry, run2, 1))
    registry.set_current(versions[-1], pinned=False)
    for i in range(3):
        registry.upsert_device_status(_status(f"dev-{i}", versions[-1]))
    page.goto(server.url)
    newest = page.locator(f'#models-table tr[data-version="{versions[-1]}"] td')
    expect(newest.nth(0)).to_have_text(str(run2), timeout=UPDATE_WAIT_MS)
    expect(newest.nth(1)).to_have_text("1")
    older = page.locator(f'#models-table tr[data-version="{versions[1]}"] td')
    expect(older.nth(0)).to_have_text(str(run1))
    expect(older.nth(1)).to_have_text("10")
    expect(page.locator("#newest-version")).to_have_text(f"v{versions[-1]}")

    # Pinned to the first version, which no device serves yet: the card headlines the
    # target with its (empty) bar, then fills as devices install it.
    pinned = versions[0]
    registry.set_current(pinned, pinned=True)
    expect(page.locator("#newest-version")).to_have_text(f"v{pinned}", timeout=UPDATE_WAIT_MS)
    expect(page.locator("#serving-info")).to_have_text(
        f"pinned fleet target · newest v{versions[-1]}"
    )
    expect(page.locator("#spread-text")).to_contain_text(
        f"0 of 3 online devices serve v{pinned}", timeout=UPDATE_WAIT_MS
    )
    for i in range(3):
        registry.upsert_device_status(_status(f"dev-{i}", pinned))
    expect(page.locator("#spread-text")).to_contain_text(
        f"3 of 3 online devices serve v{pinned}", timeout=UPDATE_WAIT_MS
    )
    expect(page.locator("#spread-progress")).to_have_attribute("aria-valuenow", "100")
    _shot(page, "ui-pinned-rollout.png")


def test_the_per_device_column_fits_a_1400px_window(
    page: Page,
    server,
    registry: Registry,
) -> None:
    run = registry.start_run(num_rounds=2, strategy="fedavg", config={})
    devices = [f"raspberry-pi-5-greenhouse-{i}" for i in range(4)]
    registry.round_started(run, 1, sampled=devices)
    for device in devices:
        registry.round_reply(
            run,
            1,
            device,
            ok=True,
            num_examples=178,
            metrics={"train-loss": 0.41, "train-accuracy": 0.88, "examples": 178, "steps": 30},
        )
    registry.round_finished(
        run, 1, aggregated_metrics={"train-loss": 0.4}, version=None, dropped=[]
    )
    page.goto(server.url)
    expect(page.locator("#rounds-table .device-metrics li")).to_have_count(
        4, timeout=UPDATE_WAIT_MS
    )
    overflow = page.evaluate(
        "(() => { const w = document.querySelector('#rounds-table').closest('.table-wrap');"
        " return w.scrollWidth - w.clientWidth; })()"
    )
    assert overflow <= 1, f"the rounds table is {overflow}px wider than the window"
    _shot(page, "ui-rounds-1400px.png")
