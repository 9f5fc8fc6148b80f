"""The exceptions and the warning of autosam_core.privacy (record-level DP-SGD at a site)."""

from __future__ import annotations

import logging
import warnings

__all__ = ["PrivacyWarning", "DPCompatibilityError", "PrivacyLedgerError", "warn_privacy"]

log = logging.getLogger("autosam_core.privacy")


class PrivacyWarning(UserWarning):
    """A DP setting is legal but weak or surprising (clamped sample rate, delta >= 1/N, sigma = 0)."""


class DPCompatibilityError(ValueError):
    """g cannot be trained with per-sample gradients; the message names every offending module."""


class PrivacyLedgerError(ValueError):
    """A site's privacy ledger file is unreadable or was written with another accountant."""


def warn_privacy(msg: str) -> None:
    """Log ``msg`` at WARNING and emit it as a :class:`PrivacyWarning` (attributed to the caller's caller)."""
    log.warning(msg)
    warnings.warn(msg, PrivacyWarning, stacklevel=3)
