"""``edgefl cloud up``: the broker, the SuperLink, the registry, the UI and the run.

One :class:`CloudStack` starts everything the aggregator needs, in order, writes the
ports it picked to ``data_dir`` (``broker/port``, ``superlink.port``, ``proxy/port``,
``web.url``) and a resolved settings file (``runtime.toml``) that the ServerApp reads,
submits the federated run to the SuperLink, and stops everything again, children by PID.

With ``[proxy]`` on (the default) the SuperLink listens on loopback only
(``superlink.port`` is that port: the operator's path for ``flwr`` calls) and nginx
(:mod:`cloud.proxy`) serves the Fleet API on the fleet address devices know
(``superlink.host:superlink.port`` in the settings). Requests the proxy refuses are
recorded as registry events (``fleet-proxy`` / ``control_refused``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cloud import config as cloud_config
from cloud.broker import Broker, BrokerConfig, message_size_limit_for
from cloud.cloud_lock import CloudLock
from cloud.config import CloudSettings
from cloud.errors import CloudError
from cloud.ports import check_port_free
from cloud.proxy import FleetProxy
from cloud.signer import SignerService, SignerUnavailable
from cloud.supervision import RestartPolicy, SupervisedPart, Watchdog, interrupts_ignored
from edge.flower_node import FlowerError, SuperLink, SuperLinkTLS
from edge.process import ManagedProcess, connect_host, free_port

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent / "flower_app"
#: The ``device_id`` of events the cloud records about its own parts (restarts).
CLOUD_EVENT_SOURCE = "cloud"
#: Event source and kind under which requests the fleet proxy refused are recorded.
PROXY_EVENT_SOURCE = "fleet-proxy"
REFUSED_EVENT_KIND = "control_refused"
#: Seconds between reads of the proxy's access log.
REFUSAL_POLL_S = 2.0


class StackError(CloudError, RuntimeError):
    """The cloud stack could not start or a run could not be submitted."""


def read_token(settings: CloudSettings) -> str | None:
    path = settings.web.operator_token_file
    if path is None or not Path(path).exists():
        return None
    return Path(path).read_text().strip() or None


class CloudActions:
    """What the UI's write buttons do (wired into :func:`cloud.web.app.create_app`)."""

    def __init__(self, stack: CloudStack) -> None:
        self.stack = stack
        self._starting = threading.Lock()

    def pin(self, version: int) -> str | None:
        from cloud.releases import pin_version

        if self.stack.signer is not None:
            sequence = self.stack.signer.signer.pin(version)
            return f"version {version} pinned (sequence {sequence})"
        manifest = pin_version(self.stack.runtime_settings, self.stack.registry, version)
        return f"version {version} pinned (sequence {manifest.sequence})"

    def start_run(self) -> str | None:
        """Submit a run; :class:`~cloud.web.app.ActionError` (409) while one is going.

        A second Flower run would start a second ServerApp on the same registry and
        devices, so a run that Flower has not finished refuses the start; so does a
        stack whose SuperLink cannot take the run (not running, ``flwr run`` failed).
        """
        from cloud.web.app import ActionError

        with self._starting:
            going = self.stack.active_run()
            if going is not None:
                run_id, status = going
                raise ActionError(f"run {run_id} is still {status}; stop it first")
            try:
                run_id = self.stack.submit_run()
            except (FlowerError, StackError) as exc:
                raise ActionError(f"the run could not be started: {exc}") from exc
        return f"run {run_id} submitted"

    def stop_run(self) -> str | None:
        self.stack.stop_run()
        return "run stopped"


#: The start-up phases of :class:`CloudStack`, in order; ``on_phase`` hears each one.
START_PHASES = (
    "lock",
    "broker",
    "broker-ready",
    "superlink",
    "superlink-ready",
    "proxy",
    "registry",
    "signer",
    "monitor",
    "web",
    "supervising",
)


class CloudStack:
    """Everything ``cloud up`` runs, started in :data:`START_PHASES` order.

    ``on_phase(name)`` is called as each phase begins (tests interrupt start-up there);
    whatever was started before an interruption is stopped again, by PID. Once up, a
    :class:`~cloud.supervision.Watchdog` restarts the broker, the SuperLink and the web UI
    when one dies; other parts (a reverse proxy) join through :meth:`supervise`.
    """

    def __init__(
        self,
        settings: CloudSettings,
        *,
        num_rounds: int | None = None,
        on_phase: Callable[[str], None] | None = None,
        restart_policy: RestartPolicy | None = None,
    ) -> None:
        self.settings = settings
        self.num_rounds = num_rounds
        self.on_phase = on_phase
        self.broker: Broker | None = None
        self.superlink: SuperLink | None = None
        self.proxy: FleetProxy | None = None
        self.signer: SignerService | None = None
        self._stopping = threading.Event()
        self._refusal_watch: threading.Thread | None = None
        self.web: Any = None
        self.monitor: Any = None
        self.telemetry: Any = None
        self.registry: Any = None
        self.flower_run_id: str | None = None
        self.runtime_settings = settings
        self.lock = CloudLock(settings.data_dir)
        self.watchdog = Watchdog(policy=restart_policy, on_event=self._record_part_event)
        #: True while a submitted run is being waited for (a restarted SuperLink resubmits it).
        self.run_active = False
        self._resubmit_pending = False
        self._lock = threading.Lock()

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    # -- start -----------------------------------------------------------------------------

    def start(self) -> CloudStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _phase(self, name: str) -> None:
        logger.debug("start-up: %s", name)
        if self.on_phase is not None:
            self.on_phase(name)

    def _start(self) -> None:
        from cloud.registry import Registry

        s = self.settings
        self._phase("lock")
        self.lock.acquire()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        broker_port = s.broker.port or free_port(s.broker.host)
        self._phase("broker")
        # The cloud's own clients (monitor, publishers) share one user: where devices'
        # client ids are bound to their user names, they use a loopback listener instead.
        bind = s.broker.managed and s.broker.broker_password_file is not None
        local_port = free_port("127.0.0.1") if bind else 0
        if s.broker.managed:
            check_port_free(s.broker.host, broker_port, what="broker")
            self.broker = Broker(
                BrokerConfig(
                    port=broker_port,
                    host=s.broker.host,
                    data_dir=self.data_dir / "broker",
                    allow_anonymous=s.broker.broker_password_file is None,
                    password_file=s.broker.broker_password_file,
                    acl_file=s.broker.acl_file,
                    cafile=s.broker.ca_file,
                    certfile=s.broker.certfile,
                    keyfile=s.broker.keyfile,
                    message_size_limit=message_size_limit_for(s.run.chunk_size),
                    bind_client_id=bind,
                    local_port=local_port,
                )
            )
            self._start_broker()
        (self.data_dir / "broker").mkdir(exist_ok=True)
        (self.data_dir / "broker" / "port").write_text(str(broker_port))
        self.lock.update(broker=f"{connect_host(s.broker.host)}:{broker_port}")
        self._phase("broker-ready")

        tls = None
        if s.superlink.certfile is not None:
            tls = SuperLinkTLS(s.superlink.certfile, s.superlink.keyfile, s.superlink.ca_certfile)  # type: ignore[arg-type]
        fleet_port = s.superlink.port or free_port(s.superlink.host)
        if s.proxy.enabled:
            # The SuperLink (Control, Fleet and Runtime APIs) on loopback; the fleet port
            # is nginx's and forwards only the Fleet API (cloud/proxy.py).
            link_host, link_port = "127.0.0.1", s.proxy.superlink_port or free_port()
        else:
            link_host, link_port = s.superlink.host, fleet_port
        self._phase("superlink")
        check_port_free(link_host, link_port, what="SuperLink")
        # Assigned before it starts, so an interruption while it comes up still stops it.
        self.superlink = SuperLink(
            data_dir=self.data_dir / "superlink",
            host=link_host,
            port=link_port,
            tls=tls,
            enable_supernode_auth=s.superlink.supernode_auth,
        )
        self._start_superlink()
        (self.data_dir / "superlink.port").write_text(str(self.superlink.port))
        self.lock.update(superlink=self.superlink.address)
        self._phase("superlink-ready")
        if s.proxy.enabled:
            self._phase("proxy")
            check_port_free(s.superlink.host, fleet_port, what="fleet proxy")
            self._start_proxy(fleet_port)

        cloud_broker = dataclasses.replace(s.broker, port=broker_port)
        if local_port:
            cloud_broker = dataclasses.replace(
                cloud_broker, host="127.0.0.1", port=local_port, ca_file=None
            )
        self.runtime_settings = dataclasses.replace(
            s,
            broker=cloud_broker,
            superlink=dataclasses.replace(s.superlink, port=fleet_port),
            proxy=dataclasses.replace(s.proxy, superlink_port=self.superlink.port),
        )
        runtime = self.data_dir / "runtime.toml"
        runtime.write_text(cloud_config.to_toml(self.runtime_settings))
        self.runtime_path = runtime

        self._phase("registry")
        self.registry = Registry(s.registry_url)
        self._phase("signer")
        # The only holder of the signing key; the ServerApp asks it for releases.
        self.signer = SignerService(self.runtime_settings, self.registry).start()
        # A broker killed together with the cloud may have come back with an older
        # release retained (its last autosave): the current one goes out again.
        try:
            self.republish_current()
        except SignerUnavailable as exc:
            logger.warning("the current release was not republished at start: %s", exc)
        self._phase("monitor")
        self._start_monitor()
        self._phase("web")
        self._start_web()
        self.lock.update(web=self.web.url)
        self._phase("supervising")
        self._supervise_own_parts()
        if self.proxy is not None:
            self._refusal_watch = threading.Thread(
                target=self._watch_refusals, name="proxy-refusals", daemon=True
            )
            self._refusal_watch.start()
        self.lock.update(phase="running")

    def _start_broker(self) -> None:
        from devices.secure_fleet import broker_pid_file

        broker = self.broker
        assert broker is not None
        broker.start()
        broker_pid_file(self.data_dir).write_text(str(broker.process.pid))  # type: ignore[union-attr]

    def _start_superlink(self) -> None:
        link = self.superlink
        assert link is not None
        link.start()
        if self.settings.superlink.supernode_auth:
            self._sync_supernodes()

    def _start_proxy(self, fleet_port: int) -> None:
        from cloud.proxy import ProxyConfig

        s = self.settings
        link = self.superlink
        assert link is not None
        # Assigned before it starts, so an interruption while it comes up still stops it.
        self.proxy = FleetProxy(
            ProxyConfig(
                listen_port=fleet_port,
                upstream_port=link.port,
                listen_host=s.superlink.host,
                data_dir=self.data_dir / "proxy",
                certfile=s.superlink.certfile,
                keyfile=s.superlink.keyfile,
                upstream_ca=s.superlink.ca_certfile,
                max_body_mb=s.proxy.max_body_mb,
            )
        )
        self.proxy.start()
        (self.data_dir / "proxy" / "port").write_text(str(fleet_port))
        self.lock.update(fleet=self.proxy.address)

    @property
    def fleet_address(self) -> str:
        """Where devices on this host reach the SuperLink's Fleet API (the proxy, if on)."""
        if self.proxy is not None:
            return self.proxy.address
        assert self.superlink is not None, "the cloud is not started"
        return self.superlink.address

    def record_refusals(self) -> int:
        """Record requests the proxy refused since the last call as registry events."""
        if self.proxy is None or self.registry is None:
            return 0
        from protos.codec import DeviceEvent

        refused = self.proxy.refusals()
        for r in refused:
            logger.warning("fleet port: %s", r.describe())
            self.registry.record_event(
                DeviceEvent(
                    device_id=PROXY_EVENT_SOURCE,
                    timestamp_ms=int(time.time() * 1000),
                    kind=REFUSED_EVENT_KIND,
                    detail=r.describe(),
                )
            )
        return len(refused)

    def _watch_refusals(self) -> None:
        while not self._stopping.wait(REFUSAL_POLL_S):
            try:
                self.record_refusals()
            except Exception:
                logger.exception("could not record the proxy's refused requests")

    # -- supervision -----------------------------------------------------------------------

    def supervise(self, part: SupervisedPart) -> SupervisedPart:
        """Keep ``part`` alive from now on (restarted with backoff when it dies)."""
        return self.watchdog.add(part)

    def _supervise_own_parts(self) -> None:
        if self.broker is not None:
            broker = self.broker
            self.supervise(
                SupervisedPart(
                    "broker",
                    alive=lambda: _process_alive(broker.process),
                    restart=self._restart_broker,
                    describe_exit=lambda: _exit_text(broker.process),
                    after_restart=[self.republish_current, self.republish_candidate],
                )
            )
        link = self.superlink
        assert link is not None
        self.supervise(
            SupervisedPart(
                "SuperLink",
                alive=lambda: _process_alive(link.process),
                restart=self._restart_superlink,
                describe_exit=lambda: _exit_text(link.process),
                after_restart=[self.resubmit_after_restart],
            )
        )
        proxy = self.proxy
        if proxy is not None:
            self.supervise(
                SupervisedPart(
                    "fleet proxy",
                    alive=proxy.alive,
                    restart=proxy.restart,
                    describe_exit=lambda: _exit_text(proxy.process),
                )
            )
        web = self.web
        self.supervise(
            SupervisedPart(
                "web UI",
                alive=lambda: web.running,
                restart=self._restart_web,
                describe_exit=lambda: "the web server thread ended",
            )
        )
        self.watchdog.start()

    def _restart_broker(self) -> None:
        assert self.broker is not None
        # Whatever is left of the old process (nothing, usually) goes first.
        self.broker.stop()
        self._start_broker()

    def republish_current(self) -> None:
        """Hook after a broker restart: put the current release back as the retained one.

        A SIGKILLed Mosquitto comes back with the retained messages of its last autosave,
        possibly an older release (:meth:`cloud.signer.ReleaseSigner.republish_current`).
        """
        if self.signer is None:
            return
        sequence = self.signer.signer.republish_current()
        if sequence is not None:
            logger.info("broker restarted: current release republished (sequence %d)", sequence)

    def republish_candidate(self) -> None:
        """Hook after a broker restart: put a staged rollout's candidate topic back.

        The same autosave can have lost the running candidate or its chunks, or hold an
        older one (:meth:`cloud.rollout.RolloutController.republish`); retried by the
        controller until the broker takes it.
        """
        if self.signer is None:
            return
        try:
            self.signer.signer.rollout.republish()
        except Exception as exc:  # the broker is not taking it yet: the controller retries
            logger.warning("broker restarted: the rollout candidate not put back yet: %s", exc)

    def _restart_superlink(self) -> None:
        assert self.superlink is not None
        with self._lock:
            # Until the run is resubmitted, what the new SuperLink says about it is moot.
            self._resubmit_pending = self.run_active
        # The SuperLink is gone; its SuperExec and ServerApp (PIDs seen while it ran) go
        # the same way, without a goodbye: a ServerApp told to stop would mark the registry's
        # run failed, and the resubmitted run could not resume it.
        if self.superlink.process is not None:
            self.superlink.process.kill_tree()
        self._start_superlink()

    def _restart_web(self) -> None:
        self.web.stop()
        self.web.start()

    def resubmit_after_restart(self) -> None:
        """Hook after a SuperLink restart: a restarted SuperLink has lost the running run.

        The run is submitted again; the aggregator resumes the registry's unfinished run
        from its newest released version (:meth:`cloud.aggregator.Aggregator._resume_point`),
        so no round is repeated.
        """
        with self._lock:
            active = self.run_active and self.flower_run_id is not None
        if not active:
            return
        old = self.flower_run_id
        try:
            new = self.submit_run()
        finally:
            with self._lock:
                self._resubmit_pending = False
        logger.warning("SuperLink restarted: run resubmitted as Flower run %s (was %s)", new, old)

    def _record_part_event(self, part: str, kind: str, detail: str) -> None:
        if self.registry is None:
            return
        from protos.codec import DeviceEvent

        self.registry.record_event(
            DeviceEvent(
                device_id=CLOUD_EVENT_SOURCE,
                timestamp_ms=int(time.time() * 1000),
                kind=f"{part} {kind}",
                detail=detail[-500:],
            )
        )

    def _sync_supernodes(self) -> None:
        """Register keys of devices flashed (and unregister revoked ones) while we were down."""
        from devices.secure_fleet import (
            SecureFleet,
            sync_supernode_registrations,
            unregister_supernode,
        )

        sf = SecureFleet.load(self.data_dir)
        link = self.superlink
        assert link is not None
        changed = sync_supernode_registrations(
            sf,
            register=link.register_supernode,
            unregister=lambda node_id: unregister_supernode(link, node_id),
        )
        if changed:
            logger.info("SuperNode registrations brought up to date: %s", changed)

    def _start_monitor(self) -> None:
        from cloud.fleet_monitor import FleetMonitor

        s = self.runtime_settings
        password = None
        if s.broker.password_file is not None:
            password = Path(s.broker.password_file).read_text().strip()
        from cloud.telemetry import TelemetryGate, enrolled_devices

        secure = (self.data_dir / "secure.json").exists()
        gate = TelemetryGate(
            self.registry, known=enrolled_devices(self.data_dir) if secure else None
        )
        self.telemetry = gate

        def on_statuses(statuses: list[Any]) -> None:
            try:
                gate.on_statuses(statuses)
            except Exception:
                logger.exception("could not record %d device statuses", len(statuses))

        def on_events(events: list[Any]) -> None:
            try:
                gate.on_events(events)
            except Exception:
                logger.exception("could not record %d device events", len(events))
            if self.signer is not None:  # staged rollouts count the devices' checks
                try:
                    self.signer.signer.rollout.on_events(events)
                except Exception:
                    logger.exception("the rollout controller failed on %d events", len(events))

        self.monitor = FleetMonitor(
            host=connect_host(s.broker.host),
            port=s.broker.port,
            fleet=s.cloud.fleet,
            on_status_batch=on_statuses,
            on_event_batch=on_events,
            username=s.broker.username,
            password=password,
            ca_file=None if s.broker.ca_file is None else str(s.broker.ca_file),
        ).start()

    def _start_web(self) -> None:
        from cloud.web.app import create_app
        from cloud.web.server import WebServer

        s = self.settings
        app = create_app(
            self.registry,
            operator_token=read_token(s),
            fleet=s.cloud.fleet,
            actions=CloudActions(self),
            rollouts=None if self.signer is None else self.signer.signer.rollout,
        )
        self.web = WebServer(app, host=s.web.host, port=s.web.port)
        url = self.web.start()
        (self.data_dir / "web.url").write_text(url)

    # -- runs ------------------------------------------------------------------------------

    def submit_run(self, *, app_dir: Path | None = None) -> str:
        """Submit the edgefl Flower App (or ``app_dir``) to the SuperLink and approve the run.

        Returns Flower's run id. ``app_dir`` exists for the benchmark of the old device
        design (``benchmarks/legacy_flower_app``).
        """
        if self.superlink is None:
            raise StackError("the SuperLink is not running")
        run_config = f'cloud-config="{self.runtime_path}"'
        if self.num_rounds:
            run_config += f" num-rounds={self.num_rounds}"
        run_id = self.superlink.submit(app_dir or APP_DIR, run_config)
        with self._lock:
            self.flower_run_id = run_id
            self.run_active = True
        self._approve_run(int(self.flower_run_id))
        logger.info("submitted Flower run %s", self.flower_run_id)
        return self.flower_run_id

    def _approve_run(self, run_id: int) -> None:
        """Sign the fleet's approval of ``run_id`` and leave it for the ServerApp.

        Devices execute only messages that carry it (:mod:`edge.run_approval`); this
        process submitted the run, so it is the one that vouches for it.
        """
        from edge.run_approval import sign_approval, write_approval
        from protos import signing

        if self.signer is not None:
            key = self.signer.signer.key
        else:
            key = signing.load_private_key(self.settings.signing.private_key)
        write_approval(self.data_dir, sign_approval(key, self.settings.cloud.fleet, run_id))

    def active_run(self) -> tuple[str, str] | None:
        """(Flower run id, status) of the submitted run while Flower has not finished it."""
        with self._lock:
            active, run_id = self.run_active, self.flower_run_id
        if not active or run_id is None:
            return None
        status = self.run_status()
        return None if status.startswith("finished") else (run_id, status)

    def run_status(self) -> str:
        """Flower's status of the submitted run: pending, starting, running, finished:…"""
        if self.superlink is None or self.flower_run_id is None:
            return "none"
        return self.superlink.run_status(self.flower_run_id)

    def stop_run(self) -> None:
        """Stop the run; the registry marks it ``stopped``, so no later `cloud up` resumes it."""
        with self._lock:
            self.run_active = False
        if self.superlink is not None and self.flower_run_id is not None:
            try:
                self.superlink.stop_run(self.flower_run_id)
            except FlowerError as exc:  # already finished, or the SuperLink is away
                logger.warning("flwr stop of run %s: %s", self.flower_run_id, exc)
        if self.registry is not None:
            run = self.registry.latest_run()
            if run is not None and run.status in ("running", "interrupted"):
                self.registry.finish_run(run.id, "stopped")

    def wait_for_run(self, *, timeout: float | None = None, on_progress: Any = None) -> str:
        """Poll until the Flower run finishes; returns its final status.

        A SuperLink that dies meanwhile is restarted by the watchdog and the run
        resubmitted (:meth:`resubmit_after_restart`); only a watchdog that gave up ends
        the wait early, with :class:`StackError`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                status = self._settled_status()
                if status.startswith("finished"):
                    return status
                if self.watchdog.failed.is_set():
                    raise StackError(self.watchdog.failure)
                if deadline is not None and time.monotonic() > deadline:
                    raise StackError(
                        f"run {self.flower_run_id} still {status} after {timeout:.0f}s"
                    )
                if on_progress is not None:
                    on_progress()
                time.sleep(2.0)
        finally:
            with self._lock:
                self.run_active = False

    def _settled_status(self) -> str:
        """The run's status, or ``restarting`` while the SuperLink is down or being replaced."""
        with self._lock:
            run_id, pending = self.flower_run_id, self._resubmit_pending
        link = self.superlink
        if pending or link is None or not _process_alive(link.process):
            return "restarting"
        status = self.run_status()
        with self._lock:
            if self._resubmit_pending or self.flower_run_id != run_id:
                return "restarting"
        return status

    # -- stop ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every part started so far (children by PID), then release the data dir."""
        with interrupts_ignored():
            self.watchdog.stop()
            self._stopping.set()
            if self._refusal_watch is not None:
                self._refusal_watch.join(timeout=10)
            for name, part in (("web", self.web), ("monitor", self.monitor)):
                if part is not None:
                    try:
                        part.stop()
                    except Exception:
                        logger.exception("stopping the %s failed", name)
            if self.proxy is not None:
                self.proxy.stop()
            if self.superlink is not None:
                self.superlink.stop()
            if self.broker is not None:
                self.broker.stop()
            if self.signer is not None:
                self.signer.stop()
            if self.registry is not None:
                self.registry.close()
            self.lock.release()

    def __enter__(self) -> CloudStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _process_alive(process: ManagedProcess | None) -> bool:
    if process is None or not process.alive():
        return False
    # Flower's SuperLink starts SuperExec and ServerApp processes later on: remember them,
    # so that a restart after the SuperLink died can still stop them by PID.
    process.remember_descendants()
    return True


def _exit_text(process: ManagedProcess | None) -> str:
    if process is None:
        return "not started"
    code = process.returncode()
    return "running" if code is None else f"exit code {code}"


# --- cloud init -------------------------------------------------------------------------


def init_cloud(
    directory: Path,
    *,
    fleet: str = cloud_config.DEFAULT_FLEET,
    arch: str = "mlp",
    secure: bool = False,
    hosts: list[str] | None = None,
    force: bool = False,
    model_dir: Path | None = None,
    broker_port: int | None = None,
    superlink_port: int | None = None,
    web_port: int | None = None,
) -> Path:
    """Create ``directory/cloud.toml`` and everything it points at; returns the file.

    Keys are created with mode 0600. ``model_dir`` reuses an already built model
    (model.tflite + card.json) instead of building one with TensorFlow. Ports left
    ``None`` are 0 (a free port at every start: tests and the demo) in a plain cloud, and
    the secure fleet's fixed ports with ``secure``; ``edgefl cloud init`` passes the fixed
    defaults of :mod:`cloud.ports`.
    """
    import shutil

    from protos import signing

    directory = directory.resolve()
    conf = directory / "cloud.toml"
    if conf.exists() and not force:
        raise StackError(f"{conf} exists; pass --force to overwrite it (keys are kept)")
    data = directory / "data"
    settings = cloud_config.CloudSettings()
    settings.cloud.data_dir = data
    settings.cloud.fleet = fleet
    settings.model.dir = data / "model"
    settings.signing.private_key = data / "keys" / "signing.pem"
    settings.signing.public_key = data / "keys" / "signing.pub"
    settings.web.operator_token_file = data / "keys" / "operator-token"
    settings.broker.port = broker_port or 0
    settings.superlink.port = superlink_port or 0
    settings.web.port = web_port or 0
    settings.validate()

    if not settings.signing.private_key.exists():
        key = signing.generate_private_key()
        signing.write_private_key(key, settings.signing.private_key)
        signing.write_public_key(key.public_key(), settings.signing.public_key)
    token_file = settings.web.operator_token_file
    if not token_file.exists():
        token_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")

    if not (settings.model.dir / "card.json").exists():
        if model_dir is not None:
            settings.model.dir.mkdir(parents=True, exist_ok=True)
            for name in ("model.tflite", "card.json"):
                shutil.copyfile(model_dir / name, settings.model.dir / name)
        else:
            from cloud.authoring.build import build_model

            input_shape = (8, 8, 1) if arch == "cnn" else (64,)
            with native_stderr_to(data / "logs" / "model-build.log"):
                build_model(arch, input_shape, 10, out=settings.model.dir)  # type: ignore[arg-type]
    with native_stderr_to(data / "logs" / "model-build.log"):
        write_initial_package(settings)

    if secure:
        apply_secure_fleet(
            settings,
            hosts or ["127.0.0.1", "localhost"],
            broker_port=broker_port,
            superlink_port=superlink_port,
        )

    directory.mkdir(parents=True, exist_ok=True)
    conf.write_text(cloud_config.to_toml(settings))
    return conf


@contextlib.contextmanager
def native_stderr_to(path: Path) -> Iterator[None]:
    """Send what native code (TensorFlow Lite's converter, XNNPACK) writes to stderr into
    ``path`` meanwhile, unless the command runs with -v (logging at INFO or finer)."""
    if logging.getLogger().getEffectiveLevel() <= logging.INFO:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def apply_secure_fleet(
    settings: CloudSettings,
    hosts: list[str],
    *,
    broker_port: int | None = None,
    superlink_port: int | None = None,
) -> None:
    """Make (or complete) the fleet PKI and point ``settings`` at it.

    Devices carry the broker and SuperLink ports in their bundles, so a secure fleet
    uses fixed ports instead of free ones.
    """
    from devices.secure_fleet import init_secure

    ports: dict[str, int] = {}
    if broker_port:
        ports["broker_port"] = broker_port
    if superlink_port:
        ports["superlink_port"] = superlink_port
    sf = init_secure(
        settings.data_dir,
        fleet=settings.cloud.fleet,
        hosts=hosts,
        **ports,
        signing_private_key=settings.signing.private_key,
        signing_public_key=settings.signing.public_key,
    )
    b = settings.broker
    b.port = sf.broker_port
    b.username = sf.cloud_username
    b.password_file = sf.cloud_password_file
    b.ca_file = sf.ca_cert
    b.certfile = sf.broker_certfile
    b.keyfile = sf.broker_keyfile
    b.broker_password_file = sf.broker_password_file
    b.acl_file = sf.acl_file
    link = settings.superlink
    link.port = sf.superlink_port
    link.certfile = sf.superlink_certfile
    link.keyfile = sf.superlink_keyfile
    link.ca_certfile = sf.ca_cert
    link.supernode_auth = True
    if len(hosts) and hosts[0] not in ("127.0.0.1", "localhost"):
        # Devices reach the cloud over the network: listen beyond loopback.
        b.host = link.host = "0.0.0.0"


def write_initial_package(settings: CloudSettings) -> Path:
    """``data_dir/initial.pkg``: the untrained model, flashed onto new devices."""
    from cloud.releases import package_weights
    from edge.litert_model import LiteRTModel

    model = LiteRTModel.load(settings.model.dir)
    _, data = package_weights(settings.model.dir, model.get_weights())
    path = settings.data_dir / "initial.pkg"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


__all__ = [
    "CloudActions",
    "CloudError",
    "CloudStack",
    "FlowerError",
    "StackError",
    "init_cloud",
    "read_token",
]
