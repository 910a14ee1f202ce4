"""The Rollouts panel in a real headless Chromium, against the real server and controller.

Behind the page: the real :class:`~cloud.rollout.RolloutController` (its own thread
deciding phases), a real registry, and the candidates, releases and halts really
published on a test Mosquitto. The devices' checks arrive as the cloud's fleet monitor
hands them over (recorded in the registry, then given to the controller); everything
else is what the operator sees and does in the browser:

* a staged rollout in progress shows its phase, how many devices of the phase checked
  it and the gate figures (the decided phase's and the running phase's so far), live;
* Promote and Halt are refused without the operator token (or with a wrong one) with a
  message that says why, and nothing changes;
* with the token, Promote releases the candidate fleet-wide and Halt stops the next one;
  both are registry events with their figures, shown on the page.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from playwright.sync_api import Browser, Locator, Page, expect

from cloud import config as cloud_config
from cloud.broker import Broker
from cloud.publisher import Publisher
from cloud.registry import Registry
from cloud.releases import publish_version
from cloud.rollout import EVENT_SOURCE, RolloutController
from cloud.web import WebServer, create_app
from protos import codec, cohort, signing
from tests.cloud.test_web_browser import UPDATE_WAIT_MS, browser  # noqa: F401 (fixture)

pytestmark = pytest.mark.browser

FLEET = "ui"
TOKEN = "rollout-browser-token"
DEVICES = ["gw-01", "gw-02", "gw-03", "gw-04"]


@pytest.fixture
def controller(registry: Registry, broker: Broker) -> Iterator[RolloutController]:
    """A staged controller whose phase 1 waits 1 s of soak and whose phases never time out
    during the test (a phase with silent devices stays open until the operator acts)."""
    key: Ed25519PrivateKey = signing.generate_private_key()
    s = cloud_config.CloudSettings()
    s.cloud.fleet = FLEET
    s.rollout = dataclasses.replace(
        s.rollout,
        policy="staged",
        phases="0.25, 1.0",
        min_devices="1, 0",
        soak_s=1.0,
        phase_timeout_s=600.0,
        on_failure="halt",
    )

    def publisher() -> Publisher:
        return Publisher(host=broker.host, port=broker.port, fleet=FLEET, signing_key=key)

    def promote(version: int) -> int:
        with publisher() as pub:
            return publish_version(registry, pub, version, pinned=False).sequence

    for rnd in (0, 1, 2):
        registry.add_version(
            package=bytes([rnd]) * 2048,
            architecture_id="mlp",
            round=rnd,
            run_id=None,
            parent_version=rnd or None,
            metrics={},
        )
    registry.set_current(1, pinned=False)
    for device in DEVICES:
        _telemetry(registry, device, 1)
    rollouts = RolloutController(s, registry, publisher=publisher, promote=promote).start()
    try:
        yield rollouts
    finally:
        rollouts.stop()


@pytest.fixture
def server(registry: Registry, controller: RolloutController) -> Iterator[WebServer]:
    app = create_app(
        registry, operator_token=TOKEN, fleet=FLEET, rollouts=controller, poll_interval=0.1
    )
    web = WebServer(app)
    web.start()
    try:
        yield web
    finally:
        web.stop()


@pytest.fixture
def page(browser: Browser, server: WebServer) -> Iterator[Page]:  # noqa: F811
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield tab
    finally:
        context.close()
    assert errors == [], errors


def _telemetry(registry: Registry, device: str, version: int) -> None:
    registry.upsert_device_status(
        codec.DeviceStatus(
            device,
            FLEET,
            serving_version=version,
            state="SERVING",
            timestamp_ms=int(time.time() * 1000),
        )
    )


def _check(
    registry: Registry,
    controller: RolloutController,
    device: str,
    version: int,
    phase: int,
    served: float,
    candidate: float,
    error_rates: tuple[float, float] | None = None,
) -> None:
    """A device's ``candidate_checked`` event as the fleet monitor hands it over: recorded
    in the registry first, then given to the controller (``CloudStack._start_monitor``).
    ``error_rates`` (served, candidate): the optional inference figures."""
    figures = {
        "candidate_accuracy": candidate,
        "served_accuracy": served,
        "examples": 100.0,
        "phase": float(phase),
    }
    if error_rates is not None:
        figures["served_error_rate"], figures["candidate_error_rate"] = error_rates
        figures["inference_calls"] = 100.0
    event = codec.DeviceEvent(
        device,
        int(time.time() * 1000),
        "candidate_checked",
        f"phase {phase}: candidate accuracy {candidate:.4f}",
        version,
        figures,
    )
    registry.record_event(event)
    controller.on_events([event])
    _telemetry(registry, device, 1)  # devices report their status after an event


def _cloud_events(registry: Registry, version: int) -> list[tuple[str, dict]]:
    return [
        (e.kind, json.loads(e.detail))
        for e in reversed(registry.list_events(200))
        if e.device_id == EVENT_SOURCE and e.version == version
    ]


def _row(page: Page, version: int) -> Locator:
    return page.locator(f'#rollouts-table tbody tr[data-version="{version}"]')


def _cell(row: Locator, column: int) -> Locator:
    """Columns after the version header: status, phase, checked, figures, decision, …"""
    return row.locator("td").nth(column)


def test_a_running_rollout_is_shown_live_and_promote_and_halt_need_the_token(
    page: Page, server: WebServer, registry: Registry, controller: RolloutController
) -> None:
    page.goto(server.url)
    expect(page.locator("#rollout-policy")).to_contain_text(
        "Policy: staged", timeout=UPDATE_WAIT_MS
    )
    expect(page.locator("#rollouts-table tbody")).to_contain_text("No rollout yet.")
    first = min(DEVICES, key=lambda d: cohort.position(FLEET, d))  # phase 1's one device

    # Phase 1 of version 2: its device checks the candidate; the page follows live.
    controller.submit(2)
    row = _row(page, 2)
    expect(row.locator("th")).to_have_text("v2 (from v1)", timeout=UPDATE_WAIT_MS)
    expect(_cell(row, 0)).to_have_text("running")
    expect(_cell(row, 1)).to_have_text("1 / 2")
    expect(_cell(row, 2)).to_have_text("0 / 1")
    expect(_cell(row, 4)).to_have_text("checking…")
    _check(registry, controller, first, 2, 1, served=0.8, candidate=0.9)
    # After its soak the controller passes phase 1 (the whole fleet is phase 2); the
    # figures of the decided phase stay on the page while phase 2 runs.
    expect(_cell(row, 1)).to_have_text("2 / 2", timeout=UPDATE_WAIT_MS)
    expect(_cell(row, 2)).to_have_text("0 / 4")
    # A report without inference figures (an older agent) shows none.
    expect(_cell(row, 3)).to_contain_text(
        "phase 1: accuracy 0.800 → 0.900 (drop -0.100), 0 failed"
    )
    # A device of phase 2 checks it: the running phase's figures so far.
    second = next(d for d in DEVICES if d != first)
    _check(registry, controller, second, 2, 2, served=0.7, candidate=0.75, error_rates=(0, 0.02))
    expect(_cell(row, 2)).to_have_text("1 / 4", timeout=UPDATE_WAIT_MS)
    expect(_cell(row, 3)).to_contain_text(
        "so far: accuracy 0.700 → 0.750 (drop -0.050), inference errors 0.000 → 0.020"
    )
    expect(_cell(row, 4)).to_have_text("checking…")

    # Without the token, and with a wrong one, both actions are refused and say why.
    message = page.locator("#action-message")
    page.locator("#promote-v2").click()
    expect(message).to_have_attribute("role", "alert")
    expect(message).to_have_text("Promote v2 refused: enter the operator token first. (401)")
    page.locator("#halt-v2").click()
    expect(message).to_have_text("Halt v2 refused: enter the operator token first. (401)")
    page.fill("#operator-token", "not-the-token")
    page.press("#operator-token", "Enter")
    page.locator("#promote-v2").click()
    expect(message).to_have_text("Promote v2 refused: the operator token is wrong. (401)")
    assert controller.status()["active"]["status"] == "running"
    assert registry.current().version == 1  # type: ignore[union-attr]
    assert [k for k, _ in _cloud_events(registry, 2)] == [
        "rollout started",
        "rollout phase passed",
    ]

    # With the token: Promote releases version 2 to the whole fleet.
    page.fill("#operator-token", TOKEN)
    page.press("#operator-token", "Enter")
    expect(message).to_have_text("Token saved for this tab.")
    page.get_by_role("button", name="Promote version 2 to the whole fleet").click()
    expect(message).to_contain_text("version 2 promoted (sequence ", timeout=UPDATE_WAIT_MS)
    expect(message).to_have_attribute("role", "status")
    expect(_cell(row, 0)).to_have_text("promoted", timeout=UPDATE_WAIT_MS)
    expect(row.locator("button")).to_have_count(0)
    assert registry.current().version == 2  # type: ignore[union-attr]
    kind, detail = _cloud_events(registry, 2)[-1]
    assert kind == "rollout promoted" and detail["reason"] == "promoted by the operator", detail
    passed = dict(_cloud_events(registry, 2))["rollout phase passed"]
    assert passed["phase"] == 1 and passed["cohort"] == [first], passed

    # Version 3's rollout, halted from the page while phase 1 waits for its device.
    controller.submit(3)
    row3 = _row(page, 3)
    expect(row3.locator("th")).to_have_text("v3 (from v2)", timeout=UPDATE_WAIT_MS)
    expect(_cell(row3, 2)).to_have_text("0 / 1")
    page.get_by_role("button", name="Halt the rollout of version 3").click()
    expect(message).to_have_text("rollout of version 3 halted", timeout=UPDATE_WAIT_MS)
    expect(_cell(row3, 0)).to_have_text("halted", timeout=UPDATE_WAIT_MS)
    expect(row3.locator("button")).to_have_count(0)
    kind, detail = _cloud_events(registry, 3)[-1]
    assert (kind, detail["by"]) == ("rollout halted", "operator"), detail
    assert registry.current().version == 2  # type: ignore[union-attr]
    # Both decisions are in the page's event list too (newest first).
    events = page.locator("#events-list")
    expect(events).to_contain_text("rollout halted", timeout=UPDATE_WAIT_MS)
    expect(events).to_contain_text("rollout promoted")
