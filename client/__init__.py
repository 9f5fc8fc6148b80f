"""Flower ClientApp for one AutoSAM-FL site, and ``autosam-client`` (starts a SuperNode for a site).

Thin adapter: translates Flower Messages into :mod:`autosam_core` calls. Only the trainable state
(prompt generator g and surrogate decoder h) leaves the site; the frozen SAM never does.
"""

import warnings as _warnings

# flwr 1.42 imports typer, whose import uses click APIs deprecated in Click 8.2 (DeprecationWarning at
# import time). Import it once here, quietly, so `python -W error` / `pytest -W error` still work.
with _warnings.catch_warnings():
    _warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"typer(\.|$)")
    try:
        import typer as _typer  # noqa: F401
    except ImportError:  # pragma: no cover - flwr not installed
        pass
