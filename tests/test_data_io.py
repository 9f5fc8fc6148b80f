"""Tests for autosam_core.data.io (image/mask loading; docs/DESIGN.md sections 1 and 6)."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

from autosam_core.data.io import (
    AlphaChannelDroppedWarning,
    ImageFormatError,
    image_size,
    load_image,
    load_mask,
)


def _mode(path) -> str:
    with Image.open(path) as im:
        return im.mode


def _disc(h: int = 200, w: int = 240, radius: int = 60, value: int = 255) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    inside = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= radius**2
    return (inside * value).astype(np.uint8)


# ---------------------------------------------------------------- load_image


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grayscale_rescaled_by_own_range(tmp_path, suffix):
    raw = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    path = tmp_path / f"g16{suffix}"
    Image.fromarray(raw).save(path)
    assert _mode(path).startswith("I")  # really a 16-bit file

    img = load_image(path)

    assert img.dtype == np.uint8
    assert img.shape == (64, 64, 3)
    assert img.max() == 255 and img.min() == 0
    assert len(np.unique(img)) >= 200
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_color_read_at_full_depth(tmp_path, suffix):
    # Pillow alone keeps only the high byte of 16-bit colour (16 distinct values for 0..4095).
    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    bgr = np.stack([ramp, ramp // 2, np.zeros_like(ramp)], axis=2)
    path = tmp_path / f"c16{suffix}"
    assert cv2.imwrite(str(path), bgr)

    img = load_image(path)

    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    assert img[..., 2].max() == 255  # blue channel (BGR index 0) holds the full range
    assert len(np.unique(img[..., 2])) >= 200
    assert img[..., 0].max() == 0  # red was zero


def test_8bit_grayscale_png_three_identical_channels(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, size=(20, 30), dtype=np.uint8)
    path = tmp_path / "gray.png"
    Image.fromarray(gray, mode="L").save(path)

    img = load_image(path)

    assert img.shape == (20, 30, 3) and img.dtype == np.uint8
    for c in range(3):
        assert np.array_equal(img[..., c], gray)


def test_rgb_png_returned_as_stored_without_warning(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, size=(12, 17, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = load_image(path)
    assert np.array_equal(img, rgb)
    assert img.flags.writeable and img.flags.c_contiguous


def test_rgba_alpha_dropped_with_exactly_one_warning(tmp_path):
    rgba = np.zeros((10, 14, 4), dtype=np.uint8)
    rgba[..., :3] = 100  # alpha stays 0 everywhere
    path = tmp_path / "transparent.png"
    Image.fromarray(rgba, mode="RGBA").save(path)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = load_image(path)

    assert len(caught) == 1
    assert issubclass(caught[0].category, AlphaChannelDroppedWarning)
    assert "transparent.png" in str(caught[0].message)
    assert img.shape == (10, 14, 3)
    assert (img == 100).all()


def test_float_tiff_raises_naming_file_dtype_shape(tmp_path):
    path = tmp_path / "float_image.tif"
    Image.fromarray(np.random.default_rng(2).random((8, 10)).astype(np.float32)).save(path)
    assert _mode(path) == "F"

    with pytest.raises(ImageFormatError) as info:
        load_image(path)

    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "float_image.tif" in msg and "float32" in msg and "(8, 10)" in msg


def test_two_channel_la_raises_naming_file_dtype_shape(tmp_path):
    path = tmp_path / "gray_alpha.png"
    Image.fromarray(np.full((8, 10, 2), 50, dtype=np.uint8), mode="LA").save(path)

    with pytest.raises(ImageFormatError) as info:
        load_image(path)

    msg = str(info.value)
    assert "gray_alpha.png" in msg and "uint8" in msg and "(8, 10, 2)" in msg


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    bogus = tmp_path / "bogus.png"
    bogus.write_bytes(b"not an image at all")
    with pytest.raises(ImageFormatError, match="bogus.png"):
        load_image(bogus)
    with pytest.raises(ImageFormatError, match="bogus.png"):
        load_mask(bogus)


# ---------------------------------------------------------------- image_size


def test_image_size_is_height_width_from_header_only(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((389, 517, 3), dtype=np.uint8)).save(path)
    assert image_size(path) == (389, 517)

    # Truncate the pixel data: the header still answers, decoding fails.
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[:60])
    assert image_size(truncated) == (389, 517)
    with pytest.raises(ImageFormatError, match="truncated.png"):
        load_image(truncated)


# ---------------------------------------------------------------- load_mask


def test_jpeg_mask_binarised_close_to_lossless(tmp_path):
    disc = _disc()
    png = tmp_path / "disc.png"
    jpg = tmp_path / "disc.jpg"
    Image.fromarray(disc, mode="L").save(png)
    Image.fromarray(disc, mode="L").save(jpg, quality=90)
    with Image.open(jpg) as im:
        assert len(np.unique(np.asarray(im))) > 2  # compression noise present

    lossless = load_mask(png)
    lossy = load_mask(jpg)

    assert lossless.dtype == np.uint8 and lossless.shape == disc.shape
    assert set(np.unique(lossless)) == {0, 1} and set(np.unique(lossy)) <= {0, 1}
    area, area_jpg = int(lossless.sum()), int(lossy.sum())
    assert abs(area_jpg - area) <= 0.005 * area


def test_zero_one_png_mask_kept_as_is(tmp_path):
    mask01 = _disc(value=1)
    path = tmp_path / "m01.png"
    Image.fromarray(mask01, mode="L").save(path)

    mask = load_mask(path)

    assert mask.sum() > 0
    assert np.array_equal(mask, mask01)


def test_mask_threshold_at_128(tmp_path):
    path = tmp_path / "levels.png"
    Image.fromarray(np.array([[0, 127, 128, 255]], dtype=np.uint8), mode="L").save(path)
    assert load_mask(path).tolist() == [[0, 0, 1, 1]]


def test_multichannel_mask_takes_first_channel(tmp_path):
    rgb = np.zeros((6, 7, 3), dtype=np.uint8)
    rgb[:3, :, 0] = 255  # foreground in R only
    rgb[3:, :, 1] = 255  # G must be ignored
    path = tmp_path / "rgb_mask.png"
    Image.fromarray(rgb).save(path)

    mask = load_mask(path)

    assert mask.shape == (6, 7)
    assert mask[:3].all() and not mask[3:].any()


def test_bilevel_and_16bit_binary_masks(tmp_path):
    disc = _disc(40, 50, 12)
    p1 = tmp_path / "bilevel.png"
    Image.fromarray(disc > 0).save(p1)  # mode "1"
    assert np.array_equal(load_mask(p1), (disc > 0).astype(np.uint8))

    p16 = tmp_path / "m16.png"
    Image.fromarray((disc > 0).astype(np.uint16) * 65535).save(p16)
    assert np.array_equal(load_mask(p16), (disc > 0).astype(np.uint8))


def test_ambiguous_and_float_masks_rejected(tmp_path):
    labels = np.arange(600, dtype=np.uint16).reshape(20, 30)
    p16 = tmp_path / "labels16.png"
    Image.fromarray(labels).save(p16)
    with pytest.raises(ImageFormatError, match="labels16.png"):
        load_mask(p16)

    pf = tmp_path / "float_mask.tif"
    Image.fromarray(np.ones((5, 6), dtype=np.float32)).save(pf)
    with pytest.raises(ImageFormatError) as info:
        load_mask(pf)
    assert "float_mask.tif" in str(info.value) and "float32" in str(info.value)
