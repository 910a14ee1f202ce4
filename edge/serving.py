"""The model being served, and how a new version replaces it without dropping a request.

A LiteRT interpreter must not be used by two threads at once (wrong outputs, crashes),
so a :class:`ServingModel` owns a small pool of interpreters, each behind its own lock:
a request takes the first free one (a non-blocking try of each lock, no queue or
condition variable on the way), infers and releases it; when all are busy it waits on
one of them, chosen round-robin. At most ``pool_size`` inferences run at a time.

:class:`Serving` holds the one ``current`` :class:`ServingModel`. A swap builds and
warms the new model completely first (every interpreter created, weights restored, one
inference run) and only then replaces the reference, which is a single atomic
assignment. A request reads the reference once and keeps it, so an in-flight request
finishes on the model it started on, and its response names that model's version.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from edge.config import LITERT_DELEGATES
from edge.errors import InstallError, ModelNotLoaded, WeightMismatch
from edge.litert_model import LiteRTModel, ModelContractError, WeightMismatchError
from edge.model_card import ModelCard, ModelCardError
from protos.codec import ModelPackage

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ServingModel:
    """One version of the model, ready to serve: card, weights and an interpreter pool."""

    def __init__(
        self,
        version: int,
        package: ModelPackage,
        *,
        pool_size: int = 2,
        sha256: str = "",
        num_threads: int = 1,
        delegate: str = "xnnpack",
    ) -> None:
        """Build ``pool_size`` interpreters (``num_threads`` CPU threads each, LiteRT
        ``delegate``) holding the package's weights, and warm them.

        Raises :class:`InstallError` when the package's card, model or weights are unusable.
        """
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.version = version
        self.sha256 = sha256
        self.package = package
        try:
            self.card = ModelCard.from_json(package.card_json)
        except ModelCardError as exc:
            raise InstallError(f"version {version}: {exc}") from exc
        if self.card.architecture_id != package.architecture_id:
            raise InstallError(
                f"version {version}: package architecture {package.architecture_id!r} "
                f"differs from its card's {self.card.architecture_id!r}"
            )
        self._slots: list[tuple[threading.Lock, LiteRTModel]] = []
        self._turn = itertools.count()
        warm = np.zeros((1, *self.card.input_shape), dtype=np.float32)
        for _ in range(pool_size):
            try:
                model = LiteRTModel(
                    package.tflite, self.card, num_threads=num_threads, delegate=delegate
                )
                if package.weights:
                    model.set_weights(package.weights)
                model.infer(warm)
            except WeightMismatchError as exc:
                raise InstallError(f"version {version}: {WeightMismatch.wrap(exc)}") from exc
            except (ModelContractError, ValueError, RuntimeError) as exc:
                raise InstallError(f"version {version}: model unusable: {exc}") from exc
            self._slots.append((threading.Lock(), model))
        self.pool_size = pool_size

    def _on_interpreter(self, use: Callable[[LiteRTModel], T]) -> T:
        """``use(interpreter)`` on a pooled interpreter nobody else is using meanwhile."""
        for slot in self._slots:
            if slot[0].acquire(blocking=False):
                break
        else:
            slot = self._slots[next(self._turn) % len(self._slots)]
            slot[0].acquire()
        lock, model = slot
        try:
            return use(model)
        finally:
            lock.release()

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for ``x`` (``[batch, *input_shape]`` float32) on one pooled interpreter."""
        return self._on_interpreter(lambda model: model.infer(x))

    def infer_checked(self, xs: np.ndarray) -> np.ndarray:
        """:meth:`infer` for a batch already checked (see :meth:`LiteRTModel.infer_checked`)."""
        return self._on_interpreter(lambda model: model.infer_checked(xs))

    def weights(self) -> dict[str, np.ndarray]:
        """The weights being served (copies)."""
        return self._on_interpreter(LiteRTModel.get_weights)


class Serving:
    """The device-wide reference to the model being served, swapped atomically."""

    def __init__(self, pool_size: int = 2, num_threads: int = 1, delegate: str = "xnnpack") -> None:
        """Start with nothing to serve; ``pool_size`` interpreters per loaded version,
        each using ``num_threads`` CPU threads (``[litert] threads``) and ``delegate``
        (``[litert] delegate``)."""
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if delegate not in LITERT_DELEGATES:
            raise ValueError(f"delegate must be one of {LITERT_DELEGATES}, got {delegate!r}")
        self.pool_size = pool_size
        self.num_threads = num_threads
        self.delegate = delegate
        self._current: ServingModel | None = None
        self._swap_lock = threading.Lock()
        self._listeners: list[Callable[[ServingModel], object]] = []

    @property
    def current(self) -> ServingModel | None:
        """The model serving now (``None`` before the first load)."""
        return self._current

    @property
    def version(self) -> int:
        """The version serving now; 0 when nothing is loaded."""
        model = self._current
        return 0 if model is None else model.version

    def require(self) -> ServingModel:
        """The current model, or :class:`ModelNotLoaded`."""
        model = self._current
        if model is None:
            raise ModelNotLoaded("no model is loaded yet; waiting for the first release")
        return model

    def add_listener(self, callback: Callable[[ServingModel], object]) -> None:
        """Call ``callback(model)`` after every swap (from the swapping thread; what it
        returns is ignored)."""
        self._listeners.append(callback)

    def build(self, version: int, package: ModelPackage, sha256: str = "") -> ServingModel:
        """Build and warm a :class:`ServingModel` without serving it yet."""
        return ServingModel(
            version,
            package,
            pool_size=self.pool_size,
            sha256=sha256,
            num_threads=self.num_threads,
            delegate=self.delegate,
        )

    def swap(self, model: ServingModel) -> ServingModel | None:
        """Serve ``model`` from now on (it must be built); returns the previous one.

        In-flight requests keep the model they started with.
        """
        with self._swap_lock:
            previous, self._current = self._current, model
        logger.info(
            "serving version %d (was %s)",
            model.version,
            "none" if previous is None else previous.version,
        )
        for callback in list(self._listeners):
            try:
                callback(model)
            except Exception:
                logger.exception("serving listener failed")
        return previous

    def load(self, version: int, package: ModelPackage, sha256: str = "") -> ServingModel:
        """Build, warm and swap to ``package`` as ``version``."""
        model = self.build(version, package, sha256)
        self.swap(model)
        return model

    def infer(self, x: np.ndarray) -> tuple[int, np.ndarray]:
        """(version, probabilities) from the current model; :class:`ModelNotLoaded` if none."""
        model = self.require()
        return model.version, model.infer(x)
