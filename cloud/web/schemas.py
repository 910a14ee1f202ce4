"""Response models of the JSON API (they make the OpenAPI document precise).

Each model mirrors a registry dataclass; the ``*_out`` functions convert. The web
layer adds only derived values (``online``, round progress, spread per version, typed
metric fields named in :mod:`protos.wire_keys`). :class:`DeviceOut` is built from the
status record's fields, so a new status field reaches the API without a copy here.
"""

from __future__ import annotations

import abc
import dataclasses
import typing
from typing import Any

from pydantic import BaseModel, Field, computed_field, create_model

from cloud.registry import Device, Event, ModelVersion, RoundRecord, Run, Serving, Spread
from protos import wire_keys as keys


class RunOut(BaseModel):
    id: int
    num_rounds: int = Field(description="Rounds the run was started with (N in 'Round n / N').")
    strategy: str
    config: dict[str, Any]
    flower_run_id: str | None
    status: str = Field(description="running, completed, failed or stopped.")
    started_at: float = Field(description="Seconds since the Unix epoch.")
    finished_at: float | None


class SpreadOut(BaseModel):
    serving: int = Field(description="Online devices serving this version.")
    online: int = Field(description="Devices whose last status is not OFFLINE.")
    total: int = Field(description="Every device that ever reported.")


class ServingOut(BaseModel):
    version: int
    pinned: bool = Field(description="True when an operator pinned (or rolled back to) it.")
    sequence: int
    updated_at: float


class VersionOut(BaseModel):
    version: int
    architecture_id: str
    round: int
    run_id: int | None
    parent_version: int | None
    metrics: dict[str, float]
    participants: list[str]
    sha256: str = Field(description="SHA-256 hex digest of the model package.")
    size: int = Field(description="Package size in bytes.")
    created_at: float
    spread: SpreadOut
    download_url: str


class ModelsOut(BaseModel):
    current: ServingOut | None
    versions: list[VersionOut] = Field(description="Newest first.")


class ReplyOut(BaseModel):
    device_id: str
    ok: bool
    num_examples: int
    metrics: dict[str, float]
    error: str
    received_at: float

    @computed_field(description="The device's training loss (metric train-loss).")  # type: ignore[prop-decorator]
    @property
    def train_loss(self) -> float | None:
        return self.metrics.get(keys.TRAIN_LOSS)

    @computed_field(description="The device's training accuracy (metric train-accuracy).")  # type: ignore[prop-decorator]
    @property
    def train_accuracy(self) -> float | None:
        return self.metrics.get(keys.TRAIN_ACCURACY)


class RoundMetricsFields(BaseModel):
    """Typed fields over a round's two metric records (names from protos.wire_keys).

    A subclass says which of its fields holds the devices' aggregated training metrics
    and which the cloud's evaluation; the UI reads these fields, never metric names.
    """

    @abc.abstractmethod
    def _training(self) -> dict[str, float]: ...

    @abc.abstractmethod
    def _evaluation(self) -> dict[str, float]: ...

    @computed_field(description="Training loss aggregated over the round's replies.")  # type: ignore[prop-decorator]
    @property
    def train_loss(self) -> float | None:
        return self._training().get(keys.TRAIN_LOSS)

    @computed_field(description="Training accuracy aggregated over the round's replies.")  # type: ignore[prop-decorator]
    @property
    def train_accuracy(self) -> float | None:
        return self._training().get(keys.TRAIN_ACCURACY)

    @computed_field(description="The cloud's test accuracy of the round's model.")  # type: ignore[prop-decorator]
    @property
    def eval_accuracy(self) -> float | None:
        return self._evaluation().get(keys.EVAL_ACCURACY)

    @computed_field(description="The cloud's test loss of the round's model.")  # type: ignore[prop-decorator]
    @property
    def eval_loss(self) -> float | None:
        return self._evaluation().get(keys.EVAL_LOSS)


class RoundOut(RoundMetricsFields):
    run_id: int
    round: int
    sampled: list[str]
    replied: list[str] = Field(description="Devices that answered successfully.")
    failed: list[str] = Field(description="Devices that answered with an error.")
    dropped: list[str] = Field(description="Devices that timed out.")
    pending: list[str] = Field(description="Devices not heard from yet.")
    started_at: float | None
    finished_at: float | None
    duration: float | None = Field(description="Seconds; null while the round runs.")
    aggregated_metrics: dict[str, float]
    eval_metrics: dict[str, float] = Field(description="Server-side test metrics.")
    version: int | None
    replies: list[ReplyOut]

    def _training(self) -> dict[str, float]:
        return self.aggregated_metrics

    def _evaluation(self) -> dict[str, float]:
        return self.eval_metrics


class RoundsOut(BaseModel):
    run: RunOut | None
    rounds: list[RoundOut]


_DEVICE_DESCRIPTIONS = {
    "state": "What the device last reported: SERVING, TRAINING, UPDATING, DEGRADED or "
    "OFFLINE (DeviceState in docs/reference.md).",
    "received_at": "When the cloud stored the status (seconds since the Unix epoch).",
}


def _device_fields() -> dict[str, Any]:
    """DeviceOut's fields: those of :class:`cloud.registry.Device` (a DeviceStatus), whose
    ``timestamp_ms`` the API calls ``last_seen_ms``."""
    hints = typing.get_type_hints(Device)
    return {
        f.name: (hints[f.name], Field(description=_DEVICE_DESCRIPTIONS.get(f.name)))
        for f in dataclasses.fields(Device)
        if f.name != "timestamp_ms"
    }


class DeviceOut(create_model("DeviceFields", **_device_fields())):  # type: ignore[misc]
    """A device's latest status: every field of the status record, plus derived ones."""

    online: bool = Field(description="False when the last status is OFFLINE.")
    last_seen_ms: int = Field(description="Timestamp of the device's last status (ms).")
    unknown_version: bool = Field(
        default=False,
        description="The device serves a version the registry does not know (an alert).",
    )


class EventOut(BaseModel):
    id: int
    device_id: str
    timestamp_ms: int
    kind: str
    detail: str
    version: int


class ProgressOut(BaseModel):
    current: int = Field(description="n in 'Round n / N' (0 before the first round).")
    total: int = Field(description="N in 'Round n / N'.")
    finished: bool = Field(description="Whether round n has finished.")
    sampled: list[str]
    replied: list[str]
    failed: list[str]
    timed_out: list[str]
    pending: list[str]
    fraction: float = Field(description="Rounds done / N, between 0 and 1.")


class LatestMetricsOut(RoundMetricsFields):
    round: int
    aggregated: dict[str, float]
    evaluation: dict[str, float]

    def _training(self) -> dict[str, float]:
        return self.aggregated

    def _evaluation(self) -> dict[str, float]:
        return self.evaluation


class FleetCountOut(BaseModel):
    online: int
    total: int


class OverviewOut(BaseModel):
    fleet: str
    change_token: int
    run: RunOut | None
    progress: ProgressOut | None
    latest_metrics: LatestMetricsOut | None
    newest_version: VersionOut | None
    serving: ServingOut | None
    devices: FleetCountOut
    alerts: list[str] = Field(
        default_factory=list,
        description="Things the operator must look at, e.g. a device serving a version "
        "the registry does not know (a release this cloud did not issue).",
    )


class ActionOut(BaseModel):
    ok: bool
    message: str


class ErrorOut(BaseModel):
    detail: str


def run_out(run: Run) -> RunOut:
    return RunOut.model_validate(run, from_attributes=True)


def serving_out(serving: Serving | None) -> ServingOut | None:
    return None if serving is None else ServingOut.model_validate(serving, from_attributes=True)


def version_out(v: ModelVersion, spread: Spread) -> VersionOut:
    """``spread`` is :meth:`cloud.registry.Registry.spread` of the version."""
    return VersionOut.model_validate(
        {
            **dataclasses.asdict(v),
            "spread": SpreadOut.model_validate(spread),
            "download_url": f"/api/models/{v.version}/download",
        }
    )


def round_out(r: RoundRecord) -> RoundOut:
    # from_attributes also reads the derived properties (replied, failed, pending, duration).
    return RoundOut.model_validate(r, from_attributes=True)


def device_out(d: Device, known_versions: set[int] | None = None) -> DeviceOut:
    unknown = known_versions is not None and d.serving_version not in known_versions | {0}
    return DeviceOut.model_validate(
        {
            **dataclasses.asdict(d),
            "online": d.online,
            "last_seen_ms": d.timestamp_ms,
            "unknown_version": unknown,
        }
    )


def unknown_version_alerts(serving_unknown: list[tuple[str, int]]) -> list[str]:
    """One line per ``(device, version)`` serving a version the registry does not know."""
    return [
        f"{device} serves version {version}, which the registry does not know: a release "
        "this cloud did not issue"
        for device, version in serving_unknown
    ]


def event_out(e: Event) -> EventOut:
    return EventOut.model_validate(e, from_attributes=True)
