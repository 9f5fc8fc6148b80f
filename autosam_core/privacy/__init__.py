"""Record-level differential privacy at a site: DP-SGD on the prompt generator g with Opacus.

What is protected: one training record (an image and its mask) of one site; (epsilon, delta)-DP by
DP-SGD (Abadi et al., CCS 2016) with an Opacus accountant. One concept per module:

* :mod:`.compat` -- BatchNorm -> GroupNorm conversion of g, DP-compatibility checks, state
  signatures, "DP on all sites or none";
* :mod:`.accounting` -- Poisson sample rate, steps per epoch, epsilon of a history, noise calibration;
* :mod:`.ledger` -- :class:`PrivacyLedger`, the accountant history persisted per site;
* :mod:`.trainer` -- :func:`dp_train_epochs` and :class:`DPSiteTrainer` (drop-in for
  ``training.SiteTrainer`` when ``site.privacy`` is set);
* :mod:`.errors` -- :class:`PrivacyWarning`, :class:`DPCompatibilityError`, :class:`PrivacyLedgerError`.

Everything the client, the server and the tests import is re-exported here.
"""

from .accounting import (ACCOUNTANTS, calibrate_noise_multiplier, check_delta, epsilon_spent,
                         poisson_sample_rate, steps_per_epoch)
from .compat import (MAX_GROUPS, check_private_compatible, dp_incompatibilities, groupnorm_groups,
                     make_autosam_private_compatible, make_private_compatible,
                     require_uniform_privacy)
from .errors import DPCompatibilityError, PrivacyLedgerError, PrivacyWarning
from .ledger import LEDGER_FORMAT, PrivacyLedger
from .trainer import DPSiteTrainer, dp_train_epochs

__all__ = [
    "ACCOUNTANTS", "DPCompatibilityError", "DPSiteTrainer", "LEDGER_FORMAT", "MAX_GROUPS", "PrivacyLedger",
    "PrivacyLedgerError", "PrivacyWarning", "calibrate_noise_multiplier", "check_delta",
    "check_private_compatible", "dp_incompatibilities", "dp_train_epochs",
    "epsilon_spent", "groupnorm_groups", "make_autosam_private_compatible", "make_private_compatible",
    "poisson_sample_rate", "require_uniform_privacy", "steps_per_epoch",
]
