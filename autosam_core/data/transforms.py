"""Training augmentations (albumentations presets) for AutoSAM-FL.

Source: AutoSAM paper (arXiv:2306.06370) section 4, "Training details", as summarised in docs/DESIGN.md
section 1. The paper's recipes read like torchvision's ``ColorJitter`` / ``RandomAffine``, which are
applied to every sample; the presets therefore use ``p=1.0`` for colour jitter and the affine of
GlaS and MoNuSeg, and ``p=0.5`` for flips.

Mask safety: every geometric transform uses ``mask_interpolation=cv2.INTER_NEAREST`` (and the
Compose sets it too) and fills new border pixels of the mask with 0, so a {0, 1} or {0, 255} mask
stays in its value set. Photometric transforms never touch the mask.

Calling convention (albumentations): ``out = aug(image=image_uint8_HxWx3, mask=mask_uint8_HxW)``;
``out["image"]`` stays uint8 (H', W', 3) and ``out["mask"]`` uint8 (H', W'), with (H', W') equal
for both. Only the ``polyp`` preset's ``RandomRotate90`` can swap H and W of a non-square input.
"""

from __future__ import annotations

import os

# albumentations checks PyPI for updates on import; there is no network here.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402

__all__ = ["PRESETS", "build_augmentation"]

#: Valid preset names for :func:`build_augmentation`.
PRESETS: tuple[str, ...] = ("none", "polyp", "glas", "monuseg")

_GEOMETRY = {
    "interpolation": cv2.INTER_LINEAR,
    "mask_interpolation": cv2.INTER_NEAREST,
    "border_mode": cv2.BORDER_CONSTANT,
    "fill": 0,
    "fill_mask": 0,
}


def _glas() -> tuple[list[A.BasicTransform], list[A.BasicTransform]]:
    color = [A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1, p=1.0)]
    geometry = [
        A.HorizontalFlip(p=0.5),
        A.Affine(translate_px=(-5, 5), scale=(0.8, 1.2), rotate=0.0, p=1.0, **_GEOMETRY),
    ]
    return color, geometry


def _monuseg() -> tuple[list[A.BasicTransform], list[A.BasicTransform]]:
    color = [A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=1.0)]
    geometry = [
        A.Affine(rotate=(-20.0, 20.0), scale=(0.75, 1.25), p=1.0, **_GEOMETRY),
        A.HorizontalFlip(p=0.5),
    ]
    return color, geometry


def _polyp() -> tuple[list[A.BasicTransform], list[A.BasicTransform]]:
    color = [A.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02, p=0.5)]
    geometry = [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.Affine(
            translate_percent=(-0.05, 0.05),
            scale=(0.9, 1.1),
            rotate=(-15.0, 15.0),
            p=0.5,
            **_GEOMETRY,
        ),
    ]
    return color, geometry


_BUILDERS = {"glas": _glas, "monuseg": _monuseg, "polyp": _polyp}


def build_augmentation(
    preset: str,
    photometric_only: bool = False,
    *,
    seed: int | None = None,
) -> A.Compose | None:
    """Build the training augmentation pipeline for a dataset family.

    Source: AutoSAM paper section 4 "Training details" (docs/DESIGN.md section 1);
    docs/ARCHITECTURE.md ("autosam_core.data").

    Presets:

    * ``"none"``: no augmentation, returns ``None``.
    * ``"glas"`` (paper): ColorJitter(brightness 0.2, contrast 0.2, saturation 0.2, hue 0.1),
      HorizontalFlip (p=0.5), Affine(translate +-5 px, scale 0.8-1.2).
    * ``"monuseg"`` (paper): Affine(rotate +-20 deg, scale 0.75-1.25), HorizontalFlip (p=0.5),
      ColorJitter(0.4, 0.4, 0.4, hue 0.1).
    * ``"polyp"`` (our choice; the paper follows the PraNet protocol, whose own code only uses
      multi-scale training, and later polyp work (HarDNet-MSEG, Polyp-PVT) adds flips and
      rotations): HorizontalFlip (0.5), VerticalFlip (0.5), RandomRotate90 (0.5; swaps H and W of
      non-square inputs, image and mask together), Affine(translate +-5 %, scale 0.9-1.1,
      rotate +-15 deg, p=0.5), mild ColorJitter(0.1, 0.1, 0.1, hue 0.02, p=0.5). Resizing to the
      protocol's 352 px is not part of the augmentation (SAM preprocessing resizes).

    Colour transforms run before geometric ones (the zero-filled borders are not jittered).
    Geometric transforms interpolate images bilinearly and masks with nearest neighbour, filling
    borders with 0 in both.

    Args:
        preset: one of :data:`PRESETS` (case-insensitive).
        photometric_only: keep only the colour transforms (use when SAM image embeddings are
            cached and the geometry must not change). For ``"none"`` still ``None``.
        seed: optional seed for the Compose's own random state (reproducible draws).

    Returns:
        ``albumentations.Compose`` taking ``image`` (uint8 (H, W, 3)) and ``mask`` (uint8 (H, W)),
        or ``None`` for ``"none"``.

    Raises:
        ValueError: unknown preset (the message lists the valid ones).
    """
    key = preset.strip().lower() if isinstance(preset, str) else preset
    if key not in PRESETS:
        raise ValueError(
            f"unknown augmentation preset {preset!r}; valid presets: {', '.join(PRESETS)}"
        )
    if key == "none":
        return None
    color, geometry = _BUILDERS[key]()
    transforms = color if photometric_only else color + geometry
    return A.Compose(transforms, mask_interpolation=cv2.INTER_NEAREST, seed=seed)
