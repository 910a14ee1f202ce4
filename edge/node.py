"""The device: model store, serving model, trainer and local data, wired together.

:class:`EdgeNode` is what the gRPC servicers and the MQTT agent talk to. At
:meth:`EdgeNode.start` it serves the store's current version if there is one, else
installs ``[model] initial_package`` if configured, else stays not ready until the
first release arrives through :meth:`EdgeNode.install_release`.

Installing a release: verify the digest, decode the package and build + warm a new
serving model (nothing is persisted yet), store it atomically, then swap it in. Any
failure raises :class:`~edge.errors.InstallError` and the previous version keeps serving.

Directories under ``[device] data_dir``: ``models/`` (the :class:`ModelStore`, with the
node state ``state.json``), ``samples/`` (the :class:`LocalData` log), ``grpc.port``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

from edge.config import Settings
from edge.errors import EdgeError, InstallError, StoreError
from edge.local_data import LocalData, SampleSpec
from edge.metrics import DeviceMetrics
from edge.model_check import UnsafeModelError, check_isolated
from edge.model_store import ModelStore, StoredModel
from edge.serving import Serving, ServingModel
from edge.trainer_service import LocalTrainer
from protos import codec
from protos.errors import CodecError

logger = logging.getLogger(__name__)


class EdgeNode:
    """One device's state and behaviour, independent of any transport."""

    def __init__(self, settings: Settings) -> None:
        """Open the stores under ``settings.device.data_dir``; call :meth:`start` to serve."""
        self.settings = settings
        data_dir = Path(settings.device.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = ModelStore(data_dir / "models", keep=settings.model.keep_versions)
        self.data = LocalData(
            data_dir / "samples",
            capacity=settings.data.capacity,
            max_bytes=settings.data.max_mb * 2**20,
            reserved_bytes=self.store.disk_bytes,
        )
        self.serving = Serving(
            pool_size=settings.grpc.serving_threads,
            num_threads=settings.litert.threads,
            delegate=settings.litert.delegate,
        )
        self.trainer = LocalTrainer(
            self.serving,
            self.data,
            settings.training,
            holdout_fraction=settings.data.holdout_fraction,
            min_holdout=settings.data.min_holdout,
            on_fit=self._fit_done,
        )
        self.serving.add_listener(self._on_swap)
        self.metrics = DeviceMetrics(
            local_samples=lambda: len(self.data),
            serving_version=self.serving_version,
            training=lambda: self.trainer.busy,
        )
        self._install_lock = threading.Lock()
        self._updating = False
        self.last_error = ""
        self.last_metrics: dict[str, float] = {}

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Serve the stored current version, or install the initial package, or wait."""
        stored: StoredModel | None = None
        try:
            stored = self.store.current()
        except EdgeError as exc:
            self._error(f"model store unusable: {exc}")
        if stored is not None:
            try:
                self.serving.load(stored.version, stored.package(), stored.sha256)
                return
            except (EdgeError, CodecError) as exc:
                self._error(f"stored version {stored.version} cannot be served: {exc}")
        initial = self.settings.model.initial_package
        if stored is None and initial is not None:
            try:
                data = Path(initial).read_bytes()
                self.install_release(1, data, codec.sha256_hex(data))
                return
            except (OSError, EdgeError) as exc:
                self._error(f"initial package {initial} not installed: {exc}")
        logger.warning("no model to serve yet; waiting for a release")

    @property
    def ready(self) -> bool:
        """Whether a model is being served."""
        return self.serving.current is not None

    def serving_version(self) -> int:
        """The version being served (0 when none)."""
        return self.serving.version

    # -- releases -----------------------------------------------------------------------
    def install_release(self, version: int, data: bytes, sha256: str) -> None:
        """Verify, store and serve a release; on any failure raise InstallError and keep serving."""
        with self._install_lock:
            self._updating = True
            try:
                actual = codec.sha256_hex(data)
                if actual != sha256.lower():
                    raise InstallError(
                        f"release {version}: digest {actual[:12]}… differs from announced {sha256[:12]}…"
                    )
                try:
                    package = codec.package_from_bytes(data)
                except CodecError as exc:
                    raise InstallError(f"release {version}: {exc}") from exc
                try:
                    check_isolated(package.tflite, package.card_json)
                except UnsafeModelError as exc:
                    raise InstallError(f"release {version}: {exc}") from exc
                model = self.serving.build(version, package, actual)
                try:
                    self.store.install(version, data, actual)
                except StoreError as exc:
                    raise InstallError(f"release {version}: {exc}") from exc
                self.serving.swap(model)
                self.last_error = ""
            except InstallError as exc:
                self._error(str(exc))
                raise
            finally:
                self._updating = False

    def stage_release(self, version: int, data: bytes, sha256: str) -> None:
        """Verify and store a candidate beside the served version, without serving it.

        The same checks as :meth:`install_release` (digest, package, isolation, a built
        and warmed model); any failure raises InstallError and nothing is stored.
        """
        with self._install_lock:
            actual = codec.sha256_hex(data)
            if actual != sha256.lower():
                raise InstallError(
                    f"candidate {version}: digest {actual[:12]}… differs from announced {sha256[:12]}…"
                )
            try:
                package = codec.package_from_bytes(data)
                check_isolated(package.tflite, package.card_json)
            except (CodecError, UnsafeModelError) as exc:
                raise InstallError(f"candidate {version}: {exc}") from exc
            self.serving.build(version, package, actual)  # InstallError when unusable
            try:
                self.store.stage(version, data, actual)
            except StoreError as exc:
                raise InstallError(f"candidate {version}: {exc}") from exc

    def has_version(self, version: int, sha256: str) -> bool:
        """Whether ``version`` is stored with that digest (staged or installed)."""
        return self.store.has(version, sha256)

    def check_candidate(self, version: int, served_version: int) -> dict[str, float]:
        """The shadow check: the stored candidate and the fleet's served version on the
        held-out part of the local samples (:meth:`LocalTrainer.check`).

        Returns ``candidate_accuracy``, ``served_accuracy``, ``candidate_loss`` and
        ``served_loss`` (each omitted when not finite), ``examples`` (held-out samples),
        ``inference_calls`` (calls per version, one per held-out sample),
        ``candidate_error_rate`` and ``served_error_rate`` (share of calls that raised or
        gave non-finite outputs) and ``train_examples`` (the samples Fit trains on). The
        served version's weights come from the store, or from the model being served
        when that version is no longer stored. Serving is not affected (the trainer's own
        interpreter checks); too few samples for a split raise NoHeldOutData.
        """
        try:
            candidate = self.store.get(version).package().weights
            if served_version and served_version in self.store.versions():
                served = self.store.get(served_version).package().weights
            else:
                served = self.serving.require().weights()
        except (EdgeError, CodecError) as exc:
            raise InstallError(f"candidate {version} cannot be checked: {exc}") from exc
        cand = self.trainer.check(candidate)
        base = self.trainer.check(served)
        figures = {
            "candidate_accuracy": cand.accuracy,
            "served_accuracy": base.accuracy,
            "candidate_loss": cand.loss,
            "served_loss": base.loss,
            "examples": float(cand.examples),
            "inference_calls": float(cand.examples),
            "candidate_error_rate": cand.error_rate,
            "served_error_rate": base.error_rate,
            "train_examples": float(cand.train_examples),
        }
        return {k: float(v) for k, v in figures.items() if math.isfinite(v)}

    def activate(self, version: int) -> None:
        """Serve the stored ``version`` (pin or roll back); InstallError keeps the current one."""
        with self._install_lock:
            self._updating = True
            try:
                try:
                    stored = self.store.get(version)
                    model = self.serving.build(version, stored.package(), stored.sha256)
                    self.store.activate(version)
                except (EdgeError, CodecError) as exc:
                    if isinstance(exc, InstallError):
                        raise
                    raise InstallError(f"cannot activate version {version}: {exc}") from exc
                self.serving.swap(model)
            except InstallError as exc:
                self._error(str(exc))
                raise
            finally:
                self._updating = False

    def _on_swap(self, model: ServingModel) -> None:
        spec = SampleSpec(model.card.input_shape, model.card.classes)
        try:
            self.data.set_spec(spec)
        except EdgeError as exc:
            self._error(str(exc))

    # -- node state ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Persisted node state (``sequence``: last accepted release, ``last_round``)."""
        return self.store.read_state()

    def read_state(self) -> dict[str, Any]:
        """The persisted node state (``{}`` on first start); same as :meth:`state`."""
        return self.store.read_state()

    def write_state(self, state: dict[str, Any]) -> None:
        """Replace the persisted node state durably (atomic JSON file)."""
        self.store.write_state(state)

    def update_state(self, **values: Any) -> None:
        """Merge ``values`` into the persisted node state."""
        state = self.store.read_state()
        state.update(values)
        self.store.write_state(state)

    def _fit_done(self, server_round: int, metrics: dict[str, float]) -> None:
        self.metrics.observe_fit(float(metrics.get("seconds", 0.0)), server_round)
        self.last_metrics = dict(metrics)
        if server_round > 0:
            try:
                self.update_state(last_round=server_round)
            except EdgeError as exc:
                self._error(str(exc))

    def _error(self, message: str) -> None:
        logger.error("%s", message)
        self.last_error = message

    # -- status -------------------------------------------------------------------------
    def status(self) -> codec.DeviceStatus:
        """A snapshot of what the device is doing, for telemetry."""
        import psutil

        if self._updating:
            state = "UPDATING"
        elif self.trainer.busy:
            state = "TRAINING"
        elif self.ready:
            state = "SERVING"
        else:
            state = "DEGRADED"
        proc = psutil.Process()
        try:
            disk_free = psutil.disk_usage(str(self.store.root)).free
        except OSError:
            disk_free = 0
        from edge import version as edgefl_version

        return codec.DeviceStatus(
            device_id=self.settings.device.id,
            fleet=self.settings.device.fleet,
            serving_version=self.serving_version(),
            state=state,
            timestamp_ms=int(time.time() * 1000),
            last_round_trained=int(self.state().get("last_round", 0)),
            sample_count=len(self.data),
            cpu_percent=float(proc.cpu_percent(interval=None)),
            rss_bytes=int(proc.memory_info().rss),
            disk_free_bytes=int(disk_free),
            memory_available_bytes=int(psutil.virtual_memory().available),
            profile=self.settings.device.profile,
            last_error=self.last_error,
            last_metrics={k: float(v) for k, v in self.last_metrics.items()},
            edgefl_version=edgefl_version(),
        )
