"""Staged rollouts on the wire: cohort positions and what a candidate asks a device to do.

**Cohort position.** A device's position is a number in ``0..999_999`` (parts per million
of the fleet) that depends only on the fleet name and the device id, so the cloud and the
device compute the same one, across restarts and releases:

    position = int.from_bytes(SHA-256(UTF-8(fleet + "/" + device_id))[:8], "big") * 1_000_000 >> 64

A candidate names a bound, ``cohort_ppm``; the devices whose position is below it are the
phase's cohort. Phases are cumulative (a later phase's bound is higher), so a device of
phase 1 belongs to every later phase. The cloud sets a phase's bound just above the
position of the last device it takes: the first ``max(min_devices, ceil(fraction * n))``
of the ``n`` online devices in cohort order (:func:`bound_for`); the last phase (1.0)
addresses every device.

**Candidates.** Under a staged policy the cloud publishes each new version first as a
*candidate*: a `ReleaseManifest` with `phase` ≥ 1, `cohort_ppm`, `action` and
`served_version` (the fleet's promoted version), signed with the candidate form (see
"Signed release manifests"), retained with QoS 1 on `edgefl/{fleet}/release/candidate`;
its chunks go on the usual chunk topics. A device that knows candidates verifies it like
a release (fleet, signature, sequence floor and clock bound; candidates have their own
sequence, persisted as `candidate_sequence`) and then, if it is in the cohort:

| action | the device |
|---|---|
| `check` | stores the candidate beside the served version without serving it, checks the candidate and `served_version` on the held-out part of its local samples (never trained on; see "Held-out split") with its own trainer interpreter, one inference call per held-out sample, and sends a `candidate_checked` event, or `candidate_failed` with the reason (for example too few samples for a held-out split) |
| `serve` | serves the stored candidate (`candidate_served`) |
| `revert` | if it serves the candidate, serves `served_version` again (`candidate_reverted`) |
| `halt` | nothing: it keeps what it serves |

Whatever the cohort, a device that serves a version above `served_version` that is not
the candidate's (an older candidate never promoted) serves `served_version` again: a
newer candidate supersedes it. A promoted release is the existing retained release on
`edgefl/{fleet}/release/manifest`, so a device that predates candidates (it never
subscribes to the candidate topic) keeps following promoted releases, and a device that
was offline gets the last promoted version.

**`candidate_checked` metrics.** `candidate_accuracy`, `served_accuracy` (an inference
call that errs counts as a wrong answer), `candidate_loss`, `served_loss` (omitted when
not finite), `examples` (held-out samples) and `phase`; since the inference error-rate
gate also `inference_calls` (calls per version, one per held-out sample),
`candidate_error_rate` and `served_error_rate` (the share of those calls that raised or
returned NaN or infinite values) and `train_examples` (the samples Fit trains on). The
added keys are optional: an older cloud ignores them, and a cloud reading a report
without them leaves that device out of the phase's error rates (a phase where no report
has them is not gated on the rate). The metrics map holds finite numbers only: a figure
that is not finite is left out, never sent.

**Held-out split.** A device splits its samples by their content: BLAKE2b (8-byte
digest, person `edgefl-split-v1`) over a sample's input (float32 little-endian) and label
(int32 little-endian), read big-endian and divided by 2^64, is its key in [0, 1); the
`max(count of keys < [data] holdout_fraction, [data] min_holdout)` samples with the
lowest keys are held out, the rest are trained on (defaults 0.2 and 10). `Fit` trains on
the train part only; `Evaluate` and the check use the held-out part only. A device with
fewer than `2 * min_holdout` samples has no split: `Fit` trains on all of them, and
`Evaluate` and the check refuse (`FAILED_PRECONDITION`, `candidate_failed`).

After its broker restarted (it may have come back from an older autosave) and when a
restarted cloud resumes a rollout it stored, the cloud puts the candidate topic back: a running candidate goes out again, chunks first, with
its phase's `check` under a new sequence (devices of the phase check it again); a
finished rollout's last candidate (`revert` or `halt`) goes out again unchanged, same
sequence; after a promotion the topic is cleared.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

#: Positions run from 0 to SCALE - 1; a bound of SCALE addresses every device.
SCALE = 1_000_000


def position(fleet: str, device_id: str) -> int:
    """The device's cohort position in ``0..SCALE-1`` (see the module docstring)."""
    digest = hashlib.sha256(f"{fleet}/{device_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") * SCALE) >> 64


def in_cohort(fleet: str, device_id: str, cohort_ppm: int) -> bool:
    """Whether a phase with bound ``cohort_ppm`` addresses the device."""
    return position(fleet, device_id) < cohort_ppm


def bound_for(fleet: str, devices: Iterable[str], fraction: float, min_devices: int) -> int:
    """The bound of a phase that takes ``fraction`` of ``devices``, at least ``min_devices``.

    The phase takes the first ``max(min_devices, ceil(fraction * len(devices)))`` devices
    in cohort order (every device sharing the last one's position too): the bound is
    just above that device's position. A fraction of 1.0 addresses every device
    (:data:`SCALE`), and without known devices the bound is ``fraction * SCALE``.
    """
    if fraction >= 1.0:
        return SCALE
    ordered = sorted(position(fleet, d) for d in set(devices))
    if not ordered:
        return max(1, min(SCALE, round(fraction * SCALE)))
    take = max(min_devices, math.ceil(fraction * len(ordered) - 1e-9))
    if take <= 0:
        return max(1, min(SCALE, round(fraction * SCALE)))
    if take >= len(ordered):
        return SCALE
    return ordered[take - 1] + 1


def members(fleet: str, devices: Iterable[str], cohort_ppm: int) -> list[str]:
    """The ``devices`` a bound addresses, sorted by id."""
    return sorted(d for d in set(devices) if in_cohort(fleet, d, cohort_ppm))
