"""Package boundaries (DESIGN.md section 3): the core never imports Flower or the adapters, and the
two adapters never import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    """stdout of ``code`` run in a fresh interpreter from the repo root (asserts it exited 0)."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_importing_every_core_module_loads_no_flwr_client_or_server():
    code = (
        "import importlib, pkgutil, sys\n"
        "import autosam_core\n"
        "names = [m.name for m in pkgutil.walk_packages(autosam_core.__path__, 'autosam_core.')]\n"
        "for n in names: importlib.import_module(n)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'client', 'server'))\n"
        "print(len(names), ' '.join(bad))\n")
    count, _, bad = _python(code).strip().partition(" ")
    assert int(count) >= 20  # every module was imported, not an empty walk
    assert bad == "", f"autosam_core pulled in: {bad}"


def _imported_top_levels(folder: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found.setdefault(str(path.relative_to(ROOT)), set()).update(n.split(".")[0] for n in names)
    return found


def test_adapters_do_not_import_each_other_and_core_imports_neither():
    rules = {"autosam_core": {"client", "server", "flwr"}, "client": {"server"}, "server": {"client"},
             "autosam_fl": {"client", "server"}}
    offenders = []
    for package, forbidden in rules.items():
        for path, tops in _imported_top_levels(ROOT / package).items():
            offenders += [f"{path} imports {t}" for t in sorted(tops & forbidden)]
    assert offenders == []


def test_the_coordinator_cli_checks_a_federation_without_torch(shared_data):
    """autosam-server holds no model: importing it, checking the demo federation's YAMLs (sites, DP
    uniformity, validation data) and building the Flower processes' environment must not import
    torch (it costs ~550 MB of RSS). The demo YAML names the real datasets: skipped without them."""
    code = (
        "import sys\n"
        "import server.cli as c\n"
        "fed, path = c.load_federation('sites/polyp/demo.yaml')\n"
        "c.check_validation(fed, path)\n"
        "import tempfile, pathlib\n"
        "c.flower_env(pathlib.Path(tempfile.mkdtemp()))\n"
        "print(len(fed.sites), 'torch' in sys.modules)\n")
    assert _python(code).split() == ["2", "False"]
