"""ModelStore: verified installs, current pointer, rollback, GC, state, crash safety."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.errors import DigestMismatch, InstallError, ModelNotFound
from edge.model_store import ModelStore
from protos.codec import sha256_hex
from tests.edge.helpers import REPO_ROOT, start_process, wait_for_line


def blob(version: int, size: int = 1000) -> bytes:
    return bytes([version % 256]) * size + version.to_bytes(4, "little")


def install(store: ModelStore, version: int) -> None:
    data = blob(version)
    store.install(version, data, sha256_hex(data))


def test_install_makes_the_version_current(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.current() is None
    install(store, 1)
    install(store, 2)
    current = store.current()
    assert current is not None
    assert (current.version, current.data) == (2, blob(2))
    assert store.versions() == [1, 2]
    assert store.get(1).data == blob(1)
    assert ModelStore(tmp_path).current().version == 2  # type: ignore[union-attr]


def test_digest_is_checked_before_anything_is_written(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(DigestMismatch, match="version 1"):
        store.install(1, blob(1), sha256_hex(b"something else"))
    assert list(tmp_path.iterdir()) == []


def test_same_version_with_other_bytes_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    install(store, 1)
    other = b"other bytes"
    with pytest.raises(InstallError, match="already stored"):
        store.install(1, other, sha256_hex(other))
    install(store, 1)  # the same bytes again are fine (idempotent)
    assert store.current().data == blob(1)  # type: ignore[union-attr]


def test_activate_and_rollback(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for v in (1, 2, 3):
        install(store, v)
    assert store.rollback().version == 2
    assert store.current().version == 2  # type: ignore[union-attr]
    assert store.activate(3).version == 3
    with pytest.raises(ModelNotFound, match="version 9"):
        store.activate(9)
    store.activate(1)
    with pytest.raises(ModelNotFound, match="older than 1"):
        store.rollback()


def test_garbage_collection_keeps_recent_versions_and_never_the_current(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, keep=2)
    for v in range(1, 6):
        install(store, v)
    assert store.versions() == [3, 4, 5]
    store.activate(3)  # pin an old version, then a new one arrives
    install(store, 6)
    assert store.versions() == [4, 5, 6]
    store.activate(4)
    install(store, 3)  # a pinned re-release of an old number is stored and current
    assert store.current().version == 3  # type: ignore[union-attr]
    assert 3 in store.versions()


def test_corrupt_current_falls_back_to_the_last_good_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ModelStore(tmp_path)
    install(store, 1)
    install(store, 2)
    path = store.get(2).path
    path.write_bytes(b"bit rot" + path.read_bytes()[7:])
    reopened = ModelStore(tmp_path)
    current = reopened.current()
    assert current is not None and current.version == 1
    assert "falling back to version 1" in caplog.text
    assert reopened.versions() == [1]
    assert reopened.current().version == 1  # type: ignore[union-attr]


def test_garbage_pointer_falls_back(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    install(store, 1)
    install(store, 2)
    (tmp_path / "current").write_text("not a pointer")
    assert ModelStore(tmp_path).current().version == 2  # type: ignore[union-attr]


def test_node_state_round_trips(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.read_state() == {}
    store.write_state({"release_sequence": 7, "last_round": 3})
    assert ModelStore(tmp_path).read_state() == {"release_sequence": 7, "last_round": 3}
    (tmp_path / "state.json").write_text("{torn")
    assert ModelStore(tmp_path).read_state() == {}


def test_disk_full_during_install_leaves_the_store_unchanged(tmp_path: Path) -> None:
    """A real full filesystem: a 256 KiB tmpfs in a private (user+mount) namespace."""
    root = tmp_path / "tiny"
    root.mkdir()
    script = (
        f"mount -t tmpfs -o size=256k tmpfs {root} && "
        f"exec {sys.executable} -m tests.edge.helpers enospc {root}"
    )
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    match = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
    assert match, f"helper failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    outcome = json.loads(match.group(1))
    assert outcome["error"] is not None and "disk full" in outcome["error"]
    assert outcome["current"] == 1 and outcome["current_ok"]
    assert outcome["versions"] == [1]
    assert not [f for f in outcome["files"] if f.startswith(".tmp-")]


def test_sigkill_mid_install_leaves_a_valid_store(tmp_path: Path) -> None:
    """A writer installing ~1 MiB versions back to back is SIGKILLed at random moments."""
    root = tmp_path / "store"
    package = tmp_path / "base.pkg"
    package.write_bytes(b"edgefl test package " * 50)
    rng = random.Random(1234)
    acked = 0
    for attempt in range(8):
        proc = start_process(
            "store-writer",
            [sys.executable, "-m", "tests.edge.helpers", "store-writer", str(root), str(package)],
            tmp_path / f"writer-{attempt}.log",
        )
        try:
            wait_for_line(proc, re.compile(r"installed \d+"), timeout=60)
            time.sleep(rng.uniform(0.0, 0.4))
            proc.signal(signal.SIGKILL)
            proc.proc.wait(timeout=10)  # type: ignore[union-attr]
        finally:
            proc.stop()
        acked = max(int(n) for n in re.findall(r"installed (\d+)", proc.log_path.read_text()))
        store = ModelStore(root)
        current = store.current()
        assert current is not None, f"attempt {attempt}: no current version"
        # current() verified the digest; the content is the complete version it claims.
        assert current.data.endswith(current.version.to_bytes(8, "little") * 16)
        assert current.version >= acked, "an acknowledged install was lost"
        assert not list(root.glob(".tmp-*"))
        acked = current.version
