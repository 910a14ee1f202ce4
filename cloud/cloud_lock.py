"""One cloud per data directory: an ``flock`` on ``data_dir/cloud.lock``.

``edgefl cloud up`` (and the demo) hold an exclusive lock on the file for as long as
they run and keep in it who they are: PID, start time and the addresses of the broker,
the SuperLink and the web UI. A second ``cloud up`` on the same data directory is
refused with a message naming the running one; ``cloud status`` and ``model pin`` find
the running cloud through the same file.

The kernel drops the lock when the holder exits, however it exits, so a crashed cloud
never leaves a stale lock: a file whose lock nobody holds means no cloud is running,
whatever it still says.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from cloud.errors import CloudError

LOCK_NAME = "cloud.lock"
#: Looks at a lock held by someone who has not said who they are, before refusing.
_ATTEMPTS = 5


class CloudRunningError(CloudError, RuntimeError):
    """Another cloud already runs on this data directory."""

    def __init__(self, info: CloudInfo, data_dir: Path) -> None:
        self.info = info
        super().__init__(
            f"a cloud is already running on {data_dir} ({info.describe()}); "
            "stop it first (Ctrl-C in its terminal, or kill "
            f"{info.pid}), or use another data directory"
        )


@dataclass
class CloudInfo:
    """What the holder of the lock writes about itself."""

    pid: int
    started_at: float
    #: ``broker``, ``superlink``, ``web`` → address, filled in as parts come up.
    urls: dict[str, str] = field(default_factory=dict)
    #: ``starting`` until every part runs, then ``running``.
    phase: str = "starting"

    def describe(self) -> str:
        parts = [f"pid {self.pid}", self.phase]
        parts += [f"{name} {url}" for name, url in sorted(self.urls.items())]
        return ", ".join(parts)

    @classmethod
    def from_text(cls, text: str) -> CloudInfo:
        try:
            doc: Any = json.loads(text)
            return cls(
                pid=int(doc["pid"]),
                started_at=float(doc.get("started_at", 0.0)),
                urls={str(k): str(v) for k, v in dict(doc.get("urls", {})).items()},
                phase=str(doc.get("phase", "running")),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            # The holder is between opening and writing: it is there, details unknown.
            return cls(pid=0, started_at=0.0, phase="starting")


def lock_path(data_dir: Path) -> Path:
    return data_dir / LOCK_NAME


class CloudLock:
    """The exclusive lock of one running cloud; :meth:`acquire` refuses a second one."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = lock_path(data_dir)
        self.info = CloudInfo(pid=os.getpid(), started_at=time.time())
        self._fh: IO[str] | None = None

    def acquire(self) -> CloudLock:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 - held open while the cloud runs
        try:
            for attempt in range(_ATTEMPTS):
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    fh.seek(0)
                    info = CloudInfo.from_text(fh.read())
                    # An empty file: a `cloud status` peeking (shared lock), or a holder
                    # that has not written yet; look again before refusing.
                    if info.pid or attempt == _ATTEMPTS - 1:
                        raise CloudRunningError(info, self.data_dir) from None
                    time.sleep(0.2)
        except BaseException:
            fh.close()
            raise
        self._fh = fh
        self._write()
        return self

    def update(self, *, phase: str | None = None, **urls: str) -> None:
        """Record a part's address (``web="http://…"``) or the phase."""
        if phase is not None:
            self.info.phase = phase
        self.info.urls.update(urls)
        self._write()

    def _write(self) -> None:
        if self._fh is None:
            return
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(json.dumps(asdict(self.info)))
        self._fh.flush()

    def release(self) -> None:
        if self._fh is None:
            return
        with contextlib.suppress(OSError):
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.flush()
        # Closing the file drops the lock.
        self._fh.close()
        self._fh = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def __enter__(self) -> CloudLock:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()


def running_cloud(data_dir: Path) -> CloudInfo | None:
    """The cloud that holds ``data_dir``'s lock now, or None when none runs."""
    path = lock_path(data_dir)
    try:
        fh = open(path)  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return CloudInfo.from_text(fh.read())
        # We got the lock, so nobody holds it: whatever the file says is stale.
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return None
