"""The errors of the devices package: one tree, rooted at :class:`DevicesError`.

Every error the fleet tools (profiles, flashing, PKI, emulation) raise is a
:class:`DevicesError`; where an error also is a standard kind it keeps that base too.
The classes live next to the code that raises them::

    DevicesError
    ├── profiles.ProfileError         a device profile is invalid (every problem; ValueError)
    ├── pki.PKIError                  a host name unfit for a certificate, a key of the wrong
    │                                 kind (ValueError)
    └── secure_fleet.FleetError       a secure-fleet operation that cannot be done (RuntimeError)
        ├── flash.FlashError          a flash that cannot be done (existing identity, bad path)
        └── software.SoftwareError    the bundle's software cannot be made (foreign wheel, pip)

Errors of the edge and cloud packages they call (``edge.process.ProcessError``,
``cloud.config.ConfigError``) keep their own trees.
"""

from __future__ import annotations

__all__ = ["DevicesError"]


class DevicesError(Exception):
    """Base class of every error raised by the devices package."""
