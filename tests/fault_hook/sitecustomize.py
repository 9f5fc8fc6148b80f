"""Test-only start-up hook: on ``PYTHONPATH`` only when a test asks for a faulty site.

``tests/fault_injection.simulation_env`` puts this folder on ``PYTHONPATH``, so Python runs this
file at start-up in every process of that simulated federation (SuperLink, SuperExec,
flwr-simulation, Ray workers). With ``AUTOSAM_TEST_FAULT`` set it patches :mod:`client.app` as soon
as a process imports it; otherwise it does nothing. Loaded by file path: ``tests`` is not importable
in those processes (it is not part of the Flower App Bundle).
"""

import os

if os.environ.get("AUTOSAM_TEST_FAULT", "").strip():
    import importlib.util
    import sys
    from pathlib import Path

    _path = Path(__file__).resolve().parents[1] / "fault_injection.py"
    _spec = importlib.util.spec_from_file_location("_autosam_test_fault_injection", _path)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _module
    _spec.loader.exec_module(_module)
    _module.install_on_import()
