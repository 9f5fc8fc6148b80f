"""The folder ``flwr run`` builds the Flower App Bundle (FAB) from: only the files the bundle holds.

``flwr run <folder>`` (Flower 1.42, ``flwr/cli/utils.py`` ``collect_files``) walks *every* file under the
folder, resolving each path, before it applies ``fab-include`` and ``.gitignore``. Run on the clone, that
walk visits ``.venv`` and the embedding cache (~49,000 files here): 7.8 s of a 10.4 s ``flwr build`` on
an idle 2-core machine, and more under load, paid once per simulated or deployed run. Staging the
bundle's own files (``pyproject.toml`` and what ``[tool.flwr.app] fab-include`` names, ~90 files) into a
temporary folder gives Flower the same files, so the same bundle (the same FAB hash), without the walk.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

#: The project folder: ``pyproject.toml`` and the packages the bundle holds.
APP_DIR = Path(__file__).resolve().parents[1]


def bundle_files(source: Path = APP_DIR) -> list[Path]:
    """Files of ``source`` that go into the FAB: ``pyproject.toml``, ``.gitignore`` if present, and every
    file matching one of ``[tool.flwr.app] fab-include`` (glob patterns relative to ``source``).

    Returns:
        paths relative to ``source``, sorted, without duplicates.

    Raises:
        FileNotFoundError: ``source/pyproject.toml`` is missing.
        ValueError: ``fab-include`` is missing, not a list of strings, or matches no file.
    """
    source = Path(source)
    pyproject = source / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(f"{pyproject}: no pyproject.toml, so no Flower App to bundle")
    config = tomllib.loads(pyproject.read_text())
    patterns = config.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{pyproject}: [tool.flwr.app] fab-include must be a non-empty list of glob patterns, "
                         f"found {patterns!r}")
    included = {p.relative_to(source) for pattern in patterns for p in source.glob(pattern)
                if p.is_file() and not p.is_symlink()}
    if not included:
        raise ValueError(f"{pyproject}: fab-include {patterns!r} matches no file under {source}")
    extra = [Path(".gitignore")] if (source / ".gitignore").is_file() else []
    return sorted({Path("pyproject.toml"), *extra, *included})


def stage_app(dest: Path, source: Path = APP_DIR) -> Path:
    """Copy the bundle's files (:func:`bundle_files`) of ``source`` into the empty or new folder ``dest``.

    Returns:
        ``dest``, ready for ``flwr run dest ...``.

    Raises:
        FileExistsError: ``dest`` exists and is not empty (nothing is overwritten).
        FileNotFoundError, ValueError: from :func:`bundle_files`.
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest}: the app folder to stage into is not empty")
    files = bundle_files(source)
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(source) / rel, target)
    return dest
