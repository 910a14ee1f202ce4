"""The operator web UI and JSON API: :func:`create_app` and :class:`WebServer`."""

from cloud.web.app import ActionError, WebActions, build_overview, create_app
from cloud.web.server import WebServer, WebServerError, serve_in_thread

__all__ = [
    "ActionError",
    "WebActions",
    "WebServer",
    "WebServerError",
    "build_overview",
    "create_app",
    "serve_in_thread",
]
