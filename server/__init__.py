"""Flower ServerApp for AutoSAM-FL: strategy, central evaluation, checkpoints, outputs, launchers.

- :mod:`server.aggregation`: FedAvg maths on NumPy arrays (no Flower).
- :mod:`server.strategy`: Flower strategies that survive failing sites and empty replies.
- :mod:`server.runner`: one federated run (resume, evaluation, checkpoints, summary).
- :mod:`server.app`: the ``ServerApp`` object Flower loads (``server.app:app``).
- :mod:`server.simulation`: ``run_simulation_from_yaml`` (Flower simulation runtime, local).
- :mod:`server.cli`: ``autosam-server`` (SuperLink + run submission for a real deployment).
- :mod:`server.certs`: development CA, TLS certificates and site keys.
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
