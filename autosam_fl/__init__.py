"""Flower-free code shared by the AutoSAM-FL coordinator (``server``) and sites (``client``).

``client`` and ``server`` only translate Flower messages to core calls and never import each other;
what both need lives here:

- :mod:`autosam_fl.protocol`: the wire protocol (record and config keys, reply allow-lists).
- :mod:`autosam_fl.processes`: starting, tracking and stopping Flower processes by PID.
- :mod:`autosam_fl.preflight`: YAML and data checks before any Flower process starts.
"""
