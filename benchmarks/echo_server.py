"""The transport floor of the inference benchmark: a gRPC service that echoes bytes.

``python -m benchmarks.echo_server PORT`` serves ``/edgefl.bench.Echo/Echo`` on
``127.0.0.1:PORT`` (a generic handler, no (de)serialization: the request bytes are the
response) with a thread pool as large as the device server's, until SIGTERM. It imports
nothing but grpcio, so its RSS and start time are those of a bare gRPC Python process.
"""

from __future__ import annotations

import signal
import sys
import threading
from concurrent import futures

import grpc

SERVICE = "edgefl.bench.Echo"
METHOD = f"/{SERVICE}/Echo"
WORKERS = 8
"""edge.server uses ``max(8, serving_threads + 6)`` workers: 8 with the default 2 threads."""


def _echo(request: bytes, _context: grpc.ServicerContext) -> bytes:
    return request


def serve(port: int) -> None:
    """Serve the echo method on loopback ``port`` until SIGTERM or SIGINT."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS))
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"echo: cannot bind 127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"echo: serving on 127.0.0.1:{port}", flush=True)
    stop.wait()
    server.stop(0.5).wait()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
