"""The one place logging handlers are configured: :func:`configure_logging`.

Library modules only ever call ``logging.getLogger(__name__)``; entry points (the
``edgefl`` command line, ``python -m edge.server``, ``python -m cloud.authoring.build``,
the benchmarks) call :func:`configure_logging` once, before they do anything else.
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""Every edgefl process logs lines of this form to stderr."""


def level_for(verbosity: int) -> int:
    """``-v`` count → level: none WARNING, one INFO, more DEBUG."""
    return logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG


def configure_logging(verbosity: int = 0) -> None:
    """Log to stderr at the level of ``verbosity`` (the count of ``-v``).

    Without ``-v``, TensorFlow's and absl's start-up lines (CPU features, SavedModel
    loading, ...) are noise to an operator: their variables are set (unless set already)
    before anything imports TensorFlow, and are inherited by the children we start.
    """
    if verbosity <= 0:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
        logging.getLogger("absl").setLevel(logging.ERROR)
    logging.basicConfig(level=level_for(verbosity), format=FORMAT, stream=sys.stderr)
