"""Tests for autosam_core.data.transforms (augmentation presets; paper section 4)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

# Import albumentations through our module, which disables its network update check first.
from autosam_core.data import transforms
from autosam_core.data.transforms import PRESETS, build_augmentation

A = transforms.A

AUGMENTING = [p for p in PRESETS if p != "none"]
N_DRAWS = 50


def _sample(h: int = 48, w: int = 64, fg: int = 255) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    mask = (((yy - h / 2) ** 2 + (xx - w / 3) ** 2) <= (h / 4) ** 2).astype(np.uint8) * fg
    return image, mask


@pytest.mark.parametrize("preset", AUGMENTING)
@pytest.mark.parametrize("fg", [255, 1])
def test_masks_keep_value_set_and_shapes_match(preset: str, fg: int):
    aug = build_augmentation(preset, seed=123)
    image, mask = _sample(fg=fg)
    changed = 0
    for _ in range(N_DRAWS):
        out = aug(image=image, mask=mask)
        img, msk = out["image"], out["mask"]
        assert img.dtype == np.uint8 and msk.dtype == np.uint8
        assert img.ndim == 3 and img.shape[2] == 3 and msk.ndim == 2
        assert img.shape[:2] == msk.shape
        assert set(np.unique(msk).tolist()) <= {0, fg}
        if preset != "polyp":  # only RandomRotate90 may swap H and W
            assert msk.shape == mask.shape
        changed += int(msk.shape != mask.shape or not np.array_equal(msk, mask))
    assert changed > 0  # the geometry really acts


@pytest.mark.parametrize("preset", AUGMENTING)
def test_square_input_keeps_size(preset: str):
    aug = build_augmentation(preset, seed=7)
    image, mask = _sample(40, 40)
    for _ in range(10):
        out = aug(image=image, mask=mask)
        assert out["image"].shape == (40, 40, 3) and out["mask"].shape == (40, 40)


@pytest.mark.parametrize("preset", AUGMENTING)
def test_photometric_only_keeps_geometry(preset: str):
    aug = build_augmentation(preset, photometric_only=True, seed=5)
    assert all(isinstance(t, A.ColorJitter) for t in aug.transforms)
    image, mask = _sample()
    image_changed = 0
    for _ in range(20):
        out = aug(image=image, mask=mask)
        assert np.array_equal(out["mask"], mask)
        assert out["image"].shape == image.shape
        image_changed += int(not np.array_equal(out["image"], image))
    assert image_changed > 0


@pytest.mark.parametrize("preset", AUGMENTING)
def test_geometric_transforms_use_nearest_for_masks(preset: str):
    aug = build_augmentation(preset)
    affines = [t for t in aug.transforms if isinstance(t, A.Affine)]
    assert affines
    for t in affines:
        assert t.mask_interpolation == cv2.INTER_NEAREST
        assert t.fill_mask == 0


def test_paper_parameters():
    glas = {type(t).__name__: t for t in build_augmentation("glas").transforms}
    assert set(glas) == {"ColorJitter", "HorizontalFlip", "Affine"}
    assert glas["ColorJitter"].hue == pytest.approx((-0.1, 0.1))
    assert glas["ColorJitter"].brightness == pytest.approx((0.8, 1.2))
    monuseg = {type(t).__name__: t for t in build_augmentation("monuseg").transforms}
    assert set(monuseg) == {"ColorJitter", "HorizontalFlip", "Affine"}
    assert monuseg["ColorJitter"].saturation == pytest.approx((0.6, 1.4))
    assert monuseg["HorizontalFlip"].p == 0.5


def test_none_and_unknown_presets():
    assert build_augmentation("none") is None
    assert build_augmentation("none", photometric_only=True) is None
    assert build_augmentation("GlaS") is not None  # case-insensitive
    with pytest.raises(ValueError) as info:
        build_augmentation("kvasir")
    msg = str(info.value)
    assert "kvasir" in msg
    for name in PRESETS:
        assert name in msg


def test_seed_makes_draws_reproducible():
    image, mask = _sample()
    a = build_augmentation("monuseg", seed=11)
    b = build_augmentation("monuseg", seed=11)
    for _ in range(3):
        oa, ob = a(image=image, mask=mask), b(image=image, mask=mask)
        assert np.array_equal(oa["image"], ob["image"]) and np.array_equal(oa["mask"], ob["mask"])
