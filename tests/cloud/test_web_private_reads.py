"""Off loopback, model downloads and the device inventory need the operator token (#15 item 8).

"Off loopback" is tested for real without leaving the machine: the web UI runs as a real
uvicorn server (:class:`cloud.web.server.WebServer`) inside a network namespace, bound to
that namespace's ``eth0`` address (a private 10.231.x.y veth), and a second namespace on
the same virtual switch plays someone else on the LAN. The control is the same app bound
to 127.0.0.1 in this process, which answers the same requests without a token.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.registry import Registry, sqlite_url
from cloud.web.app import create_app, is_loopback
from cloud.web.server import WebServer
from edge.process import ManagedProcess
from protos import codec
from tests.e2e.netns import Lan, require_netns

TOKEN = "s3cret-operator-token"
PATHS = ["/api/devices", "/api/events", "/api/models/1/download", "/api/overview", "/api/models"]

SERVER = """
import sys, time
from cloud.registry import Registry, sqlite_url
from cloud.web.app import create_app
from cloud.web.server import WebServer
registry = Registry(sqlite_url(sys.argv[1]))
token = sys.argv[3] or None
server = WebServer(create_app(registry, operator_token=token, fleet="lab"), host=sys.argv[2])
print("URL", server.start(), flush=True)
while True:
    time.sleep(1)
"""

CLIENT = """
import json, sys, urllib.error, urllib.request
out = {}
for path in json.loads(sys.argv[2]):
    for token in ("", sys.argv[3], "wrong"):
        req = urllib.request.Request(sys.argv[1] + path)
        if token:
            req.add_header("Authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                out[path + "|" + token] = resp.status
        except urllib.error.HTTPError as exc:
            out[path + "|" + token] = exc.code
print(json.dumps(out))
"""


def _fill(db: Path) -> None:
    with Registry(sqlite_url(db)) as registry:
        registry.add_version(
            package=b"package-bytes", architecture_id="a", round=0, run_id=None,
            parent_version=None, metrics={},
        )  # fmt: skip
        registry.upsert_device_status(codec.DeviceStatus("pi-1", "lab", 1, "SERVING", 1000))


@pytest.fixture
def lan() -> Iterator[Lan]:
    require_netns()  # no skip: a machine without namespaces fails with the reason
    lan = Lan()
    try:
        yield lan.start()
    finally:
        lan.close()


def _serve_in(
    lan: Lan, host_name: str, db: Path, token: str, log: Path
) -> tuple[ManagedProcess, str]:
    host = lan.add_host(host_name)
    proc = ManagedProcess(
        "web",
        host.argv([sys.executable, "-c", SERVER, str(db), host.address, token]),
        log_path=log,
    ).start()
    proc.wait_until(lambda: "URL " in log.read_text(), timeout=60, what="the web URL")
    url = log.read_text().split("URL ", 1)[1].split()[0]
    return proc, url


def test_off_loopback_inventory_and_downloads_need_the_token(lan: Lan, tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    _fill(db)
    proc, url = _serve_in(lan, "cloud", db, TOKEN, tmp_path / "web.log")
    try:
        assert url.startswith("http://10.231.")
        laptop = lan.add_host("laptop")
        seen = json.loads(lan.python(laptop, CLIENT, url, json.dumps(PATHS), TOKEN))
    finally:
        proc.stop()
    for path in ("/api/devices", "/api/events", "/api/models/1/download"):
        assert seen[f"{path}|"] == 401, (path, seen)
        assert seen[f"{path}|wrong"] == 401, (path, seen)
        assert seen[f"{path}|{TOKEN}"] == 200, (path, seen)
    for path in ("/api/overview", "/api/models"):
        assert seen[f"{path}|"] == 200, (path, seen)


def test_off_loopback_without_a_configured_token_they_are_closed(lan: Lan, tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    _fill(db)
    proc, url = _serve_in(lan, "cloud", db, "", tmp_path / "web.log")
    try:
        laptop = lan.add_host("laptop")
        seen = json.loads(lan.python(laptop, CLIENT, url, json.dumps(PATHS), TOKEN))
    finally:
        proc.stop()
    assert seen["/api/devices|"] == 503 and seen["/api/models/1/download|"] == 503
    assert seen["/api/overview|"] == 200


def test_on_loopback_they_stay_open(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    _fill(db)
    with (
        Registry(sqlite_url(db)) as registry,
        WebServer(create_app(registry, operator_token=TOKEN, fleet="lab")) as server,
    ):
        for path in ("/api/devices", "/api/models/1/download"):
            with urllib.request.urlopen(server.url + path, timeout=10) as resp:
                assert resp.status == 200
        with urllib.request.urlopen(server.url + "/api/devices", timeout=10) as resp:
            assert [d["device_id"] for d in json.load(resp)] == ["pi-1"]


def test_which_addresses_count_as_loopback() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.231.1.1", "192.168.1.5", "cloud.example"):
        assert not is_loopback(host), host
