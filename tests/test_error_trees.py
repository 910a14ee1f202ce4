"""One exception tree per package, and settings and domain modules that load without grpc."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import cloud
import devices
import edge
import protos
from cloud.errors import CloudError
from devices.errors import DevicesError
from edge.errors import EdgeError
from protos.errors import CodecError

REPO_ROOT = Path(__file__).resolve().parents[1]
BASES = {edge: EdgeError, cloud: CloudError, devices: DevicesError, protos: CodecError}
# Alembic revision scripts and env.py run only inside a migration; stubs define no errors.
SKIP = ("cloud.migrations.versions", "cloud.migrations.env", "_pb2")


def _modules(package: object) -> list[str]:
    names = [package.__name__]  # type: ignore[attr-defined]
    for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):  # type: ignore[attr-defined]
        if not any(part in info.name for part in SKIP):
            names.append(info.name)
    return names


@pytest.mark.parametrize("package", list(BASES), ids=lambda p: p.__name__)
def test_every_error_of_a_package_has_its_base(package: object) -> None:
    base = BASES[package]  # type: ignore[index]
    strays: list[str] = []
    found = 0
    for name in _modules(package):
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not attr.startswith("_")
            ):
                found += 1
                if not issubclass(value, base):
                    strays.append(f"{name}.{attr}")
    assert found >= 5
    assert strays == [], f"not a {base.__name__}: {strays}"


def test_every_error_is_drawn_in_its_packages_tree() -> None:
    for package, base in BASES.items():
        tree = sys.modules[base.__module__].__doc__ or ""
        for name in _modules(package):
            for attr, value in vars(importlib.import_module(name)).items():
                if (
                    inspect.isclass(value)
                    and issubclass(value, BaseException)
                    and value.__module__ == name
                    and not attr.startswith("_")
                ):
                    assert attr in tree, f"{name}.{attr} is missing from {base.__module__}"


BLOCK_GRPC = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("grpc", "grpc_health", "grpc_reflection"):
            raise ImportError("grpc is not installed here: " + name)
        return None
sys.meta_path.insert(0, Block())
for name in sys.argv[1:]:
    __import__(name)
assert not any(m.split(".")[0] == "grpc" for m in sys.modules), "grpc got imported"
print("imported without grpc")
"""


def test_settings_and_domain_modules_import_without_grpc() -> None:
    modules = [
        "edge.config",
        "edge.settings",
        "edge.errors",
        "cloud.config",
        "cloud.errors",
        "devices.errors",
        "edge.model_store",
        "edge.local_data",
        "edge.serving",
    ]
    res = subprocess.run(
        [sys.executable, "-c", BLOCK_GRPC, *modules],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr
    assert "imported without grpc" in res.stdout
    # The block works: the gRPC layer itself does not load.
    res = subprocess.run(
        [sys.executable, "-c", BLOCK_GRPC, "edge.grpc_status"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode != 0 and "grpc is not installed here" in res.stderr
