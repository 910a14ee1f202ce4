"""Run the web app under uvicorn in a background thread and report the bound URL.

The listening socket is bound *before* uvicorn starts (port 0 picks a free port), so
the URL is known and correct even when several servers start at once. Stopping ends
every open server-sent event stream first, then asks uvicorn to exit and joins the
thread.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from cloud.errors import CloudError

logger = logging.getLogger(__name__)

#: Seconds uvicorn waits for open connections after being asked to stop.
GRACEFUL_SHUTDOWN_SECONDS = 3.0


class WebServerError(CloudError, RuntimeError):
    """The web server did not start (port taken, app failed to start up ...)."""


class WebServer:
    """A uvicorn server for one app on ``host:port`` (port 0 → a free port)."""

    def __init__(
        self,
        app: FastAPI,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
    ) -> None:
        self.app = app
        self.host = host
        self._requested_port = port
        self._log_level = log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        if not self.port:
            raise WebServerError("the web server is not running")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server thread is up and serving."""
        server, thread = self._server, self._thread
        return (
            server is not None
            and thread is not None
            and thread.is_alive()
            and bool(server.started)
            and not server.should_exit
        )

    def start(self, timeout: float = 15.0) -> str:
        """Bind, start serving in a daemon thread, wait until ready; returns the URL."""
        if self._thread is not None:
            return self.url
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._requested_port))
        except OSError as exc:
            sock.close()
            raise WebServerError(
                f"cannot listen on {self.host}:{self._requested_port}: {exc}"
            ) from exc
        sock.listen(128)
        # What the app protects depends on where it really listens (cloud.web.app).
        self.app.state.listen_host = self.host
        sock.setblocking(False)
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        # Started again after a stop (or a crash), the server keeps its address.
        self._requested_port = self.port
        stop_streams = getattr(self.app.state, "stop_streams", None)
        if isinstance(stop_streams, threading.Event):
            stop_streams.clear()
        config = uvicorn.Config(
            self.app,
            log_level=self._log_level,
            timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN_SECONDS),
            access_log=False,
            ws="none",
        )
        server = uvicorn.Server(config)
        self._server = server
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"web-{self.port}", daemon=True
        )
        self._thread = thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise WebServerError(f"the web server did not start within {timeout} s")
            time.sleep(0.02)
        logger.info("web UI listening on %s", self.url)
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """End event streams, stop uvicorn, join its thread, close the socket."""
        stop_streams = getattr(self.app.state, "stop_streams", None)
        if isinstance(stop_streams, threading.Event):
            stop_streams.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("web server thread did not stop within %s s", timeout)
                if self._server is not None:
                    self._server.force_exit = True
                self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self._thread = None
        self._server = None
        self._socket = None
        self.port = 0

    def __enter__(self) -> WebServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_in_thread(app: FastAPI, *, host: str = "127.0.0.1", port: int = 0) -> WebServer:
    """Start ``app`` on ``host:port`` in a background thread; ``.url`` is where it listens."""
    server = WebServer(app, host=host, port=port)
    server.start()
    return server
