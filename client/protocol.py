"""Compatibility alias: this module moved to :mod:`autosam_fl.protocol` (shared by client and server).

Importing it yields the very same module object, so attributes and monkeypatches are shared.
"""

import sys

from autosam_fl import protocol as _moved

sys.modules[__name__] = _moved
