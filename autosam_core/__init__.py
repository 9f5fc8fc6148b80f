"""AutoSAM-FL core: a trained prompt generator for a frozen Segment Anything Model.

Holds the model, data, losses, metrics, one local training round and evaluation. This package
never imports ``flwr``; the Flower adapters live in ``client/`` and ``server/``.
See ``docs/ARCHITECTURE.md`` for the module contracts.
"""

__version__ = "0.1.0"
