"""Checkpoints of the trainable state (g and h only; SAM is never saved), written atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or not an AutoSAM-FL checkpoint."""


def save_checkpoint(path: str | Path, trainable_state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
    """Write ``{"trainable_state", "metadata", "format_version"}`` to ``path`` atomically.

    The file is first written to a temporary file in the same folder and then moved over ``path``
    with ``os.replace``, so an interrupted save never leaves a half-written checkpoint.

    Args:
        path: destination (.pt); parent folders are created.
        trainable_state: g/h tensors (moved to CPU).
        metadata: JSON-like facts: backbone, sam_kind, config_hash, epoch or server_round, metrics.

    Returns:
        the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "trainable_state": {k: v.detach().cpu() for k, v in trainable_state.items()},
        "metadata": dict(metadata),
    }
    return atomic_torch_save(payload, path)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` it over ``path``.

    A crash or error mid-write leaves any previous ``path`` intact and no temporary file behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU (also one saved from CUDA tensors).

    Returns:
        {"trainable_state": dict[str, Tensor], "metadata": dict, "format_version": int}.

    Raises:
        CheckpointError: missing file, unreadable file, or not an AutoSAM-FL checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt files
        raise CheckpointError(f"checkpoint {path} could not be read: {err}") from err
    if not isinstance(payload, dict) or "trainable_state" not in payload:
        keys = sorted(payload)[:5] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {path}: expected keys 'trainable_state' and 'metadata', found {keys}")
    payload.setdefault("metadata", {})
    return payload
