"""Keep the parts of the cloud running: restart a part that died, with backoff.

A :class:`SupervisedPart` is anything ``cloud up`` starts (Mosquitto, the SuperLink,
the web UI, a reverse proxy…), described by two callables: ``alive()`` and
``restart()``. A :class:`Watchdog` thread looks at every part twice a second; a part
that is not alive is restarted after a backoff that doubles with each failure
(``RestartPolicy``), and every death and restart is reported through ``on_event`` (the
cloud records it in the registry, where the UI's event list shows it). A part that
dies more than ``max_restarts`` times within ``window_s`` is given up on: the
watchdog stops and :attr:`Watchdog.failure` says why, which ``cloud up`` turns into a
clear message and a non-zero exit.

To supervise a new part, build a ``SupervisedPart`` for it and pass it to
:meth:`Watchdog.add`; nothing else needs to know about it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: Seconds between two looks at the parts.
DEFAULT_CHECK_INTERVAL_S = 0.5


@dataclass(frozen=True)
class RestartPolicy:
    #: Wait before the first restart of a part; doubles with every further failure.
    backoff_initial_s: float = 0.5
    #: The longest wait between two restarts.
    backoff_max_s: float = 30.0
    #: Restarts allowed within ``window_s``; one more failure gives up.
    max_restarts: int = 5
    window_s: float = 300.0

    def backoff(self, failures: int) -> float:
        """Seconds to wait before restarting after the ``failures``-th recent failure."""
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, failures - 1))


#: ``on_event(part, kind, detail)``; kinds: ``died``, ``restarted``, ``restart-failed``,
#: ``gave-up``.
EventSink = Callable[[str, str, str], None]


@dataclass
class SupervisedPart:
    """One part of the cloud the watchdog keeps alive."""

    name: str
    alive: Callable[[], bool]
    restart: Callable[[], None]
    #: A short explanation of why the part is down (exit code, log tail), for messages.
    describe_exit: Callable[[], str] = lambda: ""
    #: Called after every successful restart (e.g. resubmit a run to a new SuperLink).
    after_restart: list[Callable[[], None]] = field(default_factory=list)
    failures: deque[float] = field(default_factory=deque)
    restarts: int = 0


class Watchdog:
    """Restarts dead parts in a background thread; see the module docstring."""

    def __init__(
        self,
        *,
        policy: RestartPolicy | None = None,
        on_event: EventSink | None = None,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
    ) -> None:
        self.policy = policy or RestartPolicy()
        self.on_event = on_event
        self.check_interval_s = check_interval_s
        self.parts: list[SupervisedPart] = []
        #: Set when the watchdog gave up on a part; :attr:`failure` says why.
        self.failed = threading.Event()
        self.failure = ""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, part: SupervisedPart) -> SupervisedPart:
        with self._lock:
            self.parts.append(part)
        return part

    def part(self, name: str) -> SupervisedPart:
        with self._lock:
            for p in self.parts:
                if p.name == name:
                    return p
        raise KeyError(name)

    def start(self) -> Watchdog:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="cloud-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (before the parts are stopped on purpose)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        self._thread = None

    def _emit(self, part: str, kind: str, detail: str) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(part, kind, detail)
        except Exception:
            logger.exception("recording the %s event of %s failed", kind, part)

    def _loop(self) -> None:
        while not self._stop.wait(self.check_interval_s):
            with self._lock:
                parts = list(self.parts)
            for part in parts:
                if self._stop.is_set():
                    return
                try:
                    down = not part.alive()
                except Exception:
                    logger.exception("checking %s failed", part.name)
                    down = True
                if down and not self._heal(part):
                    return

    def _heal(self, part: SupervisedPart) -> bool:
        """Restart ``part`` until it runs; False when the watchdog gives up."""
        while not self._stop.is_set():
            now = time.monotonic()
            part.failures.append(now)
            while part.failures and part.failures[0] < now - self.policy.window_s:
                part.failures.popleft()
            why = _safe(part.describe_exit)
            if len(part.failures) > self.policy.max_restarts:
                self.failure = (
                    f"the {part.name} died {len(part.failures)} times within "
                    f"{self.policy.window_s:.0f}s; giving up" + (f": {why}" if why else "")
                )
                logger.error("%s", self.failure)
                self._emit(part.name, "gave-up", self.failure)
                self.failed.set()
                return False
            delay = self.policy.backoff(len(part.failures))
            logger.warning(
                "the %s is down%s; restarting it in %.1fs",
                part.name,
                f" ({why})" if why else "",
                delay,
            )
            self._emit(part.name, "died", why)
            if self._stop.wait(delay):
                return True
            try:
                part.restart()
            except Exception as exc:
                logger.warning("restarting the %s failed: %s", part.name, exc)
                self._emit(part.name, "restart-failed", str(exc)[:500])
                continue
            part.restarts += 1
            logger.warning("the %s was restarted (restart %d)", part.name, part.restarts)
            self._emit(part.name, "restarted", f"restart {part.restarts}")
            for hook in part.after_restart:
                try:
                    hook()
                except Exception:
                    logger.exception("after restarting the %s: a follow-up step failed", part.name)
            return True
        return True


def _safe(func: Callable[[], str]) -> str:
    try:
        return func()
    except Exception:
        return ""


@contextlib.contextmanager
def interrupts_ignored() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM meanwhile (in the main thread): stopping children by PID
    must not be cut short by a second Ctrl-C. Every stop it guards is time-bounded."""
    saved: list[tuple[signal.Signals, Any]] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            saved.append((sig, signal.signal(sig, signal.SIG_IGN)))
    try:
        yield
    finally:
        for sig, handler in saved:
            signal.signal(sig, handler)
