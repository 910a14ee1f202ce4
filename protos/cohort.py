"""Cohort positions: which devices a staged rollout's phase addresses.

A device's **cohort position** is a number in ``0..999_999`` (parts per million of the
fleet) that depends only on the fleet name and the device id, so it is the same on the
cloud and on the device, across restarts and releases:

    position = int.from_bytes(SHA-256(UTF-8(fleet + "/" + device_id))[:8], "big") * 1_000_000 >> 64

A candidate release names a bound, ``cohort_ppm``; the devices whose position is below
it are the phase's cohort. Phases are cumulative (a later phase's bound is higher), so a
device checked in phase 1 is part of every later phase too. Positions are uniform, so a
bound of ``fraction * 1_000_000`` addresses about that fraction of the fleet; the cloud
raises the bound to reach a phase's minimum device count (:func:`bound_for`).
"""

from __future__ import annotations

import hashlib
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
    """The bound of a phase: ``fraction`` of the fleet, raised to take ``min_devices``.

    The result is at least ``round(fraction * SCALE)`` and, when fewer known devices fall
    below that, just above the position of the ``min_devices``-th device in cohort order
    (every device sharing that position is included too). Never above :data:`SCALE`.
    """
    bound = min(SCALE, max(0, round(fraction * SCALE)))
    ordered = sorted(position(fleet, d) for d in set(devices))
    if min_devices > 0 and ordered:
        need = ordered[min(min_devices, len(ordered)) - 1] + 1
        bound = max(bound, need)
    return min(SCALE, bound)


def members(fleet: str, devices: Iterable[str], cohort_ppm: int) -> list[str]:
    """The ``devices`` a bound addresses, sorted by id."""
    return sorted(d for d in set(devices) if in_cohort(fleet, d, cohort_ppm))
