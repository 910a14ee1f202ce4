"""The fleet proxy: a real nginx in front of a real Flower SuperLink.

The ``flwr`` CLI call that works against the SuperLink's loopback port is refused on
the proxy's port with the proxy's message; Fleet routes pass, nothing else does, and
every refusal shows up once in :meth:`FleetProxy.refusals`. The TLS + SuperNode-auth
path through the proxy is exercised end to end in ``tests/e2e/test_outsider.py`` and
``tests/e2e/test_secure_fleet.py``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from cloud.proxy import FLEET_ROUTES, REFUSAL_DETAIL, FleetProxy, ProxyConfig, ProxyError
from edge.flower_node import SuperLink, write_flwr_config
from edge.process import free_port, tool_env


def test_forwarded_routes_are_exactly_flowers_fleet_api() -> None:
    from flwr.superlink.routers.fleet.router import router

    flower = {route.path.removeprefix("/v1/fleet/") for route in router.routes}  # type: ignore[attr-defined]
    assert set(FLEET_ROUTES) == flower, "Flower's Fleet API changed: update FLEET_ROUTES"


def test_tls_proxy_needs_the_upstream_ca(tmp_path: Path) -> None:
    cfg = ProxyConfig(
        listen_port=1,
        upstream_port=2,
        data_dir=tmp_path,
        certfile=tmp_path / "c",
        keyfile=tmp_path / "k",
    )
    with pytest.raises(ProxyError, match="CA"):
        cfg.render()


def test_port_held_by_another_process_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proxy = FleetProxy(
            ProxyConfig(listen_port=port, upstream_port=free_port(), data_dir=tmp_path)
        )
        with pytest.raises(ProxyError, match="in use"):
            proxy.start(timeout=20)
        assert not proxy.alive()


def _flwr(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["flwr", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=tool_env({"FLWR_HOME": str(home)}),
    )


@pytest.mark.slow
def test_plain_proxy_forwards_fleet_calls_and_refuses_control(
    tmp_path: Path, superlink: SuperLink
) -> None:
    proxy = FleetProxy(
        ProxyConfig(
            listen_port=free_port(), upstream_port=superlink.port, data_dir=tmp_path / "proxy"
        )
    )
    with proxy:
        home = tmp_path / "outsider"
        write_flwr_config(home, address=proxy.address)
        res = _flwr(home, "list", "edgefl", "--format", "json")
        assert json.loads(res.stdout)["success"] is False
        assert REFUSAL_DETAIL in res.stdout + res.stderr
        # The operator's path (the SuperLink's own loopback port) answers the same call.
        assert json.loads(superlink.flwr("list", "edgefl", "--format", "json").stdout)["success"]
        with httpx.Client(base_url=f"http://{proxy.address}") as client:
            # A Fleet route reaches the SuperLink (which wants protobuf, hence 415)...
            assert client.post("/v1/fleet/pull-messages", content=b"").status_code == 415
            # ... anything else, including a Fleet route by another method or path, does not.
            assert client.get("/v1/fleet/pull-messages").status_code == 403
            assert client.post("/v1/fleet/../control/list-runs", content=b"").status_code == 403
            assert client.post("/v1/fleet/pull-messages/x", content=b"").status_code == 403
            assert client.get("/health").status_code == 403
        refused = proxy.refusals()
        assert [r.uri for r in refused] == [
            "/v1/control/list-runs",
            "/v1/fleet/pull-messages",
            "/v1/control/list-runs",
            "/v1/fleet/pull-messages/x",
            "/health",
        ]
        assert all(r.remote == "127.0.0.1" and r.status == 403 for r in refused)
        assert proxy.refusals() == [], "each refusal is reported once"
    assert not proxy.alive()


def test_a_network_facing_superlink_without_the_proxy_is_refused() -> None:
    from cloud import config as cloud_config

    with pytest.raises(cloud_config.ConfigError, match="Control API"):
        cloud_config.from_dict({"superlink": {"host": "0.0.0.0"}, "proxy": {"enabled": False}})
    # Loopback without the proxy (a one-machine demo) and any host with it are fine.
    cloud_config.from_dict({"proxy": {"enabled": False}})
    assert cloud_config.from_dict({"superlink": {"host": "0.0.0.0"}}).proxy.enabled


def test_only_the_proxys_own_refusals_count(tmp_path: Path) -> None:
    """A 403 the SuperLink gives a forwarded Fleet call ("run is finished") is no refusal."""
    proxy = FleetProxy(ProxyConfig(listen_port=1, upstream_port=2, data_dir=tmp_path))
    line = '{{"time":"t","remote":"10.0.0.9","method":"POST","uri":"{}","status":403,"upstream":"{}"}}\n'
    proxy.config.access_log.write_text(
        line.format("/v1/control/start-run", "")
        + line.format("/v1/fleet/pull-object", "127.0.0.1:2")
        + "garbage\n"
        + line.format("/v1/control/list-runs", "")[:40]  # still being written
    )
    assert [r.describe() for r in proxy.refusals()] == [
        "POST /v1/control/start-run from 10.0.0.9 refused (403)"
    ]
    with proxy.config.access_log.open("a") as fh:
        fh.write(line.format("/v1/control/list-runs", "")[40:])
    assert [r.uri for r in proxy.refusals()] == ["/v1/control/list-runs"]
