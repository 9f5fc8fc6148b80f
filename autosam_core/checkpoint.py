"""Checkpoints of the trainable state (g and h only; SAM is never saved), written atomically."""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write

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
    payload = {
        "format_version": FORMAT_VERSION,
        "trainable_state": {k: v.detach().cpu() for k, v in trainable_state.items()},
        "metadata": dict(metadata),
    }
    return atomic_torch_save(payload, path)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` it over ``path``
    (:func:`autosam_core.files.atomic_write`).

    A crash or error mid-write leaves any previous ``path`` intact and no temporary file behind.
    """
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


_EXPECTED = ("expected an AutoSAM-FL checkpoint: a torch zip archive (.pt) written by `autosam train` or "
             "the federation server, holding 'trainable_state' and 'metadata'")
_ZIP_MAGIC = b"PK\x03\x04"


def _not_a_checkpoint(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is not a checkpoint of this tool ({why}); {_EXPECTED}")


def _load_failure(path: Path, size: int, err: Exception) -> CheckpointError:
    """A one-line reason for a failed safe ``torch.load`` (torch's advice to disable it is never passed on)."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return _not_a_checkpoint(path, f"{size} bytes holding a pickled Python object {found.group(1)}, which safe "
                                       "loading refuses")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if "weights_only" in first or "Weights only" in first:  # torch's unsafe advice: never shown
        first = "a pickle that safe loading refuses"
    return _not_a_checkpoint(path, f"{size} bytes; torch could not read it: {type(err).__name__}"
                                   + (f": {first[:160]}" if first else ""))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU (also one saved from CUDA tensors), with safe loading only.

    Returns:
        {"trainable_state": dict[str, Tensor], "metadata": dict, "format_version": int}.

    Raises:
        CheckpointError: one line naming the file: missing, empty, not a torch zip archive (size and
        first bytes), truncated (zip without its end), refused by safe loading, or a payload
        without ``trainable_state``. Never suggests ``weights_only=False``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise _not_a_checkpoint(path, "the file is empty, 0 bytes")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith(_ZIP_MAGIC):
        raise _not_a_checkpoint(path, f"{size} bytes starting with {head!r}, not a zip archive")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} is truncated or damaged ({size} bytes: a zip archive whose end is missing, e.g. an "
            f"interrupted copy); {_EXPECTED}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt files
        raise _load_failure(path, size, err) from None
    if not isinstance(payload, dict) or "trainable_state" not in payload:
        keys = sorted(map(str, payload))[:5] if isinstance(payload, dict) else type(payload).__name__
        raise _not_a_checkpoint(path, f"{size} bytes holding {keys}, without 'trainable_state'")
    if not isinstance(payload["trainable_state"], Mapping):
        raise _not_a_checkpoint(path, f"'trainable_state' is a {type(payload['trainable_state']).__name__}, "
                                      "not a mapping of tensors")
    payload.setdefault("metadata", {})
    return payload
