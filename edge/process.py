"""Start, watch and stop child processes (Mosquitto, Flower, edgefl services).

A :class:`ManagedProcess` remembers its PID and every descendant it has seen (Flower's
SuperLink and SuperNode start ``flower-superexec`` children in new sessions, so a
process-group kill would miss them). :meth:`ManagedProcess.stop` sends SIGTERM, waits,
then SIGKILLs whatever is left, by PID. Used by the CLI supervisors and by the test
fixtures alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from edge.errors import EdgeError

logger = logging.getLogger(__name__)


class ProcessError(EdgeError, RuntimeError):
    """A child process that failed to start or to become ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def connect_host(host: str) -> str:
    """The address to connect to for a server bound to ``host``.

    A server listening on every interface (``0.0.0.0`` / ``::``) is reached locally
    through loopback, which the fleet's certificates always cover.
    """
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((connect_host(host), port), timeout=timeout):
            return True
    except OSError:
        return False


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for children: this interpreter's bin dir first on PATH.

    Flower's SuperLink/SuperNode start ``flower-superexec`` by name, which only works
    when the virtualenv's bin directory is on PATH.
    """
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        env["PATH"] = bindir + (os.pathsep + path if path else "")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


class ManagedProcess:
    """One child process with its log file, started by :meth:`start`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        """``die_with_parent``: the kernel sends the child SIGTERM when the thread that
        started it exits (Linux ``PR_SET_PDEATHSIG``), so a SIGKILLed supervisor leaves
        no orphan behind. Start such a child from a thread that lives as long as it should.
        """
        self.name = name
        self.die_with_parent = die_with_parent
        self.argv = list(argv)
        self.log_path = log_path
        self.env = tool_env(env)
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._descendants: set[int] = set()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ProcessError(f"{self.name} was not started")
        return self.proc.pid

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        logger.debug("starting %s: %s", self.name, " ".join(self.argv))
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        except FileNotFoundError as exc:
            raise ProcessError(f"cannot start {self.name}: {exc}") from exc
        finally:
            log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def remember_descendants(self) -> None:
        """Note the PIDs of the children the process has now, so :meth:`stop` reaches them
        even after the process itself has died (its children are then re-parented)."""
        self._remember_descendants()

    def _remember_descendants(self) -> None:
        if self.proc is None:
            return
        try:
            import psutil
        except ImportError:  # psutil comes with the edge extra; without it, PID only
            return
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self._descendants.add(child.pid)
        except psutil.Error:
            pass

    def wait_until(self, ready: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Poll ``ready()`` until true; raise with the log tail if the child dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ProcessError(
                    f"{self.name} exited with code {self.returncode()} before {what}:\n"
                    f"{self.log_tail()}"
                )
            if ready():
                self._remember_descendants()
                return
            time.sleep(0.1)
        raise ProcessError(f"{self.name} not {what} after {timeout:.0f}s:\n{self.log_tail()}")

    def wait_for_port(self, host: str, port: int, *, timeout: float = 30.0) -> None:
        self.wait_until(
            lambda: port_open(host, port), timeout=timeout, what=f"listening on {host}:{port}"
        )

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, *, timeout: float = 10.0) -> None:
        """SIGTERM the process and its descendants, wait, then SIGKILL what is left."""
        if self.proc is None:
            return
        self._remember_descendants()
        pids = [self.proc.pid, *sorted(self._descendants)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not exit after SIGTERM; killing it", self.name)
        deadline = time.monotonic() + 3.0
        for pid in pids:
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def kill_tree(self) -> None:
        """SIGKILL the process and every descendant at once: a power cut, no goodbyes."""
        if self.proc is None:
            return
        self._remember_descendants()
        for pid in [self.proc.pid, *sorted(self._descendants)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the process only (simulates a crash or power loss); children untouched."""
        self._remember_descendants()
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)  # type: ignore[union-attr]


_PR_SET_PDEATHSIG = 1
_SIGTERM = int(signal.SIGTERM)


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: no imports, no locks, just the syscall."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, _SIGTERM, 0, 0, 0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
