"""Logging handlers are configured in one function, called by entry points only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_no_module_but_logging_config_configures_handlers() -> None:
    offenders = []
    for folder in ("edge", "cloud", "devices", "protos", "benchmarks", "scripts"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            if path == REPO_ROOT / "edge" / "logging_config.py":
                continue
            text = path.read_text(encoding="utf-8")
            if "basicConfig(" in text or "addHandler(" in text or "dictConfig(" in text:
                offenders.append(str(path.relative_to(REPO_ROOT)))
    assert offenders == []


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from edge.logging_config import configure_logging\n" + code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_configure_logging_levels_and_quiet_tensorflow() -> None:
    res = _python(
        "import logging, os\n"
        "configure_logging(1)\n"
        "assert logging.getLogger().level == logging.INFO\n"
        "assert 'TF_CPP_MIN_LOG_LEVEL' not in os.environ\n"
        "logging.getLogger('edge.x').info('hello %s', 'there')\n"
    )
    assert res.returncode == 0, res.stderr
    assert " INFO edge.x: hello there" in res.stderr and res.stdout == ""
    res = _python(
        "import logging, os\n"
        "configure_logging(0)\n"
        "assert logging.getLogger().level == logging.WARNING\n"
        "assert os.environ['TF_CPP_MIN_LOG_LEVEL'] == '3'\n"
    )
    assert res.returncode == 0, res.stderr
