"""Data loading for AutoSAM-FL: image/mask I/O, stem pairing, augmentations, embedding cache.

Contracts: docs/ARCHITECTURE.md ("autosam_core.data"); layout: docs/DESIGN.md section 6.

``build_augmentation`` and ``PRESETS`` are imported lazily (albumentations takes seconds to
import), so ``from autosam_core.data import load_image`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .dataset import (
    DATA_ROOT_ENV,
    IMAGE_EXTENSIONS,
    MASK_EXTENSIONS,
    Pair,
    PairingReport,
    SplitNotFoundError,
    data_root,
    list_splits,
    pair_by_stem,
    read_split,
)
from .io import AlphaChannelDroppedWarning, ImageFormatError, MaskValuesWarning, image_size, load_image, load_mask

if TYPE_CHECKING:
    from .transforms import PRESETS, build_augmentation

__all__ = [
    "AlphaChannelDroppedWarning",
    "DATA_ROOT_ENV",
    "IMAGE_EXTENSIONS",
    "ImageFormatError",
    "MASK_EXTENSIONS",
    "MaskValuesWarning",
    "PRESETS",
    "Pair",
    "PairingReport",
    "SplitNotFoundError",
    "build_augmentation",
    "data_root",
    "image_size",
    "list_splits",
    "load_image",
    "load_mask",
    "pair_by_stem",
    "read_split",
]

_LAZY = {"build_augmentation", "PRESETS"}


def __getattr__(name: str) -> Any:
    """Import ``transforms`` names on first use (PEP 562)."""
    if name in _LAZY:
        from . import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
