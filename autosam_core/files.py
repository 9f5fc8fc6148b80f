"""Atomic file writes and file hashing: the one implementation of each (standard library only).

Every file this project writes for others to read (checkpoints, embedding-cache entries, summaries,
plots, the privacy ledger, the audit report, the connection marker) goes through
:func:`atomic_write`: a temporary file in the same folder, then ``os.replace``, so a reader never
sees half a file and a crash keeps the previous one. Every content fingerprint of a file (embedding
cache keys, SAM weights ids, connection-marker names) is :func:`file_sha256`.

No torch, no NumPy, no Flower: ``autosam_fl`` and both adapters use it without loading a model stack.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[str], None], mode: int | None = None) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then ``os.replace`` it over ``path``.

    A crash, SIGKILL or error mid-write leaves any previous ``path`` intact (never a truncated
    file); on an exception the temporary file is removed (after a SIGKILL a hidden
    ``.<name>.*.tmp`` may remain, which nothing reads). Parent folders are created.

    Args:
        path: destination.
        write: writes the content to the temporary file path it is given.
        mode: permission bits for the file (e.g. ``0o644``); None keeps ``mkstemp``'s owner-only 0o600.

    Returns:
        the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), mode)


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), mode)


def atomic_write_json(path: str | Path, obj: Any, mode: int | None = None, **dumps: Any) -> Path:
    """Write ``json.dumps(obj, **dumps)`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write_text(path, json.dumps(obj, **dumps), mode)


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src``'s bytes to ``dst`` atomically (e.g. ``best.pt`` from ``last.pt``: no second serialisation)."""
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks: 64 hex digits (callers keep a prefix)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
