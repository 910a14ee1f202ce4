"""The JSON API: every endpoint through TestClient, then the real uvicorn server (SSE)."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from cloud import config as cloud_config
from cloud.registry import Registry, sqlite_url
from cloud.supervisor import CloudActions, CloudStack, init_cloud, read_token
from cloud.web import ActionError, WebServer, create_app
from cloud.web.app import STATIC_DIR
from protos import wire_keys as keys
from protos.codec import DeviceEvent, DeviceStatus

TOKEN = "operator-secret-token"
WRITE_ENDPOINTS = ["/api/models/1/pin", "/api/runs/start", "/api/runs/stop"]


class RecordingActions:
    """A WebActions implementation that records what the UI asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None]] = []

    def pin(self, version: int) -> str | None:
        self.calls.append(("pin", version))
        return f"pinned v{version}"

    def start_run(self) -> str | None:
        self.calls.append(("start", None))
        return None

    def stop_run(self) -> str | None:
        self.calls.append(("stop", None))
        return "stopping run"


def _status(device: str, version: int, state: str = "SERVING", ts: int = 5000) -> DeviceStatus:
    return DeviceStatus(
        device_id=device,
        fleet="demo",
        serving_version=version,
        state=state,
        timestamp_ms=ts,
        sample_count=300,
        profile="rpi4",
        last_metrics={"accuracy": 0.93},
    )


def _populate(reg: Registry) -> int:
    """A run of 3 rounds, 2 finished (v1, v2), round 3 in flight; 3 devices; 2 events."""
    run = reg.start_run(num_rounds=3, strategy="fedavg", config={"lr": 0.05})
    reg.record_evaluation(run, 0, {keys.EVAL_ACCURACY: 0.1, keys.EVAL_LOSS: 2.3})
    for rnd in (1, 2):
        reg.round_started(run, rnd, sampled=["d1", "d2", "d3"])
        reg.round_reply(
            run, rnd, "d1", ok=True, num_examples=100, metrics={keys.TRAIN_LOSS: 1.0 / rnd}
        )
        reg.round_reply(run, rnd, "d2", ok=False, error="trainer down")
        reg.add_version(
            package=f"package {rnd}".encode(),
            architecture_id="mlp",
            round=rnd,
            run_id=run,
            parent_version=rnd - 1 or None,
            metrics={keys.EVAL_ACCURACY: 0.5 + rnd / 10},
        )
        reg.round_finished(
            run, rnd, aggregated_metrics={keys.TRAIN_LOSS: 1.0 / rnd}, version=rnd, dropped=["d3"]
        )
        reg.record_evaluation(
            run, rnd, {keys.EVAL_ACCURACY: 0.5 + rnd / 10, keys.EVAL_LOSS: 1.0 / rnd}
        )
    reg.round_started(run, 3, sampled=["d1", "d2"])
    reg.round_reply(run, 3, "d1", ok=True, num_examples=100, metrics={keys.TRAIN_LOSS: 0.3})
    reg.set_current(2, pinned=False)
    reg.upsert_device_status(_status("d1", 2))
    reg.upsert_device_status(_status("d2", 1))
    reg.upsert_device_status(_status("d3", 2, state="OFFLINE"))
    reg.record_event(DeviceEvent("d2", 4000, "release_rejected", "bad signature", 2))
    reg.record_event(DeviceEvent("d1", 4500, "release_installed", "", 2))
    return run


@pytest.fixture
def actions() -> RecordingActions:
    return RecordingActions()


@pytest.fixture
def client(registry: Registry, actions: RecordingActions) -> Iterator[TestClient]:
    _populate(registry)
    app = create_app(registry, operator_token=TOKEN, fleet="demo", actions=actions)
    with TestClient(app) as c:
        yield c


def test_overview_reports_round_progress_metrics_and_spread(client: TestClient) -> None:
    body = client.get("/api/overview").json()
    assert body["fleet"] == "demo"
    assert body["run"]["num_rounds"] == 3 and body["run"]["status"] == "running"
    progress = body["progress"]
    assert (progress["current"], progress["total"], progress["finished"]) == (3, 3, False)
    assert progress["replied"] == ["d1"] and progress["pending"] == ["d2"]
    assert progress["fraction"] == pytest.approx(2 / 3)
    assert body["latest_metrics"] == {
        "round": 2,
        "aggregated": {"train-loss": 0.5},
        "evaluation": {"eval-accuracy": 0.7, "eval-loss": 0.5},
        # Typed fields the UI reads (no guessing of metric names there).
        "train_loss": 0.5,
        "train_accuracy": None,
        "eval_accuracy": 0.7,
        "eval_loss": 0.5,
    }
    newest = body["newest_version"]
    assert newest["version"] == 2
    # d1 serves v2 and is online; d3 serves v2 but is offline; d2 serves v1.
    assert newest["spread"] == {"serving": 1, "online": 2, "total": 3}
    assert body["serving"]["version"] == 2 and body["serving"]["pinned"] is False
    assert body["devices"] == {"online": 2, "total": 3}


def test_rounds_list_replies_failures_and_timeouts(client: TestClient) -> None:
    body = client.get("/api/rounds").json()
    assert body["run"]["id"] == 1
    rounds = {r["round"]: r for r in body["rounds"]}
    assert sorted(rounds) == [0, 1, 2, 3]
    r1 = rounds[1]
    assert (r1["replied"], r1["failed"], r1["dropped"]) == (["d1"], ["d2"], ["d3"])
    assert r1["eval_metrics"] == {"eval-accuracy": 0.6, "eval-loss": 1.0}
    assert (r1["eval_accuracy"], r1["eval_loss"]) == (0.6, 1.0)
    assert (r1["train_loss"], r1["train_accuracy"]) == (1.0, None)
    assert r1["version"] == 1 and r1["duration"] is not None
    replies = {p["device_id"]: p for p in r1["replies"]}
    assert replies["d1"]["metrics"] == {"train-loss": 1.0} and replies["d1"]["num_examples"] == 100
    assert replies["d1"]["train_loss"] == 1.0 and replies["d2"]["train_loss"] is None
    assert replies["d2"]["ok"] is False and replies["d2"]["error"] == "trainer down"
    assert rounds[3]["duration"] is None and rounds[3]["pending"] == ["d2"]
    assert client.get("/api/rounds", params={"run_id": 1}).json() == body
    assert client.get("/api/rounds", params={"run_id": 99}).status_code == 404


def test_devices_models_events_and_runs(client: TestClient) -> None:
    devices = {d["device_id"]: d for d in client.get("/api/devices").json()}
    assert devices["d1"]["online"] and not devices["d3"]["online"]
    assert devices["d1"]["serving_version"] == 2 and devices["d1"]["last_seen_ms"] == 5000
    assert devices["d1"]["last_metrics"] == {"accuracy": 0.93}
    assert devices["d1"]["profile"] == "rpi4" and devices["d1"]["sample_count"] == 300

    models = client.get("/api/models").json()
    assert models["current"]["version"] == 2
    assert [v["version"] for v in models["versions"]] == [2, 1]
    v1 = models["versions"][1]
    assert v1["spread"] == {"serving": 1, "online": 2, "total": 3}
    assert v1["download_url"] == "/api/models/1/download"
    assert len(v1["sha256"]) == 64 and v1["size"] == len(b"package 1")

    events = client.get("/api/events", params={"limit": 1}).json()
    assert [e["kind"] for e in events] == ["release_installed"]
    assert len(client.get("/api/events").json()) == 2
    assert client.get("/api/events", params={"limit": 0}).status_code == 422

    runs = client.get("/api/runs").json()
    assert [r["id"] for r in runs] == [1]


def test_download_serves_verified_package_bytes(
    client: TestClient, registry: Registry, tmp_path: Path
) -> None:
    response = client.get("/api/models/1/download")
    assert response.status_code == 200
    assert response.content == b"package 1"
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["x-content-sha256"] == registry.get_version(1).sha256
    assert "demo-v1.edgefl" in response.headers["content-disposition"]
    assert client.get("/api/models/9/download").status_code == 404

    with sqlite3.connect(tmp_path / "registry.db") as conn:
        conn.execute(
            "UPDATE artifacts SET data = ? WHERE sha256 = ?",
            (b"tampered!", registry.get_version(1).sha256),
        )
    tampered = client.get("/api/models/1/download")
    assert tampered.status_code == 500
    assert "SHA-256" in tampered.json()["detail"]


@pytest.mark.parametrize("path", WRITE_ENDPOINTS)
def test_write_actions_require_the_operator_token(
    client: TestClient, actions: RecordingActions, path: str
) -> None:
    missing = client.post(path)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = client.post(path, headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    basic = client.post(path, headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401
    assert actions.calls == []
    right = client.post(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200
    assert right.json()["ok"] is True
    assert len(actions.calls) == 1


def test_actions_receive_the_request(client: TestClient, actions: RecordingActions) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/api/models/1/pin", headers=auth).json() == {
        "ok": True,
        "message": "pinned v1",
    }
    assert client.post("/api/runs/start", headers=auth).json()["message"] == "run started"
    assert client.post("/api/runs/stop", headers=auth).json()["message"] == "stopping run"
    assert actions.calls == [("pin", 1), ("start", None), ("stop", None)]
    assert client.post("/api/models/42/pin", headers=auth).status_code == 404


@pytest.mark.slow
def test_starting_a_second_run_conflicts_with_the_real_cloud(
    tmp_path: Path, mlp_model_dir: Path
) -> None:
    """The 409 path through the real CloudActions of a running cloud (no fake actions)."""
    conf = init_cloud(tmp_path / "cloud", fleet="web", model_dir=mlp_model_dir)
    settings = cloud_config.load(conf)
    stack = CloudStack(settings).start()
    try:
        auth = {"Authorization": f"Bearer {read_token(settings)}"}
        with httpx.Client(base_url=stack.web.url, timeout=120) as http:
            first = http.post("/api/runs/start", headers=auth)
            assert first.status_code == 200, first.text
            run_id = stack.flower_run_id
            assert run_id is not None and first.json()["message"] == f"run {run_id} submitted"
            # No device is connected, so the run waits for nodes: it is still going.
            second = http.post("/api/runs/start", headers=auth)
            assert second.status_code == 409, second.text
            assert second.json()["detail"].startswith(f"run {run_id} is still ")
            assert stack.flower_run_id == run_id  # nothing else was submitted
            assert http.post("/api/runs/stop", headers=auth).status_code == 200
        # Without its SuperLink the cloud cannot take a run: a conflict, not a 500.
        assert stack.superlink is not None
        stack.watchdog.stop()  # so that it does not bring the SuperLink back meanwhile
        stack.superlink.stop()
        with pytest.raises(ActionError, match="could not be started"):
            CloudActions(stack).start_run()
    finally:
        stack.stop()


def test_writes_are_disabled_without_a_configured_token(registry: Registry) -> None:
    app = create_app(registry, operator_token=None, fleet="demo", actions=RecordingActions())
    with TestClient(app) as c:
        for path in WRITE_ENDPOINTS:
            response = c.post(path, headers={"Authorization": "Bearer anything"})
            assert response.status_code == 503, path
        assert c.get("/api/overview").status_code == 200


def test_writes_without_wired_actions_are_not_implemented(registry: Registry) -> None:
    app = create_app(registry, operator_token=TOKEN, fleet="demo", actions=None)
    with TestClient(app) as c:
        response = c.post("/api/runs/start", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 501


def test_empty_registry_answers_everywhere(registry: Registry) -> None:
    app = create_app(registry, operator_token=TOKEN, fleet="empty")
    with TestClient(app) as c:
        overview = c.get("/api/overview").json()
        assert overview["run"] is None and overview["progress"] is None
        assert overview["newest_version"] is None
        assert c.get("/api/rounds").json() == {"run": None, "rounds": []}
        assert c.get("/api/models").json() == {"current": None, "versions": []}
        assert c.get("/api/devices").json() == []
        assert c.get("/healthz").json() == {"status": "ok"}


def test_openapi_documents_every_endpoint_and_the_bearer_scheme(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    for path in [
        "/api/overview",
        "/api/rounds",
        "/api/devices",
        "/api/models",
        "/api/models/{version}/download",
        "/api/events",
        "/api/stream",
        "/api/models/{version}/pin",
        "/api/runs/start",
        "/api/runs/stop",
    ]:
        assert path in doc["paths"], path
    overview_schema = doc["paths"]["/api/overview"]["get"]["responses"]["200"]["content"]
    assert overview_schema["application/json"]["schema"]["$ref"].endswith("/OverviewOut")
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert doc["paths"]["/api/runs/stop"]["post"]["security"] == [{"HTTPBearer": []}]
    # The CDN-backed docs pages are off: the UI must work in a closed network.
    assert client.get("/docs").status_code == 404


def test_page_and_assets_reference_no_other_origin(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="round-counter"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/app.css").status_code == 200
    files = sorted(STATIC_DIR.iterdir())
    assert {f.name for f in files} >= {"index.html", "app.js", "app.css"}
    external = re.compile(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", re.IGNORECASE)
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text, f.name
        assert not external.search(text.replace("://", "")), f.name
        assert "@import" not in text, f.name


# --- against the real server ------------------------------------------------------------------


def _read_event(lines: Iterator[str]) -> tuple[str, str]:
    """The next ``(event, data)`` of an SSE stream (comments and ``retry`` skipped)."""
    kind = "message"
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                return kind, "\n".join(data)
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)
    raise AssertionError("event stream ended")


def test_real_server_serves_the_api_and_streams_changes(tmp_path: Path) -> None:
    db = sqlite_url(tmp_path / "registry.db")
    ui_registry = Registry(db)
    writer = Registry(db)  # another connection pool, like the ServerApp process
    actions = RecordingActions()
    app = create_app(
        ui_registry, operator_token=TOKEN, fleet="demo", actions=actions, poll_interval=0.05
    )
    server = WebServer(app)
    try:
        url = server.start()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url) and server.port > 0
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            for path in ["/", "/api/overview", "/api/rounds", "/api/devices", "/api/models"]:
                assert http.get(path).status_code == 200, path
            assert http.post("/api/runs/start").status_code == 401
            assert (
                http.post("/api/runs/start", headers={"Authorization": "Bearer x"}).status_code
                == 401
            )
            ok = http.post("/api/runs/start", headers={"Authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200 and actions.calls == [("start", None)]

            with http.stream("GET", "/api/stream") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                lines = stream.iter_lines()
                kind, data = _read_event(lines)
                assert kind == "overview" and json.loads(data)["run"] is None

                def write_round() -> None:
                    run = writer.start_run(num_rounds=5, strategy="fedavg", config={})
                    writer.round_started(run, 1, sampled=["d1"])

                threading.Thread(target=write_round).start()
                # Wait for an overview that shows round 1 (the two writes may arrive as
                # one or two events).
                current = 0
                while current != 1:
                    kind, data = _read_event(lines)
                    assert kind == "overview"
                    progress = json.loads(data)["progress"]
                    current = progress["current"] if progress else 0
                assert progress["total"] == 5 and progress["pending"] == ["d1"]
    finally:
        server.stop()
        writer.close()
        ui_registry.close()
    assert server.port == 0


def test_stream_sends_heartbeats_when_nothing_changes(registry: Registry) -> None:
    app = create_app(
        registry, operator_token=TOKEN, fleet="demo", poll_interval=0.02, heartbeat=0.1
    )
    with (
        WebServer(app) as server,
        httpx.Client(base_url=server.url, timeout=10) as http,
        http.stream("GET", "/api/stream") as stream,
    ):
        lines = stream.iter_lines()
        assert _read_event(lines)[0] == "overview"
        kind, data = _read_event(lines)
        assert kind == "heartbeat" and json.loads(data)["time"] > 0
