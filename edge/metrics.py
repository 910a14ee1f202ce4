"""Prometheus metrics of one device's edge process, served over HTTP at ``/metrics``.

Each :class:`~edge.node.EdgeNode` owns a :class:`DeviceMetrics` (its own
``CollectorRegistry``, so several nodes in one process never mix their figures). The
rest of the edge code reports through small hooks:

- the gRPC server runs :meth:`DeviceMetrics.interceptor`, which times every
  ``ModelInfer`` call and labels it with the model version served when it started
  (a call that is refused before any model is served is labelled ``none``);
- the node reports fits (:meth:`DeviceMetrics.observe_fit`) and the agent release
  outcomes (:meth:`DeviceMetrics.release_event`);
- local samples, the served version and the process's memory are read at scrape time.

``[metrics]`` in ``edge.toml`` says where the endpoint listens (loopback and a free
port by default; the bound port is written to ``data_dir/metrics.port``). Metric
names (every one starts with ``edgefl_device_``, plus the client's standard
``process_*``)::

    edgefl_device_inference_requests_total{model_version, outcome}   counter
    edgefl_device_inference_duration_seconds{model_version}          histogram
    edgefl_device_releases_total{outcome}                            counter
    edgefl_device_training_duration_seconds                          histogram (one per Fit)
    edgefl_device_training_rounds_total                              counter
    edgefl_device_local_samples                                      gauge
    edgefl_device_training                                           gauge (1 while a Fit runs)
    edgefl_device_serving_version                                    gauge
    process_resident_memory_bytes, process_cpu_seconds_total ...     (Linux /proc)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

logger = logging.getLogger(__name__)

#: The one RPC whose calls are counted and timed.
MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
#: Label of requests answered while no model was served.
NO_MODEL = "none"
#: Inference latency buckets (seconds): a batch-1 MLP answers in about 1 ms.
INFERENCE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
#: Training time buckets (seconds per Fit).
TRAINING_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Values of the ``outcome`` label of ``edgefl_device_releases_total`` (agent event kinds).
RELEASE_OUTCOMES = ("release_installed", "release_rejected", "install_failed", "chunk_rejected")


class DeviceMetrics:
    """The metrics of one edge node; thread-safe (prometheus_client locks each value)."""

    def __init__(
        self,
        *,
        local_samples: Callable[[], int] = lambda: 0,
        serving_version: Callable[[], int] = lambda: 0,
        training: Callable[[], bool] = lambda: False,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.inference_requests = Counter(
            "edgefl_device_inference_requests",
            "ModelInfer calls answered, by model version and outcome (ok or error).",
            ["model_version", "outcome"],
            registry=self.registry,
        )
        self.inference_duration = Histogram(
            "edgefl_device_inference_duration_seconds",
            "Time to answer one ModelInfer call, by the model version that answered.",
            ["model_version"],
            buckets=INFERENCE_BUCKETS,
            registry=self.registry,
        )
        self.releases = Counter(
            "edgefl_device_releases",
            "Release outcomes seen by the MQTT agent: installed, rejected (bad manifest "
            "or signature, replay, floor), install failed, chunk rejected.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in RELEASE_OUTCOMES:
            self.releases.labels(outcome=outcome)
        self.training_duration = Histogram(
            "edgefl_device_training_duration_seconds",
            "Wall time of one local training (one Fit, i.e. one round) on this device.",
            buckets=TRAINING_BUCKETS,
            registry=self.registry,
        )
        self.training_rounds = Counter(
            "edgefl_device_training_rounds",
            "Successful local trainings (Fit calls).",
            registry=self.registry,
        )
        self.last_training_round = Gauge(
            "edgefl_device_last_training_round",
            "Server round of the last successful local training (0 before any).",
            registry=self.registry,
        )
        samples = Gauge(
            "edgefl_device_local_samples",
            "Samples in the device's local training store.",
            registry=self.registry,
        )
        samples.set_function(lambda: float(local_samples()))
        busy = Gauge(
            "edgefl_device_training",
            "1 while a local training (Fit) runs on this device, else 0.",
            registry=self.registry,
        )
        busy.set_function(lambda: 1.0 if training() else 0.0)
        version = Gauge(
            "edgefl_device_serving_version",
            "Model version being served (0 when none).",
            registry=self.registry,
        )
        version.set_function(lambda: float(serving_version()))
        self._serving_version = serving_version
        self._server: Any = None
        self._server_thread: threading.Thread | None = None

    # -- hooks -----------------------------------------------------------------------------

    def observe_inference(self, model_version: str, seconds: float, *, ok: bool) -> None:
        version = model_version or NO_MODEL
        self.inference_requests.labels(model_version=version, outcome="ok" if ok else "error").inc()
        self.inference_duration.labels(model_version=version).observe(seconds)

    def observe_fit(self, seconds: float, server_round: int) -> None:
        self.training_duration.observe(seconds)
        self.training_rounds.inc()
        if server_round > 0:
            self.last_training_round.set(server_round)

    def release_event(self, kind: str) -> None:
        """Count an agent event; kinds other than release outcomes are ignored."""
        if kind in RELEASE_OUTCOMES:
            self.releases.labels(outcome=kind).inc()

    def interceptor(self) -> grpc.ServerInterceptor:
        """A server interceptor that counts and times ``ModelInfer`` calls."""
        return _InferenceInterceptor(self)

    # -- endpoint ----------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) in a daemon thread; the port."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server, self._server_thread = server, thread
        bound = int(server.server_port)
        logger.info("metrics served on http://%s:%d/metrics", host, bound)
        return bound

    def stop(self) -> None:
        """Stop the HTTP endpoint (if serving)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        thread, self._server_thread = self._server_thread, None
        if thread is not None:
            thread.join(timeout=5)


class _InferenceInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: DeviceMetrics) -> None:
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if (
            handler is None
            or handler_call_details.method != MODEL_INFER_METHOD  # type: ignore[attr-defined]
            or handler.unary_unary is None
        ):
            return handler
        inner = handler.unary_unary
        metrics = self._metrics

        def timed(request: Any, context: grpc.ServicerContext) -> Any:
            # ModelInfer is served as raw bytes (edge.inference_service): the version
            # label is the one served when the call starts, i.e. the model it is given.
            version = _version_label(metrics._serving_version())
            started = time.perf_counter()
            try:
                response = inner(request, context)
            except BaseException:
                metrics.observe_inference(version, time.perf_counter() - started, ok=False)
                raise
            metrics.observe_inference(version, time.perf_counter() - started, ok=True)
            return response

        return grpc.unary_unary_rpc_method_handler(
            timed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _version_label(version: int) -> str:
    return str(version) if version > 0 else NO_MODEL
