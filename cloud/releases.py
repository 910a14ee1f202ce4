"""Turning registry versions into fleet releases: package, register, publish, mark current.

The ServerApp calls :func:`release_weights` after every round: it registers the
version, then asks the cloud's release signer (:mod:`cloud.signer`, inside ``cloud
up``; the ServerApp never holds the signing key) to check, sign and publish it, and
waits until that is done. ``edgefl cloud model pin`` and the web UI's pin button call
:func:`pin_version`. Both end in :func:`publish_version` with a
:class:`cloud.publisher.Publisher`, so every release is signed, chunked and retained,
and a version becomes current only after the broker acknowledged it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cloud.config import CloudSettings
from cloud.publisher import Publisher
from cloud.registry import ModelVersion, Registry
from edge.process import connect_host
from protos import codec, signing

logger = logging.getLogger(__name__)


def broker_endpoint(settings: CloudSettings) -> tuple[str, int]:
    """Where the broker listens: the configured port, or the one `cloud up` picked."""
    port = settings.broker.port
    if port == 0:
        port_file = settings.data_dir / "broker" / "port"
        if not port_file.exists():
            raise RuntimeError(
                "broker.port is 0 and no running broker wrote its port: start `edgefl cloud up` first"
            )
        port = int(port_file.read_text().strip())
    return connect_host(settings.broker.host), port


def make_publisher(settings: CloudSettings, *, signing_key: Any = None) -> Publisher:
    """A publisher for the fleet's broker; loads ``signing.private_key`` unless given one."""
    host, port = broker_endpoint(settings)
    password = None
    if settings.broker.password_file is not None:
        password = Path(settings.broker.password_file).read_text().strip()
    return Publisher(
        host=host,
        port=port,
        fleet=settings.cloud.fleet,
        signing_key=signing_key or signing.load_private_key(settings.signing.private_key),
        chunk_size=settings.run.chunk_size,
        username=settings.broker.username,
        password=password,
        ca_file=None if settings.broker.ca_file is None else str(settings.broker.ca_file),
    )


def base_package(model_dir: Path) -> tuple[str, bytes, str]:
    """(architecture id, tflite bytes, card JSON) of the model the fleet runs."""
    from edge.model_card import ModelCard

    card_json = (model_dir / "card.json").read_text()
    card = ModelCard.from_json(card_json)
    return card.architecture_id, (model_dir / "model.tflite").read_bytes(), card_json


def package_weights(model_dir: Path, weights: Mapping[str, np.ndarray]) -> tuple[str, bytes]:
    arch, tflite, card_json = base_package(model_dir)
    pkg = codec.ModelPackage(
        arch, tflite, card_json, {k: np.asarray(v) for k, v in weights.items()}
    )
    return arch, codec.package_to_bytes(pkg)


class Releaser(Protocol):
    """Who releases a registered version (:class:`cloud.signer.SignerClient`)."""

    def release_when_possible(self, version: int, *, wait_s: float) -> int: ...


def release_weights(
    *,
    registry: Registry,
    releaser: Releaser,
    model_dir: Path,
    weights: Mapping[str, np.ndarray],
    round: int,
    run_id: int | None,
    parent_version: int | None,
    metrics: Mapping[str, float],
    participants: list[str] | None = None,
    wait_s: float,
) -> ModelVersion:
    """Register ``weights`` as the version for ``(run_id, round)`` and have it released.

    Returns once the fleet was sent the release (the version is then current); while
    the broker is away the call waits, up to ``wait_s``.
    """
    arch, data = package_weights(model_dir, weights)
    version = registry.add_version(
        package=data,
        architecture_id=arch,
        round=round,
        run_id=run_id,
        parent_version=parent_version,
        metrics=dict(metrics),
        participants=participants,
    )
    releaser.release_when_possible(version.version, wait_s=wait_s)
    return version


def publish_version(
    registry: Registry, publisher: Publisher, version: int, *, pinned: bool
) -> codec.Manifest:
    """Publish a stored version to the fleet and record it as current."""
    v = registry.get_version(version)
    data = registry.version_bytes(version)
    started = time.monotonic()
    manifest = publisher.publish_release(
        version=v.version,
        parent_version=v.parent_version or 0,
        round=v.round,
        package=data,
        architecture_id=v.architecture_id,
        metrics=dict(v.metrics),
        pinned=pinned,
    )
    registry.set_current(
        v.version,
        pinned=pinned,
        sequence=manifest.sequence,
        publish_seconds=time.monotonic() - started,
    )
    logger.info(
        "published version %d (%s, %d bytes, sequence %d)",
        v.version,
        "pinned" if pinned else "release",
        len(data),
        manifest.sequence,
    )
    return manifest


def pin_version(settings: CloudSettings, registry: Registry, version: int) -> codec.Manifest:
    """Roll the fleet back (or forward) to a stored version."""
    registry.get_version(version)  # NotFoundError before touching the broker
    with make_publisher(settings) as publisher:
        return publish_version(registry, publisher, version, pinned=True)
