"""The operator web UI and its JSON API (FastAPI).

Reads come straight from the :class:`~cloud.registry.Registry`; the three write actions
(pin a version, start a run, stop a run) require ``Authorization: Bearer <operator
token>`` and are carried out by a :class:`WebActions` object that the cloud supervisor
provides (it owns the publisher and the Flower run). Without a configured token, write
actions answer 503; with a missing or wrong token, 401.

``/metrics`` serves Prometheus metrics (names in :mod:`cloud.metrics`).

Model downloads and the device inventory (``/api/devices``, ``/api/events``) need the
same token whenever the server listens on an address that is not loopback
(``app.state.listen_host``, set by :class:`cloud.web.server.WebServer` to the address it
binds): on loopback only the cloud host's own users reach them. The overview, rounds and
model list stay readable without it.

``/api/stream`` is a server-sent event stream: an ``overview`` event on connect and
whenever the registry's change counter moves (whichever process wrote), plus a
``heartbeat`` event when nothing happened for a while.

The page (``/`` and ``/static/*``) is self-contained: no external URL anywhere, so it
works in a closed network. The interactive API docs pages (which load from a CDN) are
disabled; the OpenAPI document is at ``/openapi.json``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, Protocol, runtime_checkable

import anyio
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud import metrics as cloud_metrics
from cloud.errors import CloudError
from cloud.registry import ArtifactCorruptError, NotFoundError, Registry
from cloud.web import schemas
from protos.codec import DEVICE_STATES

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Devices in one page of ``/api/devices`` unless ``limit`` says otherwise, and the most.
DEFAULT_DEVICE_PAGE = 100
MAX_DEVICE_PAGE = 1000
#: Seconds between two looks at the registry's change counter in ``/api/stream``.
DEFAULT_POLL_INTERVAL = 0.5
#: Seconds of silence after which ``/api/stream`` sends a heartbeat event.
DEFAULT_HEARTBEAT = 15.0
#: Content-Security-Policy of every response: nothing may load from another origin.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address.

    Wildcards (``0.0.0.0``, ``::``), other addresses and names other than ``localhost``
    count as reachable from the network.
    """
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ActionError(CloudError, RuntimeError):
    """A write action that cannot be carried out now (answered with 409 Conflict)."""


@runtime_checkable
class WebActions(Protocol):
    """What the UI's write buttons do; the cloud supervisor implements it.

    Each method returns an optional human-readable message, and raises
    :class:`ActionError` when the action is not possible in the current state
    (e.g. starting a run while one is running), or :class:`LookupError` for an
    unknown version.
    """

    def pin(self, version: int) -> str | None:
        """Pin the fleet to ``version`` (a rollback when it is older than the newest)."""
        ...

    def start_run(self) -> str | None:
        """Start a federated run with the configured settings."""
        ...

    def stop_run(self) -> str | None:
        """Stop the running federated run."""
        ...


class RolloutActions(Protocol):
    """The staged rollouts of the cloud (:class:`cloud.rollout.RolloutController`)."""

    def status(self) -> dict[str, Any]:
        """The running rollout and the recent ones, as plain data."""
        ...

    def promote(self, version: int) -> int:
        """Release the running candidate ``version`` fleet-wide now; its sequence."""
        ...

    def halt(self, version: int) -> None:
        """Stop the running rollout of ``version`` where it is."""
        ...


class SecurityHeaders:
    """Pure ASGI middleware adding CSP and friends to every HTTP response.

    (A pure ASGI middleware, unlike ``BaseHTTPMiddleware``, leaves streaming responses
    and client disconnects alone.)
    """

    _HEADERS = (
        (b"content-security-policy", CSP.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in self._HEADERS if n not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def build_overview(registry: Registry, fleet: str) -> schemas.OverviewOut:
    """Everything the Overview panel shows, from one consistent-enough set of reads."""
    token = registry.change_token()
    run = registry.latest_run()
    progress: schemas.ProgressOut | None = None
    latest: schemas.LatestMetricsOut | None = None
    if run is not None:
        rounds = registry.list_rounds(run.id)
        trained = [r for r in rounds if r.round >= 1 and r.started_at is not None]
        finished_count = sum(1 for r in rounds if r.round >= 1 and r.finished)
        if trained:
            now = trained[-1]
            progress = schemas.ProgressOut(
                current=now.round,
                total=run.num_rounds,
                finished=now.finished,
                sampled=now.sampled,
                replied=now.replied,
                failed=now.failed,
                timed_out=now.dropped,
                pending=now.pending,
                fraction=min(1.0, finished_count / run.num_rounds) if run.num_rounds else 0.0,
            )
        else:
            progress = schemas.ProgressOut(
                current=0,
                total=run.num_rounds,
                finished=False,
                sampled=[],
                replied=[],
                failed=[],
                timed_out=[],
                pending=[],
                fraction=0.0,
            )
        with_metrics = [r for r in rounds if r.aggregated_metrics or r.eval_metrics]
        if with_metrics:
            last = with_metrics[-1]
            latest = schemas.LatestMetricsOut(
                round=last.round, aggregated=last.aggregated_metrics, evaluation=last.eval_metrics
            )
    newest = registry.latest_version()
    # Counts from the database, never the device list: the fleet may be 10,000 devices.
    counts = registry.spread(0 if newest is None else newest.version)
    return schemas.OverviewOut(
        fleet=fleet,
        change_token=token,
        run=None if run is None else schemas.run_out(run),
        progress=progress,
        latest_metrics=latest,
        newest_version=None if newest is None else schemas.version_out(newest, counts),
        serving=schemas.serving_out(registry.current()),
        devices=schemas.FleetCountOut(online=counts["online"], total=counts["total"]),
        alerts=schemas.unknown_version_alerts(registry.devices_serving_unknown_versions()),
    )


def create_app(
    registry: Registry,
    *,
    operator_token: str | None,
    fleet: str,
    actions: WebActions | None = None,
    rollouts: RolloutActions | None = None,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    heartbeat: float = DEFAULT_HEARTBEAT,
    listen_host: str = "127.0.0.1",
) -> FastAPI:
    """The FastAPI application serving the UI and the JSON API for one fleet.

    ``app.state.stop_streams`` (a :class:`threading.Event`) ends every open event
    stream when set; :mod:`cloud.web.server` sets it before shutting down.
    """
    app = FastAPI(
        title="edgefl operator API",
        version="1",
        description=(
            "Rounds, devices and model versions of one edgefl fleet. Write actions need "
            "`Authorization: Bearer <operator token>`."
        ),
        docs_url=None,
        redoc_url=None,
    )
    app.state.registry = registry
    app.state.stop_streams = threading.Event()
    app.state.operator_token = operator_token.encode() if operator_token else None
    app.state.actions = actions
    app.state.rollouts = rollouts
    app.state.listen_host = listen_host

    operator = [Depends(require_operator)]
    private = [Depends(require_operator_off_loopback)]
    private_errors: dict[int | str, dict[str, object]] = {
        401: {"model": schemas.ErrorOut, "description": "Off loopback: missing or wrong token."},
        503: {"model": schemas.ErrorOut, "description": "Off loopback: no token configured."},
    }
    write_errors: dict[int | str, dict[str, object]] = {
        401: {"model": schemas.ErrorOut, "description": "Missing or wrong operator token."},
        409: {"model": schemas.ErrorOut, "description": "Not possible in the current state."},
        501: {"model": schemas.ErrorOut, "description": "No actions wired to this server."},
        503: {"model": schemas.ErrorOut, "description": "No operator token configured."},
    }

    app.add_middleware(SecurityHeaders)

    @app.exception_handler(NotFoundError)
    async def not_found(_request: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(ArtifactCorruptError)
    async def corrupt(_request: Request, exc: ArtifactCorruptError) -> JSONResponse:
        logger.error("refusing to serve a corrupt artifact: %s", exc)
        return JSONResponse({"detail": str(exc)}, status_code=500)

    # -- page ----------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz", tags=["meta"], summary="Liveness and database reachability")
    def healthz() -> JSONResponse:
        try:
            registry.change_token()
        except Exception as exc:
            logger.warning("health check: registry unreachable: %s", exc)
            return JSONResponse({"status": "unavailable", "detail": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    collectors = cloud_metrics.cloud_collectors(registry)

    @app.get("/metrics", tags=["meta"], summary="Prometheus metrics (text format)")
    def metrics() -> Response:
        """Rounds, devices by state, version spread, publish latency, registry size."""
        return Response(cloud_metrics.render(collectors), media_type=cloud_metrics.CONTENT_TYPE)

    # -- reads ---------------------------------------------------------------------------

    @app.get("/api/overview", response_model=schemas.OverviewOut, tags=["read"])
    def overview() -> schemas.OverviewOut:
        """Current run, round n of N with who replied or timed out, latest metrics, spread."""
        return build_overview(registry, fleet)

    @app.get("/api/rounds", response_model=schemas.RoundsOut, tags=["read"])
    def rounds(
        run_id: Annotated[int | None, Query(description="Defaults to the latest run.")] = None,
    ) -> schemas.RoundsOut:
        """Every round of a run with per-device replies and metrics."""
        run = registry.get_run(run_id) if run_id is not None else registry.latest_run()
        if run is None:
            return schemas.RoundsOut(run=None, rounds=[])
        return schemas.RoundsOut(
            run=schemas.run_out(run),
            rounds=[schemas.round_out(r) for r in registry.list_rounds(run.id)],
        )

    @app.get("/api/runs", response_model=list[schemas.RunOut], tags=["read"])
    def runs() -> list[schemas.RunOut]:
        """All runs, oldest first."""
        return [schemas.run_out(r) for r in registry.list_runs()]

    @app.get(
        "/api/devices",
        response_model=list[schemas.DeviceOut],
        tags=["read"],
        dependencies=private,
        responses=private_errors,
    )
    def devices(
        response: Response,
        offset: Annotated[int, Query(ge=0, description="Devices to skip (by id).")] = 0,
        limit: Annotated[
            int, Query(ge=1, le=MAX_DEVICE_PAGE, description="Devices in this page.")
        ] = DEFAULT_DEVICE_PAGE,
        state: Annotated[
            str | None,
            Query(description=f"Only devices in this state ({', '.join(DEVICE_STATES)})."),
        ] = None,
        q: Annotated[
            str | None, Query(max_length=128, description="Only ids containing this text.")
        ] = None,
        version: Annotated[
            int | None, Query(ge=0, description="Only devices serving this version.")
        ] = None,
    ) -> list[schemas.DeviceOut]:
        """One page of the devices that ever reported (by id), with their latest status.

        ``X-Total-Count`` holds how many devices match the filters in all pages.
        """
        if state is not None and state not in DEVICE_STATES:
            raise HTTPException(422, f"unknown device state {state!r}: one of {DEVICE_STATES}")
        total = registry.count_devices(state=state, search=q, version=version)
        response.headers["X-Total-Count"] = str(total)
        page = registry.list_devices(
            offset=offset, limit=limit, state=state, search=q, version=version
        )
        known = registry.version_numbers()
        return [schemas.device_out(d, known) for d in page]

    @app.get("/api/models", response_model=schemas.ModelsOut, tags=["read"])
    def models() -> schemas.ModelsOut:
        """Model versions, newest first, with metrics, digest and spread."""
        return schemas.ModelsOut(
            current=schemas.serving_out(registry.current()),
            versions=[
                schemas.version_out(v, registry.spread(v.version))
                for v in reversed(registry.list_versions())
            ],
        )

    @app.get(
        "/api/models/{version}/download",
        tags=["read"],
        response_class=Response,
        dependencies=private,
        responses={
            200: {
                "content": {"application/octet-stream": {}},
                "description": "The model package (protos.codec.ModelPackage bytes).",
            },
            404: {"model": schemas.ErrorOut},
            **private_errors,
        },
    )
    def download(version: int) -> Response:
        """The package bytes of a version, verified against their SHA-256 first."""
        data = registry.version_bytes(version)
        info = registry.get_version(version)
        return Response(
            content=data,
            media_type="application/octet-stream",
            headers={
                "Content-Disposition": f'attachment; filename="{fleet}-v{version}.edgefl"',
                "ETag": f'"{info.sha256}"',
                "X-Content-SHA256": info.sha256,
            },
        )

    @app.get(
        "/api/events",
        response_model=list[schemas.EventOut],
        tags=["read"],
        dependencies=private,
        responses=private_errors,
    )
    def events(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[schemas.EventOut]:
        """The newest device events, newest first."""
        return [schemas.event_out(e) for e in registry.list_events(limit)]

    @app.get(
        "/api/rollouts",
        tags=["read"],
        dependencies=private,
        responses={**private_errors, 501: {"model": schemas.ErrorOut}},
    )
    def rollouts_status(request: Request) -> dict[str, Any]:
        """Staged rollouts: the running one and the recent ones, each phase with its cohort,
        checks, failures, gate figures and decision (501 when no controller is wired)."""
        return _rollouts(request).status()

    @app.get(
        "/api/stream",
        tags=["read"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def stream(request: Request) -> StreamingResponse:
        """Server-sent events: ``overview`` (JSON of /api/overview) on every change,
        ``heartbeat`` after ``heartbeat`` seconds without one."""
        return StreamingResponse(
            _overview_events(
                request, registry, fleet, app.state.stop_streams, poll_interval, heartbeat
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- writes --------------------------------------------------------------------------

    @app.post(
        "/api/models/{version}/pin",
        response_model=schemas.ActionOut,
        dependencies=operator,
        responses={**write_errors, 404: {"model": schemas.ErrorOut}},
        tags=["write"],
    )
    def pin(
        version: int, wired: Annotated[WebActions, Depends(require_actions)]
    ) -> schemas.ActionOut:
        """Pin the fleet to a version (rollback when older than the newest)."""
        registry.get_version(version)  # 404 for an unknown version
        return _act(lambda: wired.pin(version), f"fleet pinned to version {version}")

    @app.post(
        "/api/runs/start",
        response_model=schemas.ActionOut,
        dependencies=operator,
        responses=write_errors,
        tags=["write"],
    )
    def start_run(wired: Annotated[WebActions, Depends(require_actions)]) -> schemas.ActionOut:
        """Start a federated run with the configured settings."""
        return _act(wired.start_run, "run started")

    @app.post(
        "/api/runs/stop",
        response_model=schemas.ActionOut,
        dependencies=operator,
        responses=write_errors,
        tags=["write"],
    )
    def stop_run(wired: Annotated[WebActions, Depends(require_actions)]) -> schemas.ActionOut:
        """Stop the running federated run."""
        return _act(wired.stop_run, "run stopping")

    @app.post(
        "/api/rollouts/{version}/promote",
        response_model=schemas.ActionOut,
        dependencies=operator,
        responses=write_errors,
        tags=["write"],
    )
    def promote_rollout(version: int, request: Request) -> schemas.ActionOut:
        """Release the running candidate to the whole fleet now, skipping its phases."""
        wired = _rollouts(request)
        return _act(
            lambda: _rollout_act(
                lambda: f"version {version} promoted (sequence {wired.promote(version)})"
            ),
            f"version {version} promoted",
        )

    @app.post(
        "/api/rollouts/{version}/halt",
        response_model=schemas.ActionOut,
        dependencies=operator,
        responses=write_errors,
        tags=["write"],
    )
    def halt_rollout(version: int, request: Request) -> schemas.ActionOut:
        """Stop the running rollout where it is (devices keep what they serve)."""
        wired = _rollouts(request)

        def halt() -> str:
            wired.halt(version)
            return f"rollout of version {version} halted"

        return _act(lambda: _rollout_act(halt), f"rollout of version {version} halted")

    return app


def _rollouts(request: Request) -> RolloutActions:
    wired: RolloutActions | None = request.app.state.rollouts
    if wired is None:
        raise HTTPException(501, "this server has no rollout controller wired")
    return wired


def _rollout_act(action: Callable[[], str]) -> str:
    """Run a rollout action; "not in progress" and a broker outage become ActionError (409)."""
    from cloud.publisher import PublishError
    from cloud.rollout import RolloutError
    from cloud.signer import SignerError

    try:
        return action()
    except (RolloutError, SignerError, PublishError, OSError) as exc:
        raise ActionError(str(exc)) from exc


_bearer = HTTPBearer(auto_error=False, description="The operator token.")


def require_operator(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Dependency of write endpoints: 503 without a configured token, 401 unless it matches."""
    expected: bytes | None = request.app.state.operator_token
    if expected is None:
        raise HTTPException(503, "write actions are disabled: no operator token configured")
    given = (credentials.credentials if credentials else "").encode()
    if not hmac.compare_digest(given, expected):
        raise HTTPException(
            401, "a valid operator token is required", headers={"WWW-Authenticate": "Bearer"}
        )


def require_operator_off_loopback(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Dependency of private reads: free on loopback, the operator token anywhere else."""
    host = str(request.app.state.listen_host)
    if is_loopback(host):
        return
    if request.app.state.operator_token is None:
        raise HTTPException(
            503,
            f"this server listens on {host}, beyond loopback: device inventory and model "
            "downloads need an operator token, and none is configured",
        )
    require_operator(request, credentials)


def require_actions(request: Request) -> WebActions:
    """Dependency of write endpoints: the wired :class:`WebActions`, or 501."""
    actions: WebActions | None = request.app.state.actions
    if actions is None:
        raise HTTPException(501, "this server has no actions wired (read-only UI)")
    return actions


def _act(action: Callable[[], str | None], default_message: str) -> schemas.ActionOut:
    try:
        message = action()
    except ActionError as exc:
        raise HTTPException(409, str(exc)) from exc
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    logger.info("operator action: %s", message or default_message)
    return schemas.ActionOut(ok=True, message=message or default_message)


async def _overview_events(
    request: Request,
    registry: Registry,
    fleet: str,
    stop: threading.Event,
    poll_interval: float,
    heartbeat: float,
) -> AsyncIterator[str]:
    token: int | None = None
    last_sent = time.monotonic()
    yield "retry: 2000\n\n"
    while not stop.is_set():
        if await request.is_disconnected():
            break
        try:
            current = await anyio.to_thread.run_sync(registry.change_token)
            if current != token:
                view = await anyio.to_thread.run_sync(build_overview, registry, fleet)
                token = view.change_token
                last_sent = time.monotonic()
                yield f"id: {token}\nevent: overview\ndata: {view.model_dump_json()}\n\n"
            elif time.monotonic() - last_sent >= heartbeat:
                last_sent = time.monotonic()
                yield f"event: heartbeat\ndata: {json.dumps({'time': time.time()})}\n\n"
        except Exception:  # a transient database error must not kill the stream
            logger.warning("event stream: reading the registry failed", exc_info=True)
        await anyio.sleep(poll_interval)
